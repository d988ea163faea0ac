"""TensorRT backend, written against the API that TensorRT 11 and TensorRT-RTX share.

Two parts. `ContextDriver` owns the execution contexts and the order of calls TensorRT documents; it touches no
CUDA itself (streams and device memory arrive as integer handles), so tests drive it on a CPU with a fake
TensorRT that checks the order (tests/test_tensorrt_driver.py). `TensorRTEngine` is the thin CUDA part: it
verifies and deserialises the plan, allocates buffers with torch, and hands their addresses to the driver.

The full design note (what was measured, why these choices): docs/export.md, section "Module notes: srds_trt/runtime/engines/tensorrt_engine.py".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...export.artifacts import cond_input_name, load_engine
from .base import Engine, EngineError, EngineSpec, default_buckets


@dataclass(frozen=True)
class Tensor:
    """One engine I/O tensor as TensorRT sees it: a name, a shape (inputs only) and a device address."""

    name: str
    shape: tuple[int, ...] | None
    address: int


class ContextDriver:
    """Execution contexts of one deserialised engine, driven in the order TensorRT documents:

    create_execution_context -> set_optimization_profile_async (checked) -> [set_device_memory] ->
    set_input_shape (every input) -> set_tensor_address (every tensor) -> execute_async_v3; capture only where
    is_stream_capturable and after a warm-up execute_async_v3 of that context.
    """

    def __init__(
        self,
        engine: Any,
        trt: Any,
        *,
        lanes: int,
        buckets: tuple[int, ...],
        num_profiles: int,
        stream: int,
        lane_memory: Callable[[int, int], int] | None = None,
    ):
        """lane_memory(lane, bytes) -> device address: one block per lane shared by its contexts (None: each
        context allocates its own, STATIC). stream: the handle profile switches are ordered on."""
        if lanes > num_profiles:
            raise EngineError(f"{lanes} concurrent lanes need {lanes} optimization profiles; this export has "
                              f"{num_profiles} (re-export with --profiles {lanes})")
        self.buckets = tuple(buckets)
        self.per_shape = num_profiles >= lanes * len(self.buckets)
        self.capture_failures: dict[tuple[int, int], str] = {}
        self._bindings: dict[tuple[int, int], tuple[Tensor, ...]] = {}
        self._warm: set[tuple[int, int]] = set()
        self._contexts: dict[tuple[int, int], Any] = {}
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        user_memory = lane_memory is not None and strategy is not None
        for lane in range(lanes):
            memory = lane_memory(lane, int(engine.device_memory_size_v2)) if user_memory else None
            keys = [(lane, b) for b in self.buckets] if self.per_shape else [(lane, None)]
            for index, key in enumerate(keys):
                context = engine.create_execution_context(strategy) if user_memory else engine.create_execution_context()
                if context is None:  # TensorRT returns None (and logs) when it cannot allocate the context
                    raise EngineError(f"TensorRT could not create an execution context for lane {lane} "
                                      "(out of device memory? see its log)")
                profile = lane * len(keys) + index
                if not context.set_optimization_profile_async(profile, stream):
                    raise EngineError(f"TensorRT refused optimization profile {profile} for lane {lane}")
                if memory is not None:
                    context.set_device_memory(memory, int(engine.device_memory_size_v2))
                self._contexts[key] = context
        if not self.per_shape:
            reason = (f"uncaptured: one context per captured shape needs {lanes * len(self.buckets)} optimization "
                      f"profiles (lanes x buckets), this export has {num_profiles}; re-export with "
                      f"--profiles {lanes * len(self.buckets)}")
            self.capture_failures = {(lane, b): reason for lane in range(lanes) for b in self.buckets}

    def context(self, lane: int, bucket: int) -> Any:
        return self._contexts[(lane, bucket if self.per_shape else None)]

    def bind(self, lane: int, bucket: int, tensors: tuple[Tensor, ...], stream: int) -> None:
        """Give (lane, bucket) its buffers (they never move). Per-shape contexts are shaped and bound now, once."""
        self._bindings[(lane, bucket)] = tensors
        if self.per_shape:
            context = self.context(lane, bucket)
            self._apply(context, tensors)
            if hasattr(context, "is_stream_capturable") and not context.is_stream_capturable(stream):
                self.capture_failures[(lane, bucket)] = ("uncaptured: TensorRT reports this context is not stream "
                                                        "capturable (is_stream_capturable is False)")

    def execute(self, lane: int, bucket: int, stream: int, *, capturing: bool = False) -> None:
        key = (lane, bucket)
        if capturing:
            if key in self.capture_failures:
                raise EngineError(self.capture_failures[key])
            if key not in self._warm:  # the first enqueue may allocate or specialise kernels: never inside a capture
                raise EngineError(f"capture of {bucket} rows (lane {lane}) before its warm-up enqueue")
        context = self.context(lane, bucket)
        if not self.per_shape:
            self._apply(context, self._bindings[key])
        if not context.execute_async_v3(stream):
            raise EngineError(f"TensorRT execute_async_v3 failed for {bucket} rows (lane {lane})")
        self._warm.add(key)

    @staticmethod
    def _apply(context: Any, tensors: tuple[Tensor, ...]) -> None:
        for tensor in tensors:
            if tensor.shape is not None and not context.set_input_shape(tensor.name, tensor.shape):
                raise EngineError(f"TensorRT refused shape {tensor.shape} for input {tensor.name!r}")
        for tensor in tensors:
            if not context.set_tensor_address(tensor.name, tensor.address):
                raise EngineError(f"TensorRT refused the address of {tensor.name!r}")


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(
        self,
        artifact_dir: str | Path,
        *,
        device: torch.device | str = "cuda",
        lanes: int = 1,
        buckets: tuple[int, ...] | None = None,
        loader: Callable[..., tuple[Any, dict[str, Any]]] = load_engine,
    ):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise EngineError("the TensorRT backend needs a CUDA GPU; use --backend torch or onnxruntime here")
        major, minor = torch.cuda.get_device_capability(device)
        # verify-then-deserialise: load_engine refuses a plan whose checksums, version or target do not match.
        self._engine, self.manifest = loader(artifact_dir, target=f"{major}.{minor}")
        request = self.manifest["request"]
        lo, hi = request["min_batch"], request["max_batch"]
        buckets = buckets or default_buckets(hi, lo)
        if buckets[0] < lo or buckets[-1] > hi:
            raise EngineError(f"buckets {buckets} leave the exported row range [{lo}, {hi}]")
        super().__init__(EngineSpec.from_manifest(self.manifest), buckets, device, lanes)
        from ...export.artifacts import tensorrt_module

        trt, _ = tensorrt_module()
        setup = torch.cuda.current_stream(device)
        self._lane_memory: list[torch.Tensor] = []  # kept alive: the contexts hold raw addresses into them
        self.driver = ContextDriver(self._engine, trt, lanes=lanes, buckets=self.buckets,
                                    num_profiles=self.manifest["num_profiles"], stream=setup.cuda_stream,
                                    lane_memory=self._allocate_lane_memory)
        sample, timestep, cond, output = ("sample", "timestep", cond_input_name(self.manifest),
                                          self.manifest["io"]["outputs"][0]["name"])
        for (lane, bucket), io in self._io.items():
            tensors = tuple(Tensor(name, tuple(t.shape), t.data_ptr())
                            for name, t in ((sample, io.sample), (timestep, io.timestep), (cond, io.cond)))
            self.driver.bind(lane, bucket, tensors + (Tensor(output, None, io.output.data_ptr()),), setup.cuda_stream)
        setup.synchronize()

    def _allocate_lane_memory(self, lane: int, size: int) -> int:
        block = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)  # torch blocks are 512-B aligned
        self._lane_memory.append(block)
        return block.data_ptr()

    @property
    def capture_failures(self) -> dict[tuple[int, int], str]:
        """(lane, bucket) -> why a capture around its enqueue is refused (it then runs as a plain enqueue)."""
        return self.driver.capture_failures

    def enqueue(self, bucket: int, lane: int = 0, stream: torch.cuda.Stream | None = None, *, replay: bool = True) -> None:
        """execute_async_v3 on `stream`. `replay` is accepted for the Engine interface; this engine keeps no graphs
        (the runner captures its own around this call)."""
        stream = stream or torch.cuda.current_stream(self.device)
        self.driver.execute(lane, bucket, stream.cuda_stream, capturing=torch.cuda.is_current_stream_capturing())
