"""The pipeline's engine path: one engine and cached runners per pipeline (no global state).

`--backend torch` on a GPU, `onnxruntime` and `tensorrt` sample through srds_trt.runtime (static buffers,
one program per bucket, CUDA graphs on a GPU) instead of the pure reference sampler. The engine is built on
first use, sized to the rows the run needs; its batch-noise floor is measured once and keeps a positive tol
above it (runner.effective_tol). Runners: srds (SRDSRunner), serial (SerialRunner), and the sliding-window
samplers eps-picard and paradigms (WindowRunner: one captured sweep, one host read per sweep).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .cache import RunnerCache
from .serial_runner import SerialRunner
from .srds.runner import RunResult, SRDSRunner
from .window.runner import WindowRunner
from .engines.base import Engine, EngineError
from .engines.factory import BACKENDS, torch_engine
from ..samplers import run_at_tol
from ..samplers.plan import build_tick_plan
from ..samplers.window import window_rows
from .host import device_now as _now

DEFAULT_ENGINE_DIR = Path("engines")


def artifact_folder(engine_dir: str | Path, model: str, backend: str, rows: int | None = None) -> Path:
    """The export folder to load: `engine_dir` itself if it holds a manifest, else the export of `model` in it that
    fits the run (its profile covers `rows`, when given; srds_trt.export.artifacts.find_artifacts chooses)."""
    from ..export.artifacts import find_artifacts
    from ..export.artifacts import tensorrt_module

    folder = Path(engine_dir)
    if (folder / "manifest.json").is_file():
        return folder
    fields = {} if rows is None else {"rows": rows}
    if backend == "tensorrt":
        trt, flavour = tensorrt_module()
        fields.update(flavour=flavour, version=trt.__version__)
    return find_artifacts(folder, model, **fields)


def rows_needed(steps: int, num_blocks: int | None, images: int, guided: bool, pipelined: bool = True,
                max_iters: int | None = None) -> int:
    """Engine rows of the plan's widest tick (fine and coarse rows), per image, x2 under guidance.

    Read from the tick plan itself rather than a formula: a pipelined tick can hold more segments than B + 1
    (N=100, B=25: 32 rows).
    """
    plan = build_tick_plan(steps, num_blocks, max_iters, pipelined)
    widest = max((tick.rows for tick in plan.ticks), default=1)
    return max(1, widest) * images * (2 if guided else 1)


@dataclass(frozen=True)
class CallTiming:
    """How long a runtime call took, and how much of it was one-time work (engine, buffers, tables, graphs)."""

    first_call: bool  # this call built the runner
    setup_s: float  # engine + runner construction + warm-up/capture, 0 on a cached runner


class RuntimeSampler:
    """One engine and a cache of runners keyed by (kind, grid, images, blocks, ...): built and captured on the
    first call with a key, replayed by every later one (one warm-up per runner, never per call)."""

    def __init__(self, backend: str, loaded, *, device: torch.device, dtype: torch.dtype, engine_dir: str | Path | None = None,
                 process_group=None):
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if backend == "tensorrt" and device.type != "cuda":
            raise EngineError("--backend tensorrt needs a CUDA GPU (--device cuda)")
        if backend == "onnxruntime" and device.type != "cpu":
            raise EngineError("--backend onnxruntime runs on the CPU (--device cpu)")
        self.backend, self.loaded, self.device, self.dtype = backend, loaded, device, dtype
        self.engine_dir = Path(engine_dir or DEFAULT_ENGINE_DIR)
        # fail early (before any sampling) when no export of this model exists at all; the one that fits a run's
        # rows is chosen on first use, when the rows are known
        self.artifacts = None if backend == "torch" else artifact_folder(self.engine_dir, loaded.spec.name, backend)
        self.engine: Engine | None = None
        # torch.distributed: each engine call's rows are split across the group's ranks (distributed.ShardedEngine);
        # every rank builds the same runners and gets the same samples
        self.process_group = process_group
        self.noise_floor = 0.0
        self.noise_floor_rows = 0
        self.runners = RunnerCache()  # least recently used first; trim(budget) bounds it (the server, --cache-mb)
        self.runner_builds = 0  # runners constructed (and captured) so far: one per key
        self._capacity: tuple | None = None  # (manifest versions, widest max_batch)
        self.last_window_stats = None  # the last sliding-window run's host reads (window_runner.WindowStats)

    def capacity(self) -> int | None:
        """Rows one engine call may hold, all ranks together: the export's profile maximum; None for the PyTorch
        model (it takes any row count)."""
        if self.artifacts is None:
            return None
        from ..export.artifacts import MANIFEST_NAME, ArtifactError, read_manifest
        from .distributed import group_size

        folders = [Path(self.artifacts)]
        if not (self.engine_dir / MANIFEST_NAME).is_file():  # the folder above several exports: the widest serves
            folders += [m.parent for m in sorted((self.engine_dir / self.loaded.spec.name).glob(f"*/{MANIFEST_NAME}"))]
        key = tuple((str(f), (f / MANIFEST_NAME).stat().st_mtime_ns) for f in folders if (f / MANIFEST_NAME).is_file())
        if self._capacity is None or self._capacity[0] != key:  # parsed once per set of manifest versions
            widest = 0
            for folder in folders:
                try:
                    widest = max(widest, int(read_manifest(folder)["request"]["max_batch"]))
                except ArtifactError:  # an unreadable sibling export: find_artifacts skips it too
                    continue
            self._capacity = (key, widest)
        return self._capacity[1] * group_size(self.process_group)

    def engine_for(self, rows: int) -> Engine:
        """The engine that serves calls of up to `rows` rows (all ranks together): the one built so far if it holds
        them, else built (or rebuilt larger) now, sharded over the process group; kept for later calls."""
        if self.engine is not None and self.engine.max_rows >= rows:
            return self.engine
        from .distributed import group_size

        world = group_size(self.process_group)
        total, rows = rows, -(-rows // world)  # this rank's slice of the widest call
        self._build_engine(rows)
        if world > 1:
            from .distributed import ShardedEngine

            self.engine = ShardedEngine(self.engine, self.process_group)
        rows = total
        return self._check_engine(rows)

    def _build_engine(self, rows: int) -> None:
        if self.backend == "torch":
            # the runners capture their own graphs around the engine call: the engine itself stays eager
            self.engine = torch_engine(self.loaded, device=self.device, dtype=self.dtype, max_rows=rows, cuda_graphs=False)
        else:
            try:
                self.artifacts = artifact_folder(self.engine_dir, self.loaded.spec.name, self.backend, rows)
            except Exception as exc:  # ArtifactError: no export covers these rows; keep the one found up front
                if self.artifacts is None:
                    raise
                from ..export.artifacts import ArtifactError

                if not isinstance(exc, ArtifactError):
                    raise
            if self.backend == "onnxruntime":
                from .engines.onnxruntime_engine import OnnxRuntimeEngine

                self.engine = OnnxRuntimeEngine(self.artifacts, max_rows=rows)
            else:
                from .engines.tensorrt_engine import TensorRTEngine

                self.engine = TensorRTEngine(self.artifacts, device=self.device)

    def _check_engine(self, rows: int) -> Engine:
        if self.engine.max_rows < rows:
            raise EngineError(f"this run needs {rows} engine rows but the export at {self.artifacts} holds "
                              f"{self.engine.max_rows}; re-export with --max-batch {rows} (or use fewer --num-images "
                              "or --blocks)")
        # measured at the widest bucket this run uses: that is where batched kernels differ most from single rows
        self.noise_floor_rows = self.engine.bucket_for(rows)
        self.noise_floor = self.engine.measure_noise_floor(self.noise_floor_rows)
        self.runners.clear()
        return self.engine

    def trim(self, budget_bytes: int | None) -> int:
        """Drop least recently used runners until the rest hold <= budget_bytes of tensors (None: keep all) and
        return the bytes still held; the engine is shared and never counted. runners.evictions counts drops."""
        held = self.runners.trim(budget_bytes, skip=self.engine)
        if budget_bytes is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return held

    def _runner(self, key: tuple, rows: int, build: Callable[[Engine], object]) -> tuple[object, CallTiming]:
        runner = self.runners.get(key) if self.engine is not None and self.engine.max_rows >= rows else None
        if runner is not None:
            return runner, CallTiming(first_call=False, setup_s=0.0)
        start = _now(self.device)
        engine = self.engine_for(rows)
        runner = self.runners.put(key, build(engine))
        runner.capture()  # warm-up + CUDA-graph capture, once per runner
        self.runner_builds += 1
        return runner, CallTiming(first_call=True, setup_s=_now(self.device) - start)

    def srds(self, x: Tensor, cond: Tensor, uncond: Tensor, *, scale: float, timesteps: Tensor, alphas_cumprod: Tensor,
             prediction_type: str, tol: float, num_blocks: int | None, max_iters: int | None, pipelined: bool,
             progress: Callable[[int, float], None] | None) -> tuple[RunResult, CallTiming]:
        guided = scale != 1.0
        rows = rows_needed(len(timesteps) - 1, num_blocks, x.shape[0], guided, pipelined, max_iters)
        key = ("srds", tuple(timesteps.tolist()), x.shape[0], num_blocks, max_iters, pipelined, guided, prediction_type)
        runner, timing = self._runner(key, rows, lambda engine: SRDSRunner(
            engine, batch=x.shape[0], timesteps=timesteps, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type,
            num_blocks=num_blocks, max_iters=max_iters, pipelined=pipelined, guided=guided, noise_floor=self.noise_floor))
        result = runner.run(x.float(), cond, uncond if guided else None, guidance_scale=scale, tol=tol, progress=progress)
        return result, timing

    def window(self, sampler: str, x: Tensor, cond: Tensor, uncond: Tensor, *, scale: float, timesteps: Tensor,
               alphas_cumprod: Tensor, prediction_type: str, tol: float, window: int | None, max_iters: int | None,
               progress: Callable[[int, float], None] | None) -> tuple[RunResult, CallTiming]:
        """A sliding-window sampler ("eps-picard", "paradigms") on a WindowRunner: one captured sweep program per
        key, one host read per sweep (runner.last_run: host_reads, host_read_s). max_iters is per run."""
        guided = scale != 1.0
        rows = window_rows(sampler, len(timesteps) - 1, window, x.shape[0], guided)
        key = (sampler, tuple(timesteps.tolist()), x.shape[0], window, guided, prediction_type)
        runner, timing = self._runner(key, rows, lambda engine: WindowRunner(
            engine, sampler=sampler, batch=x.shape[0], timesteps=timesteps, alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type, window=window, guided=guided, noise_floor=self.noise_floor))
        # tol: the caller's max-abs distance to serial, run as the calibrated per-point threshold (samplers.run_at_tol,
        # as the reference samplers); the runner may raise that threshold above its engine's noise floor
        result = run_at_tol(sampler, tol, lambda threshold: runner.run(
            x.float(), cond, uncond if guided else None, guidance_scale=scale, tol=threshold, max_iters=max_iters,
            progress=progress))
        self.last_window_stats = runner.last_run
        return result, timing

    def serial(self, x: Tensor, cond: Tensor, uncond: Tensor, *, scale: float, timesteps: Tensor, alphas_cumprod: Tensor,
               prediction_type: str, step: Callable[[], None] | None = None) -> tuple[Tensor, CallTiming]:
        guided = scale != 1.0
        key = ("serial", tuple(timesteps.tolist()), x.shape[0], guided, prediction_type)
        runner, timing = self._runner(key, x.shape[0] * (2 if guided else 1), lambda engine: SerialRunner(
            engine, batch=x.shape[0], timesteps=timesteps, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type,
            guided=guided))
        return runner.run(x.float(), cond, uncond if guided else None, guidance_scale=scale, step=step), timing
