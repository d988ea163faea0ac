"""The two ways a pipeline runs a sampler on one chunk of images, behind one interface:

    ReferencePath  the pure samplers (srds_trt.samplers) over the PyTorch model: torch on a CPU
    RuntimePath    srds_trt.runtime (static buffers, programs per bucket, CUDA graphs): GPUs and exported engines

`run(sampler, chunk, ...)` returns (SampleResult, stats) and `serial(chunk, ...)` returns (sample, stats), the
stats holding first_call, setup_s and wall_time_s (a first runtime call builds and captures; later ones replay).
`step()` is called after every iteration, sweep or step (progress bars, cancellation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .samplers import SAMPLERS, SampleResult, serial_sample
from .samplers.window import WINDOW_SAMPLERS

Progress = Callable[[int, float], None]


@dataclass
class Chunk:
    """One chunk of images, ready to sample: the guided model and the raw inputs an engine needs."""

    model: Callable[[Tensor, Tensor], Tensor]
    x: Tensor
    cond: Tensor
    uncond: Tensor
    scale: float
    timesteps: Tensor
    alphas_cumprod: Tensor
    prediction_type: str

    def reference(self) -> dict:
        return dict(model=self.model, x=self.x, timesteps=self.timesteps, alphas_cumprod=self.alphas_cumprod,
                    prediction_type=self.prediction_type)

    def engine_inputs(self) -> dict:
        return dict(x=self.x, cond=self.cond, uncond=self.uncond, scale=self.scale, timesteps=self.timesteps,
                    alphas_cumprod=self.alphas_cumprod, prediction_type=self.prediction_type)


class ReferencePath:
    samplers = tuple(SAMPLERS)
    runtime = None

    def __init__(self, device: torch.device):
        self.device = device

    def run(self, sampler: str, chunk: Chunk, *, tol: float, options: dict, max_iters: int | None,
            progress: Progress) -> tuple[SampleResult, dict]:
        start = _now(self.device)
        result = SAMPLERS[sampler](**chunk.reference(), tol=tol, max_iters=max_iters, progress=progress, **options)
        return result, {"first_call": True, "setup_s": 0.0, "wall_time_s": _now(self.device) - start}

    def serial(self, chunk: Chunk, step: Callable[[], None]) -> tuple[Tensor, dict]:
        model = chunk.model

        def counted(x: Tensor, t: Tensor) -> Tensor:
            out = model(x, t)
            step()
            return out

        start = _now(self.device)
        sample = serial_sample(**{**chunk.reference(), "model": counted})
        return sample, {"first_call": True, "setup_s": 0.0, "wall_time_s": _now(self.device) - start}


class RuntimePath:
    samplers = ("serial", "srds", *WINDOW_SAMPLERS)

    def __init__(self, runtime):
        self.runtime = runtime  # runtime.executor.RuntimeSampler: one engine and cached runners
        self.device = runtime.device

    def run(self, sampler: str, chunk: Chunk, *, tol: float, options: dict, max_iters: int | None,
            progress: Progress) -> tuple[SampleResult, dict]:
        runtime = self.runtime
        start = _now(self.device)
        extra: dict[str, Any] = {}
        if sampler in WINDOW_SAMPLERS:  # one captured sweep, one host read per sweep
            result, timing = runtime.window(sampler, **chunk.engine_inputs(), tol=tol, window=options.get("window"),
                                            max_iters=max_iters, progress=progress)
            reads = runtime.last_window_stats
            extra = {"slides": result.slides, "host_reads": reads.host_reads, "host_read_ms": 1e3 * reads.host_read_s}
        else:
            result, timing = runtime.srds(**chunk.engine_inputs(), tol=tol, num_blocks=options.get("num_blocks"),
                                          max_iters=max_iters, pipelined=options.get("pipelined", True),
                                          progress=progress)
        elapsed = _now(self.device) - start
        return result, {"engine": runtime.engine.name,
                        "engine_dtype": str(runtime.engine.spec.dtype).replace("torch.", ""),
                        "engine_noise_floor": runtime.noise_floor, "engine_noise_floor_rows": runtime.noise_floor_rows,
                        "tol_used": result.tol, "ticks_launched": result.ticks_launched, **extra,
                        "first_call": timing.first_call, "setup_s": timing.setup_s, "wall_time_s": elapsed}

    def serial(self, chunk: Chunk, step: Callable[[], None]) -> tuple[Tensor, dict]:
        start = _now(self.device)
        sample, timing = self.runtime.serial(**chunk.engine_inputs(), step=step)
        return sample, {"first_call": timing.first_call, "setup_s": timing.setup_s,
                        "wall_time_s": _now(self.device) - start}


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
