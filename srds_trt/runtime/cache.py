"""The runtime's runner cache: least recently used first, trimmed to a byte budget by whoever owns the process's
memory (the server after every job, --cache-mb). A runner holds static buffers, tables and CUDA graphs for one
(kind, grid, images, blocks, ...) key; dropping one frees them, and the next call with that key builds it again."""

from __future__ import annotations

import types
from collections import OrderedDict
from typing import Any, Hashable, Iterator

import torch


class RunnerCache:
    """An LRU map key -> runner: get() marks an entry used; iteration is least recently used first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.evictions = 0

    def get(self, key: Hashable) -> Any | None:
        runner = self._entries.get(key)
        if runner is not None:
            self._entries.move_to_end(key)
        return runner

    def put(self, key: Hashable, runner: Any) -> Any:
        self._entries[key] = runner
        self._entries.move_to_end(key)
        return runner

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    def held_bytes(self, *, skip: Any = None) -> int:
        """Bytes of the distinct tensor storages the runners hold (not through `skip`, the shared engine)."""
        seen: set = set()
        return sum(tensor_bytes(runner, skip=skip, _seen=seen) for runner in self._entries.values())

    def trim(self, budget_bytes: int | None, *, skip: Any = None) -> int:
        """Drop least recently used runners until the rest hold <= budget_bytes (None: no limit); returns the
        bytes still held. A CUDA graph's private pool is not in the count but is freed with its runner."""
        sizes = {key: tensor_bytes(runner, skip=skip) for key, runner in self._entries.items()}
        held = sum(sizes.values())
        if budget_bytes is None:
            return held
        for key in list(self._entries):
            if held <= budget_bytes:
                break
            del self._entries[key]
            held -= sizes[key]
            self.evictions += 1
        return held


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
