"""Bounded memory for a long-running server: the pipeline's caches under a byte budget (--cache-mb, least
recently used first out), and the C allocator's free memory handed back to the OS after every job.

What grows with traffic's variety, and what bounds it here:
- the runtime's runners (buffers and CUDA graphs per (steps, images, ...) key) on the runtime path: the runtime
  keeps them least recently used first (runtime.cache.RunnerCache) and RuntimeSampler.trim(budget) drops the oldest
  until the rest fit (bytes counted from the tensors each runner holds; a CUDA graph's private pool is not visible
  to that count, but is freed with its runner);
- --sampler auto's choices, latency curves and observed iterations (per steps, images, tol): at most
  MAX_AUTO_ENTRIES each (oldest out; an evicted curve is measured again when needed);
- on the torch reference path (a CPU server) nothing is cached per shape: there the growth is glibc keeping freed
  arena memory (the dynamic mmap threshold grows, large tensors then come from arenas and are not returned);
  malloc_trim(0) after each job returns it.
This module calls the runtime's trim and caps the planner's dicts after each job (the worker thread is the only
one that touches the pipeline, so there is no race).
"""

from __future__ import annotations

import ctypes
import ctypes.util

MAX_AUTO_ENTRIES = 256


class CacheBudget:
    def __init__(self, pipe, budget_bytes: int | None):
        self.pipe, self.budget = pipe, budget_bytes
        self._auto_evictions = 0
        self._libc = _libc()

    @property
    def evictions(self) -> int:
        """Runners and auto entries dropped so far."""
        runtime = getattr(self.pipe, "runtime", None)
        return self._auto_evictions + getattr(getattr(runtime, "runners", None), "evictions", 0)

    def after_job(self) -> int:
        """Trim the caches to the budget and return freed heap to the OS; returns the bytes the caches hold."""
        runtime = getattr(self.pipe, "runtime", None)
        held = runtime.trim(self.budget) if runtime is not None else 0  # runtime.executor.RuntimeSampler.trim
        planner = getattr(self.pipe, "auto", None)  # autotune.planner.AutoPlanner: choices and observations
        for name in ("cache", "observed"):
            cache = getattr(planner, name, None)
            if isinstance(cache, dict):
                # choices, curves (the reference path keeps one per distinct widest call), observations: oldest out
                choices = [k for k in cache if not (isinstance(k, tuple) and k[:1] == ("recorded",))]
                for key in choices[:max(0, len(choices) - MAX_AUTO_ENTRIES)]:  # oldest first (insertion order)
                    del cache[key]
                    self._auto_evictions += 1
        if self._libc is not None:
            self._libc.malloc_trim(0)
        return held


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
