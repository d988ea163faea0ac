"""Bounded memory for a long-running server: the pipeline's caches under a byte budget (--cache-mb, least
recently used first out), and the C allocator's free memory handed back to the OS after every job.

What grows with traffic's variety, and what bounds it here:
- the runtime's runners (runtime.executor.RuntimeSampler._runners: buffers and CUDA graphs per (steps, images, ...)
  key) on the runtime path: an LRU under the byte budget (bytes counted from the tensors each runner holds; a
  CUDA graph's private pool is not visible to that count, but is freed with its runner);
- --sampler auto's choices, latency curves and observed iterations (per steps, images, tol): at most
  MAX_AUTO_ENTRIES each (oldest out; an evicted curve is measured again when needed);
- on the torch reference path (a CPU server) nothing is cached per shape: there the growth is glibc keeping freed
  arena memory (the dynamic mmap threshold grows, large tensors then come from arenas and are not returned);
  malloc_trim(0) after each job returns it.
The pipeline keeps its caches as plain dicts; this module orders and trims them from outside after each job (the
worker thread is the only one that touches the pipeline, so there is no race).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import types
from collections import OrderedDict

import torch

MAX_AUTO_ENTRIES = 256


class CacheBudget:
    def __init__(self, pipe, budget_bytes: int | None):
        self.pipe, self.budget = pipe, budget_bytes
        self.evictions = 0
        self._libc = _libc()
        runtime = getattr(pipe, "runtime", None)
        if runtime is not None and isinstance(getattr(runtime, "_runners", None), dict):
            lru = LRUDict()  # get() marks an entry used: iteration is least recently used first
            for key, runner in list(runtime._runners.items()):
                OrderedDict.__setitem__(lru, key, runner)
            runtime._runners = lru

    def after_job(self) -> int:
        """Trim the caches to the budget and return freed heap to the OS; returns the bytes the caches hold."""
        held = self._trim_runners()
        planner = getattr(self.pipe, "auto", None)  # autotune.planner.AutoPlanner: choices and observations
        for name in ("cache", "observed"):
            cache = getattr(planner, name, None)
            if isinstance(cache, dict):
                # choices, curves (the reference path keeps one per distinct widest call), observations: oldest out
                choices = [k for k in cache if not (isinstance(k, tuple) and k[:1] == ("recorded",))]
                for key in choices[:max(0, len(choices) - MAX_AUTO_ENTRIES)]:  # oldest first (insertion order)
                    del cache[key]
                    self.evictions += 1
        if self._libc is not None:
            self._libc.malloc_trim(0)
        return held

    def _trim_runners(self) -> int:
        runtime = getattr(self.pipe, "runtime", None)
        runners = getattr(runtime, "_runners", None)
        if not isinstance(runners, dict):
            return 0
        engine = getattr(runtime, "engine", None)
        order = list(runners)  # least recently used first; read values without marking them used
        sizes = {key: tensor_bytes(dict.__getitem__(runners, key), skip=engine) for key in order}
        held = sum(sizes.values())
        if self.budget is None:
            return held
        for key in order:
            if held <= self.budget:
                break
            del runners[key]
            held -= sizes[key]
            self.evictions += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return held


class LRUDict(OrderedDict):
    """A dict whose get() and [] move the entry to the end: iteration order is least recently used first."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def get(self, key, default=None):
        if key in self:
            return self[key]
        return default


def tensor_bytes(obj, *, skip=None, _seen=None, _depth=0) -> int:
    """Bytes of the distinct tensor storages reachable from obj's attributes, lists, tuples and dicts (not
    through `skip`, e.g. the shared engine)."""
    seen = set() if _seen is None else _seen
    if obj is None or obj is skip or _depth > 6 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = ("storage", obj.device.type, storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.FunctionType, types.MethodType, types.ModuleType)):
        items = vars(obj).values()
    else:
        return 0
    return sum(tensor_bytes(v, skip=skip, _seen=seen, _depth=_depth + 1) for v in items)


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None
