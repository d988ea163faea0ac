"""The two ways a pipeline runs a sampler on one chunk of images, behind one interface:

    ReferencePath  the pure samplers (srds_trt.samplers) over the PyTorch model: torch on a CPU
    RuntimePath    srds_trt.runtime (static buffers, programs per bucket, CUDA graphs): GPUs and exported engines

`run(sampler, chunk, ...)` returns (SampleResult, stats) and `serial(chunk, ...)` returns (sample, stats), the
stats holding first_call, setup_s and wall_time_s (a first runtime call builds and captures; later ones replay).
`step()` is called after every iteration, sweep or step (progress bars, cancellation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .report import finite_or_none
from .runtime.host import device_now as _now
from .samplers import SAMPLERS, NonFiniteError, SampleResult, serial_sample
from .samplers.base import check_cancel
from .samplers.plan import default_num_blocks
from .samplers.window import WINDOW_SAMPLERS, resolve_window, window_rows

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

    def row_budget(self, per_image: int, max_rows: int) -> int:
        """Rows one chunk's widest call may hold: the caller's bound (the PyTorch model takes any row count)."""
        return max_rows

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

    def row_budget(self, per_image: int, max_rows: int) -> int:
        """Rows one chunk's widest call may hold: at most what the export's profile holds (so a default export
        serves any image count, chunk by chunk); an image wider than that is refused, naming the export that fits."""
        capacity = self.runtime.capacity()
        if capacity is None:
            return max_rows
        if per_image > capacity:
            from .runtime.engines.base import EngineError

            model = self.runtime.loaded.spec.name
            raise EngineError(f"one image of this run needs {per_image} engine rows but the export at "
                              f"{self.runtime.artifacts} holds {capacity}: re-export with `python -m srds_trt.export "
                              f"--model {model} --max-batch {per_image}` (or use fewer --steps or --blocks)")
        return min(max_rows, capacity)

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


def sample_chunk(path, name: str, run: Chunk, tol: float, options: dict, max_iters: int | None,
                  progress_bar: bool, cancel) -> tuple[Tensor, dict]:
    steps = len(run.timesteps) - 1
    if name == "serial":
        sample, part = sample_serial(path, run, progress_bar, cancel)
        part.update(blocks=1, iterations=None, model_evals=steps * run.x.shape[0], sequential_calls=steps,
                    converged=True, residuals=[], tol=tol)
        return sample, part
    # no total: how many iterations / sweeps the stopping rule takes is known only at the end (max_iters bounds it)
    if name in WINDOW_SAMPLERS:
        desc, unit = f"{name} {steps} steps / window {resolve_window(name, steps, options.get('window'))}", "sweep"
    else:
        blocks = options.get("num_blocks") or default_num_blocks(steps)
        desc, unit = f"srds {steps} steps / {blocks} blocks (at most {blocks} iterations)", "iter"
    with _bar(progress_bar, total=max_iters, desc=desc, unit=unit) as bar:
        def progress(iteration: int, residual: float) -> None:
            bar.set_postfix(residual=f"{residual:.2e}", tol=f"{tol:.0e}", refresh=False)
            bar.update(1)
            check_cancel(cancel, f"{unit} {iteration}")

        result, extra = path.run(name, run, tol=tol, options=options, max_iters=max_iters, progress=progress)
    return result.sample, {**extra,
        "blocks": result.num_blocks, "iterations": result.iterations, "model_evals": result.model_evals,
        "sequential_calls": result.sequential_calls, "converged": result.converged,
        "residuals": [finite_or_none(r) for r in result.residuals],
        "error_estimates": [finite_or_none(e) for e in result.error_estimates],
        "tol": tol, "accept_tol": result.accept_tol, "pipelined": options.get("pipelined") if name == "srds" else None,
        "window": result.window}


def sample_serial(path, run: Chunk, progress_bar: bool, cancel) -> tuple[Tensor, dict]:
    steps = len(run.timesteps) - 1
    with _bar(progress_bar, total=steps, desc=f"serial {steps} steps", unit="step") as bar:
        def step() -> None:
            bar.update(1)
            check_cancel(cancel, f"serial step {bar.n}")

        sample, stats = path.serial(run, step)
    return check_finite(sample, "serial"), stats


@dataclass
class ChunkOutput:
    start: int  # index of the chunk's first image in the call
    prompts: list[str]
    samples: Tensor
    images: list
    stats: dict  # the call's settings, and this chunk's own numbers under "chunk"
    counter: Any = None
    counts_before: Any = None


def chunk_rows_per_image(sampler: str, steps: int, guided: bool, *, num_blocks: int | None = None,
                         pipelined: bool = True, max_iters: int | None = None, window: int | None = None) -> int:
    """The widest call's rows for ONE image of `sampler` at these settings: what a call sizes its image chunks by
    (and sampler="auto" prices them by)."""
    if sampler == "srds":
        from .runtime.executor import rows_needed

        return rows_needed(steps, num_blocks, 1, guided, pipelined, max_iters)
    if sampler in WINDOW_SAMPLERS:
        return window_rows(sampler, steps, window, 1, guided)
    return 2 if guided else 1


def check_batch(cond_model: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A model whose output does not match its input's shape is an error, never silently broadcast."""

    def checked(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        out = cond_model(x, t, cond)
        if out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for an input of {tuple(x.shape)}")
        return out

    return checked


def check_finite(sample: Tensor, sampler: str) -> Tensor:
    if not bool(torch.isfinite(sample).all()):
        raise NonFiniteError(f"{sampler}: NaN/Inf in the sample (a model returning NaN, fp16 overflow, an extreme "
                             "--guidance-scale); no image written")
    return sample


def _bar(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, **kwargs)
