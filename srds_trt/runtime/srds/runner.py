"""The SRDS runtime: walks a schedule.Plan on an Engine with static buffers, CUDA graphs and streams.

Per tick (one batched model call, schedule.py) the work is fixed-shape programs over static buffers
(programs.py): gather the tick's rows from the state pool -> engine call (rows doubled under guidance) ->
guidance -> DDIM update -> scatter -> form the boundaries that became ready (U = G_new + (F - G_old)). The tables
of every tick are built once (tables.py) and stacked on the device; programs walk them with device-side
counters, so a tick is one graph replay per program and no host-to-device copy.

The full design note (what was measured, why these choices): docs/design.md, section "Module notes: srds_trt/runtime/srds/runner.py".
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ...samplers.base import SampleResult
from ...samplers.plan import Plan, build_tick_plan
from ...samplers.ddim import as_grid
from ...samplers.solver import resolve_solver
from ...samplers.stopping import DEFAULT_TOL, NonFiniteError, StoppingRule, check_tol
from ..cuda_graphs import capture_graph
from ..engine_call import load_conditioning
from ..engines.base import Engine, EngineError
from ..host import as_tensor, host_stream
from .programs import CallProgram, FormationProgram
from .tables import X_T, ZERO, build_tick_tables, residual_rows, widest_call

COARSE_MODES = ("merged", "separate", "overlap")
NOISE_MARGIN = 4.0  # residuals plateau at about twice the per-call floor (seen on an H200); stop above that
MAIN, COARSE, RESIDUAL = 0, 1, 2  # stream roles; MAIN and COARSE are also engine lanes


def effective_tol(tol: float, noise_floor: float) -> float:
    """The tolerance actually used: never below NOISE_MARGIN x the engine's batch-noise floor (tol = 0 stays 0)."""
    return max(tol, NOISE_MARGIN * noise_floor) if tol > 0 else 0.0


RunResult = SampleResult  # one result type for every sampler and runner (sampling.SampleResult)


@dataclass
class RunStats:
    """What the last run did beyond its SampleResult: where the host waited, and how far it speculated."""

    final_tick: int = -1  # the tick after whose completion the result was handed back
    ticks_launched: int = 0
    residuals_launched: list[int] = field(default_factory=list)  # iterations whose residual was reduced


class _Event:
    """A CUDA event on a GPU; on CPU a record of the tick it stands for (work there is already done)."""

    def __init__(self, on_cuda: bool):
        self.cuda = torch.cuda.Event() if on_cuda else None
        self.tick = -1

    def record(self, stream: Any, tick: int) -> None:
        self.tick = tick
        if self.cuda is not None:
            self.cuda.record(stream)


