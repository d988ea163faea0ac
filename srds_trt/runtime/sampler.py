"""The pipeline's engine path: one engine and cached runners per pipeline (no global state).

`--backend torch` on a GPU, `onnxruntime` and `tensorrt` sample through srds_trt.runtime (static buffers,
one program per bucket, CUDA graphs on a GPU) instead of the pure reference sampler. The engine is built on
first use, sized to the rows the run needs; its batch-noise floor is measured once and keeps a positive tol
above it (runner.effective_tol).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .serial_runner import SerialRunner
from .srds_runner import RunResult, SRDSRunner
from .engines.base import Engine, EngineError
from .engines.factory import BACKENDS, torch_engine
from ..schedule import default_num_blocks

DEFAULT_ENGINE_DIR = Path("engines")


def artifact_folder(engine_dir: str | Path, model: str, backend: str) -> Path:
    """The export folder to load: `engine_dir` itself if it holds a manifest, else the one export of `model` in it."""
    from ..export.artifacts import find_artifacts
    from ..export.trt_import import tensorrt_module

    folder = Path(engine_dir)
    if (folder / "manifest.json").is_file():
        return folder
    fields = {}
    if backend == "tensorrt":
        trt, flavour = tensorrt_module()
        fields = {"flavour": flavour, "version": trt.__version__}
    return find_artifacts(folder, model, **fields)


def rows_needed(steps: int, num_blocks: int | None, images: int, guided: bool) -> int:
    """Engine rows of the widest tick: every block's fine row plus one coarse row, per image, x2 under guidance."""
    blocks = num_blocks or default_num_blocks(steps)
    return (blocks + 1) * images * (2 if guided else 1)


class RuntimeSampler:
    def __init__(self, backend: str, loaded, *, device: torch.device, dtype: torch.dtype, engine_dir: str | Path | None = None):
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if backend == "tensorrt" and device.type != "cuda":
            raise EngineError("--backend tensorrt needs a CUDA GPU (--device cuda)")
        if backend == "onnxruntime" and device.type != "cpu":
            raise EngineError("--backend onnxruntime runs on the CPU (--device cpu)")
        self.backend, self.loaded, self.device, self.dtype = backend, loaded, device, dtype
        self.artifacts = None if backend == "torch" else artifact_folder(engine_dir or DEFAULT_ENGINE_DIR, loaded.spec.name, backend)
        self.engine: Engine | None = None
        self.noise_floor = 0.0
        self._runners: dict[tuple, object] = {}

    def _engine(self, rows: int) -> Engine:
        if self.engine is not None and self.engine.max_rows >= rows:
            return self.engine
        if self.backend == "torch":
            # the runners capture their own graphs around the engine call: the engine itself stays eager
            self.engine = torch_engine(self.loaded, device=self.device, dtype=self.dtype, max_rows=rows, cuda_graphs=False)
        elif self.backend == "onnxruntime":
            from .engines.onnxruntime_engine import OnnxRuntimeEngine

            self.engine = OnnxRuntimeEngine(self.artifacts)
        else:
            from .engines.tensorrt_engine import TensorRTEngine

            self.engine = TensorRTEngine(self.artifacts, device=self.device, cuda_graphs=False)
        if self.engine.max_rows < rows:
            raise EngineError(f"this run needs {rows} engine rows but the export at {self.artifacts} holds "
                              f"{self.engine.max_rows}; re-export with --max-batch {rows} (or use fewer images/blocks)")
        self.noise_floor = self.engine.measure_noise_floor(min(16, self.engine.max_rows))
        self._runners.clear()
        return self.engine

    def srds(self, x: Tensor, cond: Tensor, uncond: Tensor, *, scale: float, timesteps: Tensor, alphas_cumprod: Tensor,
             prediction_type: str, tol: float, num_blocks: int | None, max_iters: int | None, pipelined: bool,
             progress: Callable[[int, float], None] | None) -> RunResult:
        guided = scale != 1.0
        engine = self._engine(rows_needed(len(timesteps) - 1, num_blocks, x.shape[0], guided))
        key = ("srds", tuple(timesteps.tolist()), x.shape[0], num_blocks, max_iters, pipelined, guided, prediction_type)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = SRDSRunner(
                engine, batch=x.shape[0], timesteps=timesteps, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type,
                num_blocks=num_blocks, max_iters=max_iters, pipelined=pipelined, guided=guided, noise_floor=self.noise_floor)
        return runner.run(x.float(), cond, uncond if guided else None, guidance_scale=scale, tol=tol, progress=progress)

    def serial(self, x: Tensor, cond: Tensor, uncond: Tensor, *, scale: float, timesteps: Tensor, alphas_cumprod: Tensor,
               prediction_type: str) -> Tensor:
        guided = scale != 1.0
        engine = self._engine(x.shape[0] * (2 if guided else 1))
        key = ("serial", tuple(timesteps.tolist()), x.shape[0], guided, prediction_type)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = SerialRunner(engine, batch=x.shape[0], timesteps=timesteps,
                                                       alphas_cumprod=alphas_cumprod, prediction_type=prediction_type,
                                                       guided=guided)
        return runner.run(x.float(), cond, uncond if guided else None, guidance_scale=scale)
