"""ONNX Runtime backend (CPU): the exported ONNX as a runnable engine.

It runs exactly the graph the TensorRT plan was built from, so on a machine without a TensorRT-capable GPU the
export can still be executed end to end. ONNX Runtime takes any row count in the exported range, but static
buffers for every row count would grow with the square of max rows (4096 rows: ~9 GB for the digits model), so
buffers sit on the same bucket ladder as every engine (default_buckets: padding under a third), sized to the
rows the caller needs (`max_rows`), and checked against an up-front memory estimate before anything is allocated.
ONNX Runtime's own failures (a graph it cannot load or run) surface as EngineError.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...export.artifacts import cond_input_name, verify_onnx
from .base import Engine, EngineError, EngineSpec, default_buckets


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, artifact_dir: str | Path, *, max_rows: int | None = None, threads: int | None = None, lanes: int = 1):
        import onnxruntime as ort

        self.artifact_dir = Path(artifact_dir)
        self.manifest = verify_onnx(self.artifact_dir)
        request = self.manifest["request"]
        top = request["max_batch"] if max_rows is None else min(max_rows, request["max_batch"])
        super().__init__(EngineSpec.from_manifest(self.manifest), default_buckets(top), "cpu", lanes)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                str(self.artifact_dir / self.manifest["onnx"]["file"]), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's pybind errors share no public base class
            raise EngineError(f"ONNX Runtime cannot load {self.artifact_dir}: {_first_line(exc)}") from exc
        self._cond_name = cond_input_name(self.manifest)
        self._output_name = self.manifest["io"]["outputs"][0]["name"]

    def enqueue(self, bucket: int, lane: int = 0, stream: torch.cuda.Stream | None = None, *, replay: bool = True) -> None:
        io = self.io(bucket, lane)
        feeds = {"sample": io.sample.numpy(), "timestep": io.timestep.numpy(), self._cond_name: io.cond.numpy()}
        try:
            (out,) = self._session.run([self._output_name], feeds)
        except Exception as exc:
            raise EngineError(f"ONNX Runtime failed on {bucket} rows of {self.artifact_dir}: {_first_line(exc)}") from exc
        if out.shape != tuple(io.output.shape):  # never broadcast a wrong batch into the output buffer
            raise EngineError(f"the ONNX model returned shape {out.shape} for {tuple(io.output.shape)}")
        io.output.copy_(torch.from_numpy(out))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