class SRDSRunner:
    def __init__(
        self,
        engine: Engine,
        *,
        batch: int,
        timesteps: Tensor,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        num_blocks: int | None = None,
        max_iters: int | None = None,
        pipelined: bool = True,
        guided: bool = True,
        coarse: str = "merged",
        cuda_graphs: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
        noise_floor: float = 0.0,
        lookahead: int = 2,
    ):
        resolve_solver(alphas_cumprod, prediction_type)  # validated before any buffer is allocated
        on_cuda = engine.device.type == "cuda"
        self.coarse = _check_coarse(coarse, engine, on_cuda)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 tick, got {lookahead}")
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs a CUDA engine")
        self.engine, self.batch, self.guided, self.device = engine, batch, guided, engine.device
        # Batched kernels are not batch-invariant: residuals cannot fall below the engine's noise floor, so a
        # positive tol is raised to a margin above it (effective_tol); tol = 0 keeps its meaning.
        self.noise_floor, self.lookahead = noise_floor, lookahead
        self.timesteps = as_grid(timesteps)
        self.plan: Plan = build_tick_plan(len(self.timesteps) - 1, num_blocks, max_iters, pipelined)

        factor = 2 if guided else 1
        caps = tuple(b // factor for b in engine.buckets if b % factor == 0)
        split = self.coarse != "merged"
        widest = widest_call(self.plan, split) * batch
        if not caps or widest > caps[-1]:
            raise EngineError(f"a tick needs {widest} state rows ({widest * factor} engine rows) but the engine holds "
                              f"{engine.max_rows}: use fewer blocks or images, or a larger max batch")
        tables = build_tick_tables(self.plan, batch=batch, caps=caps, timesteps=self.timesteps,
                                   alphas_cumprod=alphas_cumprod, prediction_type=prediction_type, split=split,
                                   state_dtype=state_dtype, timestep_dtype=engine.spec.timestep_dtype)
        self.slots, self._schedule = tables.slots, tables.schedule
        self.pool = torch.zeros(self.slots.count * batch, *engine.spec.sample_shape, dtype=state_dtype, device=self.device)
        self.scale = torch.ones((), dtype=state_dtype, device=self.device)
        self._counters = torch.zeros(len(tables.programs), dtype=torch.int64, device=self.device)
        self.programs = [self._program(k, p, factor) for k, p in enumerate(tables.programs)]
        self._neutral = torch.tensor([p.neutral for p in self.programs], dtype=torch.int64, device=self.device)
        self._residual_index = [tuple(t.to(self.device) for t in residual_rows(self.plan, self.slots, batch, p))
                                for p in range(self.plan.max_iters + 1)]
        # changes[p, b - 1] = max |U[p][b] - U[p-1][b]| (StoppingRule's input); b < p stays 0 (exact boundaries)
        self._res_dev = torch.zeros(self.plan.max_iters + 1, self.plan.num_blocks, dtype=torch.float64, device=self.device)
        self._res_host = torch.zeros(self._res_dev.shape, dtype=torch.float64, pin_memory=on_cuda)
        self._streams = {role: torch.cuda.Stream(self.device) for role in (MAIN, COARSE, RESIDUAL)} if on_cuda else {}
        self._tick_done, self._coarse_done, self._entry = (_Event(on_cuda) for _ in range(3))
        self._iteration_done = [_Event(on_cuda) for _ in range(self.plan.max_iters + 1)]
        self._residual_landed = [_Event(on_cuda) for _ in range(self.plan.max_iters + 1)]
        self.capture_failures: dict[str, str] = {}  # program -> why it runs uncaptured
        self._keep_memory_until_streams_finish()
        self._captured = False
        self.last_run = RunStats()

    def _keep_memory_until_streams_finish(self) -> None:
        """run() returns before its speculative ticks finish: freed with the runner, the memory they still use
        must not be handed to new tensors before that work is done (record_stream tells the caching allocator)."""
        tensors = [self.pool, self.scale, self._counters, self._res_dev, *(t for pair in self._residual_index for t in pair)]
        for program in self.programs:
            for table in (getattr(program, "call", None), program.formation):
                if table is not None:
                    tensors.extend(vars(table).values())
        for stream in self._streams.values():
            for tensor in tensors:
                tensor.record_stream(stream)

    def _program(self, k: int, plan, factor: int) -> CallProgram | FormationProgram:
        counter = self._counters[k : k + 1]
        formation = plan.formation.to(self.device) if plan.formation is not None else None
        if plan.kind == "form":
            return FormationProgram(self.pool, formation, counter)
        lane = COARSE if plan.kind == "coarse" and self.coarse == "overlap" else MAIN
        return CallProgram(plan.kind, lane, plan.cap * factor, self.engine, self.pool, plan.call.to(self.device),
                           formation, counter, self.scale if self.guided else None)

    # ----- capture (once per runner) -----
    def capture(self) -> None:
        """Warm up and capture every program (largest first, one memory pool per lane); failures run eagerly."""
        if self._captured:
            return
        self._captured = True
        pools: dict[int, Any] = {}
        for program in sorted(self.programs, key=lambda p: -getattr(p, "cap", 0)):
            counter = program.counter
            counter.fill_(program.neutral)  # the neutral entry reads ZERO and writes SINK
            program.captured = capture_graph(program.fn, device=self.device, enabled=self.cuda_graphs,
                                             pool=pools.get(program.lane), stream=self._streams.get(program.lane))
            if program.captured.failure is not None:
                self.capture_failures[f"{program.kind}:{getattr(program, 'bucket', '-')}"] = program.captured.failure
            pools[program.lane] = program.captured.pool or pools.get(program.lane)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----- one generation -----
    def run(
        self,
        x: Any,
        cond: Any,
        uncond: Any = None,
        *,
        guidance_scale: float = 1.0,
        tol: float = DEFAULT_TOL,
        progress: Callable[[int, float], None] | None = None,
        stream: Any = None,
        out: Any = None,
    ) -> SampleResult:
        """SRDS from x_T = x [batch, C, H, W] with per-image conditioning; returns the iterate the rule accepts.

        x, cond, uncond, out: torch tensors or DLPack producers (viewed, not copied). stream: the host's CUDA
        stream (torch.cuda.Stream, int handle or __cuda_stream__ object; default: the current stream); the run
        starts after the work queued on it and the host stream waits for the result only, not for speculative
        ticks. out: a [batch, C, H, W] buffer to write the sample into (result.sample is then that buffer).
        """
        x = as_tensor(x, "x")
        cond = as_tensor(cond, "cond")
        uncond = None if uncond is None else as_tensor(uncond, "uncond")
        if x.shape != (self.batch, *self.engine.spec.sample_shape):
            raise ValueError(f"x must have shape {(self.batch, *self.engine.spec.sample_shape)}, got {tuple(x.shape)}")
        if self.guided and uncond is None:
            raise ValueError("this runner was built for guidance: pass uncond")
        tol = effective_tol(check_tol(tol), self.noise_floor)
        host = host_stream(stream, self.device)
        rule = StoppingRule(tol, self.plan.num_blocks)
        self.capture()
        self._enter(host, x, cond, uncond, guidance_scale)
        stats = self.last_run = RunStats()
        pending: list[tuple[int, int]] = []  # (iteration, tick its residual was launched after)
        stop = None
        for i, tick in enumerate(self.plan.ticks):
            self._launch_tick(i)
            stats.ticks_launched = i + 1
            for p in tick.completes:
                self._iteration_done[p].record(self._streams.get(MAIN), i)
                if p > 0 or self.plan.max_iters == 0:  # iteration 1's residual covers U[0]'s NaN check
                    self._launch_residual(p, i)
                    pending.append((p, i))
            stop = self._poll(pending, rule, progress, now=i)
            if stop is not None:
                break
        if stop is None:
            stop = self._poll(pending, rule, progress, now=None)
        return self._exit(host, x, stop, rule, tol, out)

    def boundary(self, p: int, b: int) -> Tensor:
        """U[p][b] of the last run ([batch, C, H, W] view of the pool; valid until the next run)."""
        return self._rows()[self.slots.boundary(p, b)]

    def _rows(self) -> Tensor:
        return self.pool.view(self.slots.count, self.batch, *self.engine.spec.sample_shape)

    def _enter(self, host, x: Tensor, cond: Tensor, uncond: Tensor | None, guidance_scale: float) -> None:
        main = self._streams.get(MAIN)
        if main is not None:
            main.wait_stream(host)
        with self._on(MAIN):
            self.scale.fill_(guidance_scale)
            self._load_conditioning(cond, uncond)
            self._rows()[X_T].copy_(x)
            self._rows()[ZERO].zero_()
            self._counters.zero_()
            self._tick_done.record(main, -1)
            self._entry.record(main, -1)
        for role in (COARSE, RESIDUAL):
            if role in self._streams:
                self._streams[role].wait_event(self._entry.cuda)

    def _exit(self, host, x: Tensor, stop: int, rule: StoppingRule, tol: float, out: Any) -> SampleResult:
        done = self._iteration_done[stop]  # the tick that completed the accepted iteration
        self.last_run.final_tick = done.tick
        if host is not None:
            host.wait_event(done.cuda)
            self.pool.record_stream(host)  # the copy-out below reads the pool on the host's stream
        target = None if out is None else as_tensor(out, "out")
        with self._on_stream(host):
            sample = self.boundary(stop, self.plan.num_blocks)
            if target is not None:
                target.copy_(sample)
            else:
                target = sample.to(x.dtype, copy=True)
        calls_until = done.tick + 1
        return SampleResult(
            sample=target, sampler="srds", iterations=stop, num_blocks=self.plan.num_blocks,
            model_evals=sum(t.rows for t in self.plan.ticks[:calls_until]) * self.batch,
            sequential_calls=calls_until, ticks_launched=self.last_run.ticks_launched,
            engine_calls=self._engine_calls(self.last_run.ticks_launched),
            residuals=rule.residuals[:stop], error_estimates=rule.estimates[:stop],
            boundary_changes=rule.boundary_changes[:stop],
            converged=stop > 0 and (stop == self.plan.num_blocks or rule.estimates[stop - 1] <= tol), tol=tol,
        )

    def _engine_calls(self, ticks: int) -> dict[int, int]:
        calls: dict[int, int] = {}
        for step in self._schedule[:ticks]:
            for kind, index in step.items():
                if kind != "form":
                    bucket = self.programs[index].bucket
                    calls[bucket] = calls.get(bucket, 0) + 1
        return calls

    def _load_conditioning(self, cond: Tensor, uncond: Tensor | None) -> None:
        """Fill the static cond buffer of every (bucket, lane) a program uses."""
        halves = [uncond, cond] if self.guided else [cond]
        factor = 2 if self.guided else 1
        for bucket, lane in {(p.bucket, p.lane) for p in self.programs if isinstance(p, CallProgram)}:
            load_conditioning(self.engine, bucket, lane, bucket // factor, self.batch, halves)

    # ----- one tick -----
    def _launch_tick(self, i: int) -> None:
        step = self._schedule[i]
        if "all" in step:
            self._call(step["all"], i)
        else:
            coarse_done = self._call(step.get("coarse"), i)
            self._call(step.get("fine"), i)
            self._form(step["form"], i, after=coarse_done)
        self._tick_done.record(self._streams.get(MAIN), i)

    def _call(self, index: int | None, i: int) -> _Event | None:
        """Run a call program on its lane's stream; a coarse-lane call returns the event its formation waits on."""
        if index is None:
            return None
        program = self.programs[index]
        with self._on(program.lane):
            if program.lane == COARSE:
                self._streams[COARSE].wait_event(self._tick_done.cuda)  # the previous tick's boundaries exist
            program.run()
            if program.lane == COARSE:
                self._coarse_done.record(self._streams[COARSE], i)
                return self._coarse_done
        return None

    def _form(self, index: int, i: int, *, after: _Event | None) -> None:
        with self._on(MAIN):
            if after is not None and after.cuda is not None:
                self._streams[MAIN].wait_event(after.cuda)
            self.programs[index].run()

    def _on(self, role: int):
        return self._on_stream(self._streams.get(role))

    @staticmethod
    def _on_stream(stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    # ----- residuals (off the critical stream) -----
    def _launch_residual(self, p: int, i: int) -> None:
        new, old = self._residual_index[p]
        first = max(p, 1)  # boundaries first..B are compared
        residual = self._streams.get(RESIDUAL)
        if residual is not None:
            residual.wait_event(self._iteration_done[p].cuda)
        with self._on(RESIDUAL):
            diff = (self.pool.index_select(0, new) - self.pool.index_select(0, old)).abs()
            self._res_dev[p, first - 1 :] = diff.view(self.plan.num_blocks - first + 1, -1).amax(1).to(torch.float64)
            self._res_host[p].copy_(self._res_dev[p], non_blocking=residual is not None)
            self._residual_landed[p].record(residual, i)
        self.last_run.residuals_launched.append(p)

    def _poll(self, pending, rule: StoppingRule, progress, *, now: int | None) -> int | None:
        """Consume the residuals that have landed, in order; return the iteration to stop at, if any.

        now: the tick just launched (None: the plan is done, wait for everything). A residual launched at tick j
        is waited for once now - j >= lookahead; on a GPU it is taken earlier if its event has already fired.
        """
        while pending:
            p, launched_at = pending[0]
            event = self._residual_landed[p].cuda
            due = now is None or now - launched_at >= self.lookahead
            if not due and (event is None or not event.query()):
                return None
            if event is not None:
                event.synchronize()
            pending.pop(0)
            changes = self._res_host[p].tolist()
            if not all(math.isfinite(c) for c in changes):
                raise NonFiniteError(
                    f"iteration {p}: NaN/Inf in the SRDS state (engine {self.engine.name}, {self.engine.spec.dtype}); "
                    "fp16 overflow is the usual cause: export with upcast attention or run fp32"
                )
            if p == 0:
                return 0  # max_iters = 0: the coarse sample, checked finite
            stop = rule.observe(p, changes)
            if progress is not None:
                progress(p, rule.residuals[-1])
            if stop or p == self.plan.max_iters:
                return p
        return None


def _check_coarse(coarse: str, engine: Engine, on_cuda: bool) -> str:
    if coarse not in COARSE_MODES:
        raise ValueError(f"coarse must be one of {COARSE_MODES}, got {coarse!r}")
    if coarse == "overlap" and not on_cuda:
        return "separate"  # no second stream on CPU: same work, same results
    if coarse == "overlap" and engine.lanes < 2:
        raise EngineError("coarse='overlap' needs an engine with 2 lanes (buffers/contexts for two streams)")
    return coarse
