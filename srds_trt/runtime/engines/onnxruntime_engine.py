"""ONNX Runtime backend (CPU): the exported ONNX as a runnable engine.

It runs exactly the graph the TensorRT plan was built from, so on a machine without a TensorRT-capable GPU the
export can still be executed end to end. ONNX Runtime takes any row count in the exported range, so there is
one bucket per row count up to max rows (no padding needed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...export.artifacts import cond_input_name, verify_onnx
from .base import Engine, EngineSpec


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, artifact_dir: str | Path, *, max_rows: int | None = None, threads: int | None = None, lanes: int = 1):
        import onnxruntime as ort

        self.artifact_dir = Path(artifact_dir)
        self.manifest = verify_onnx(self.artifact_dir)
        request = self.manifest["request"]
        top = request["max_batch"] if max_rows is None else min(max_rows, request["max_batch"])
        super().__init__(EngineSpec.from_manifest(self.manifest), tuple(range(1, top + 1)), "cpu", lanes)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            str(self.artifact_dir / self.manifest["onnx"]["file"]), options, providers=["CPUExecutionProvider"]
        )
        self._cond_name = cond_input_name(self.manifest)
        self._output_name = self.manifest["io"]["outputs"][0]["name"]

    def enqueue(self, bucket: int, lane: int = 0, stream: torch.cuda.Stream | None = None, *, replay: bool = True) -> None:
        io = self.io(bucket, lane)
        feeds = {"sample": io.sample.numpy(), "timestep": io.timestep.numpy(), self._cond_name: io.cond.numpy()}
        (out,) = self._session.run([self._output_name], feeds)
        io.output.copy_(torch.from_numpy(out))
