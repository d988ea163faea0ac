"""TensorRT backend, written against the API that TensorRT 11 and TensorRT-RTX share.

Loading verifies the export (sha256 of every file, TensorRT flavour/version, target compute capability) before
the plan reaches the deserialiser. One execution context per lane (a lane is what one concurrent stream uses),
each bound to its own optimization profile: a context's shapes are per-profile state, so two contexts running
at once need two profiles. A call: set_input_shape -> set_tensor_address -> execute_async_v3(stream). Per
(lane, bucket), after a warm-up enqueue (TensorRT may allocate on the first), the enqueue is captured in a CUDA
graph; if capture fails, that bucket stays a plain enqueue and the reason is kept in `capture_failures`.

Status in this workplace: unit-tested against a fake TensorRT runtime; never executed, because TensorRT 11 is
not installable here and TensorRT-RTX refuses compute capability 9.0 (H100/H200).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ...export.artifacts import cond_input_name, load_engine
from .base import Engine, EngineError, EngineSpec, default_buckets


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(
        self,
        artifact_dir: str | Path,
        *,
        device: torch.device | str = "cuda",
        lanes: int = 1,
        buckets: tuple[int, ...] | None = None,
        cuda_graphs: bool = True,
        loader: Callable[..., tuple[Any, dict[str, Any]]] = load_engine,
    ):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise EngineError("the TensorRT backend needs a CUDA GPU; use --backend torch or onnxruntime here")
        major, minor = torch.cuda.get_device_capability(device)
        # verify-then-deserialise: load_engine refuses a plan whose checksums, version or target do not match.
        self._engine, self.manifest = loader(artifact_dir, target=f"{major}.{minor}")
        request = self.manifest["request"]
        if lanes > self.manifest["num_profiles"]:
            raise EngineError(
                f"{lanes} concurrent lanes need {lanes} optimization profiles; this export has "
                f"{self.manifest['num_profiles']} (re-export with --profiles {lanes})"
            )
        lo, hi = request["min_batch"], request["max_batch"]
        buckets = buckets or default_buckets(hi, lo)
        if buckets[0] < lo or buckets[-1] > hi:
            raise EngineError(f"buckets {buckets} leave the exported row range [{lo}, {hi}]")
        super().__init__(EngineSpec.from_manifest(self.manifest), buckets, device, lanes)
        self._names = ("sample", "timestep", cond_input_name(self.manifest), self.manifest["io"]["outputs"][0]["name"])
        self._contexts = [self._engine.create_execution_context() for _ in range(lanes)]
        setup = torch.cuda.current_stream(device)
        for profile, context in enumerate(self._contexts):
            context.set_optimization_profile_async(profile, setup.cuda_stream)
        setup.synchronize()
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.capture_failures: dict[tuple[int, int], str] = {}
        if cuda_graphs:
            self.capture()

    def _execute(self, bucket: int, lane: int, stream: torch.cuda.Stream) -> None:
        context, io = self._contexts[lane], self.io(bucket, lane)
        sample, timestep, cond, output = self._names
        for name, tensor in ((sample, io.sample), (timestep, io.timestep), (cond, io.cond)):
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineError(f"TensorRT refused shape {tuple(tensor.shape)} for input {name!r}")
            context.set_tensor_address(name, tensor.data_ptr())
        context.set_tensor_address(output, io.output.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT execute_async_v3 failed for {bucket} rows (lane {lane})")

    def enqueue(self, bucket: int, lane: int = 0, stream: torch.cuda.Stream | None = None, *, replay: bool = True) -> None:
        stream = stream or torch.cuda.current_stream(self.device)
        graph = self._graphs.get((lane, bucket)) if replay else None
        if graph is not None:
            with torch.cuda.stream(stream):
                graph.replay()
        else:
            self._execute(bucket, lane, stream)

    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        for lane in range(self.lanes):
            for bucket in reversed(self.buckets):
                self._execute(bucket, lane, stream)  # warm-up enqueue
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, stream=stream):
                        self._execute(bucket, lane, stream)
                except Exception as exc:  # capture is an optimisation: keep the plain enqueue
                    self.capture_failures[(lane, bucket)] = f"{type(exc).__name__}: {exc}"
                    torch.cuda.synchronize(self.device)
                    continue
                self._graphs[(lane, bucket)] = graph
