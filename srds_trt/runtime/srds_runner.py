"""The SRDS runtime: walks a schedule.Plan on an Engine with static buffers, CUDA graphs and two streams.

Per tick (one batched model call, schedule.py) the work is a fixed-shape program over static buffers:

    gather the tick's rows from the state pool -> engine call (rows doubled under guidance) -> guidance ->
    DDIM update -> scatter into the pool -> form the boundaries that became ready: U = G_new + (F - G_old)

The row indices, timesteps and solver coefficients of every tick are precomputed (slots.py) and copied into the
program's static meta buffer before it runs, so one CUDA graph per (lane, bucket) serves every tick: a tick is a
device-to-device copy and a graph replay. States live in fp32 (the correction is formed there) whatever the
engine's precision.

coarse = "merged":  coarse rows ride in the same call as the fine rows (one call per tick).
coarse = "separate":  coarse rows get their own call, on the same stream (the baseline for "overlap").
coarse = "overlap": coarse rows get their own call on a second stream and engine lane, ordered with events,
                    running beside the fine call of the same tick.

Convergence is read without a host sync on the critical path: when an iteration completes, its residual is
reduced on the device, copied to pinned memory with an event, and the host looks at it when the event has
fired; ticks launched meanwhile are speculative and harmless, because slots are never reused. The host runs
ahead of the GPU, though (on an H100 it had queued all 35 remaining ticks before a digits residual landed), so
it waits for a pending residual once it is `lookahead` ticks ahead of it: the GPU still has those ticks queued
while the host reads the value, and the speculation is bounded. On CPU the same programs run eagerly, without streams or graphs, and give `srds_sample`'s results.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .engines.base import Engine, EngineError
from ..sampling import SampleResult
from ..stopping import DEFAULT_TOL, NonFiniteError, StoppingRule, check_tol
from ..schedule import Plan, build_tick_plan
from ..solvers import alphas_at, as_grid, check_solver, ddim_coefficients, ddim_update
from .engine_call import guided_call, load_conditioning
from .tables import SINK, X_T, ZERO, CallRows, Formations, SlotMap, slot_map, tick_formations, tick_rows

COARSE_MODES = ("merged", "separate", "overlap")


NOISE_MARGIN = 4.0  # residuals plateau at about twice the per-call floor (seen on an H200); stop above that


def effective_tol(tol: float, noise_floor: float) -> float:
    """The tolerance actually used: never below NOISE_MARGIN x the engine's batch-noise floor (tol = 0 stays 0)."""
    return max(tol, NOISE_MARGIN * noise_floor) if tol > 0 else 0.0


RunResult = SampleResult  # one result type for every sampler and runner (sampling.SampleResult)


class _Program:
    """A fixed-shape piece of tick work with its static meta buffer(s), optionally captured as a CUDA graph.

    Call programs also carry the engine bucket they fill and, when formations ride along (coarse="merged"),
    the formation meta buffer; the formation-only program has neither.
    """

    def __init__(self, fn: Callable[[], None], meta: Tensor, *, bucket: int | None = None, form_meta: Tensor | None = None):
        self.fn, self.meta, self.bucket, self.form_meta = fn, meta, bucket, form_meta
        self.graph: torch.cuda.CUDAGraph | None = None

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


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
        check_solver("ddim", prediction_type)
        if coarse not in COARSE_MODES:
            raise ValueError(f"coarse must be one of {COARSE_MODES}, got {coarse!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        on_cuda = engine.device.type == "cuda"
        if coarse == "overlap" and not on_cuda:
            coarse = "separate"  # no second stream on CPU: same work, same results
        if coarse == "overlap" and engine.lanes < 2:
            raise EngineError("coarse='overlap' needs an engine with 2 lanes (buffers/contexts for two streams)")
        self.engine, self.batch, self.guided, self.coarse = engine, batch, guided, coarse
        # Batched kernels are not batch-invariant: a row differs by up to `noise_floor` between batch sizes
        # (engines.measure_noise_floor). Residuals cannot fall below that, so a positive tol is raised to a
        # margin above it; tol = 0 keeps its meaning (run all B iterations).
        self.noise_floor = noise_floor
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 tick, got {lookahead}")
        self.lookahead = lookahead
        self.device = engine.device
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs a CUDA engine")
        timesteps = as_grid(timesteps)
        self.timesteps = timesteps
        self.plan: Plan = build_tick_plan(len(timesteps) - 1, num_blocks, max_iters, pipelined)
        self.slots: SlotMap = slot_map(self.plan)
        self.pool = torch.zeros(self.slots.count * batch, *engine.spec.sample_shape, dtype=state_dtype, device=self.device)
        self.scale = torch.ones((), dtype=state_dtype, device=self.device)
        self._alphas = alphas_at(timesteps, alphas_cumprod)
        self._prediction_type = prediction_type

        factor = 2 if guided else 1
        self.caps = tuple(b // factor for b in engine.buckets if b % factor == 0)
        if not self.caps:
            raise EngineError(f"engine buckets {engine.buckets} hold no even row count for guidance")
        self._form_cap = max(1, max(len(t.ready) for t in self.plan.ticks)) * batch
        split = coarse != "merged"
        self._lane = {"all": 0, "fine": 0, "coarse": 1 if coarse == "overlap" else 0}
        kinds = ("fine", "coarse") if split else ("all",)
        # Per tick: (cap, meta table) for each call kind; None where the tick has no rows of that kind.
        self._tables: dict[str, list[tuple[int, Tensor] | None]] = {k: [] for k in kinds}
        self._form_tables: list[Tensor] = []
        for i in range(len(self.plan.ticks)):
            for kind in kinds:
                rows = tick_rows(self.plan, self.slots, i, kind)
                self._tables[kind].append(self._call_table(rows) if rows.inputs else None)
            self._form_tables.append(self._form_table(tick_formations(self.plan, self.slots, i)))
        self._programs: dict[tuple[str, int], _Program] = {}
        for kind in kinds:
            for cap in sorted({entry[0] for entry in self._tables[kind] if entry is not None}):
                self._programs[(kind, cap)] = self._call_program(kind, cap, with_formation=not split)
        if split:
            self._programs[("form", self._form_cap)] = self._form_program()
        self._residual_index = self._residual_rows()
        if on_cuda:
            self._streams = {0: torch.cuda.Stream(self.device), 1: torch.cuda.Stream(self.device)}
            self._events = (torch.cuda.Event(), torch.cuda.Event())
            self._res_host = torch.zeros(self.plan.max_iters + 1, self.plan.num_blocks, dtype=torch.float64, pin_memory=True)
        # res[p, b - 1] = max |U[p][b] - U[p-1][b]| (stopping.StoppingRule's input); b < p stays 0 (exact boundaries)
        self._res_dev = torch.zeros(self.plan.max_iters + 1, self.plan.num_blocks, dtype=torch.float64, device=self.device)
        self._captured = False
        self._pending_events: dict[int, torch.cuda.Event] = {}

    # ----- tables (host work, once per runner) -----
    def _rows(self, slots: tuple[int, ...]) -> list[int]:
        return [s * self.batch + i for s in slots for i in range(self.batch)]

    def _cap_for(self, rows: int) -> int:
        for cap in self.caps:
            if cap >= rows:
                return cap
        raise EngineError(
            f"a tick needs {rows} state rows ({rows * (2 if self.guided else 1)} engine rows) but the engine holds "
            f"{self.engine.max_rows}: use fewer blocks or images, or a larger max batch"
        )

    def _call_table(self, rows: CallRows) -> tuple[int, Tensor]:
        src, dst = self._rows(rows.inputs), self._rows(rows.outputs)
        a_from, a_to = self._alphas[list(rows.steps_from)], self._alphas[list(rows.steps_to)]
        c_x, c_out = ddim_coefficients(a_from, a_to, self._prediction_type)
        t = self.timesteps[list(rows.steps_from)].to(torch.float64)
        per_row = lambda v: v.repeat_interleave(self.batch)  # noqa: E731 — slot-level to row-level
        cap = self._cap_for(len(src))
        pad = cap - len(src)
        table = torch.zeros(5, cap, dtype=torch.float64)
        table[0] = torch.tensor(src + [ZERO * self.batch] * pad, dtype=torch.float64)
        table[1] = torch.tensor(dst + [SINK * self.batch] * pad, dtype=torch.float64)
        table[2, : len(src)] = per_row(t)
        table[2, len(src):] = float(t[0])  # a real timestep keeps padding rows finite
        table[3, : len(src)] = per_row(c_x)
        table[4, : len(src)] = per_row(c_out)
        return cap, table.to(self.device)

    def _form_table(self, form: Formations) -> Tensor:
        table = torch.zeros(4, self._form_cap, dtype=torch.float64)
        table[0] = SINK * self.batch
        for k, rows in enumerate((form.out, form.a, form.b, form.c)):
            values = self._rows(rows)
            table[k, : len(values)] = torch.tensor(values, dtype=torch.float64)
        return table.to(self.device)

    def _residual_rows(self) -> list[tuple[Tensor, Tensor]]:
        """Pool rows compared by iteration p's residual: U[p][b] vs U[p-1][b] for b = p..B (p = 0: U[0] vs 0)."""
        out = []
        for p in range(self.plan.max_iters + 1):
            bs = range(max(p, 1), self.plan.num_blocks + 1)
            new = self._rows(tuple(self.slots.U[(p, b)] for b in bs))
            old = self._rows(tuple(self.slots.U[(p - 1, b)] if p else ZERO for b in bs))
            out.append((torch.tensor(new, device=self.device), torch.tensor(old, device=self.device)))
        return out

    # ----- programs (device work; graph-capturable: fixed shapes, static buffers, no host sync) -----
    def _call_program(self, kind: str, cap: int, with_formation: bool) -> _Program:
        engine, lane = self.engine, self._lane[kind]
        factor = 2 if self.guided else 1
        bucket = cap * factor
        meta = torch.zeros(5, cap, dtype=torch.float64, device=self.device)
        form_meta = torch.zeros(4, self._form_cap, dtype=torch.float64, device=self.device) if with_formation else None

        def fn() -> None:
            src, dst = meta[0].long(), meta[1].long()
            x = self.pool.index_select(0, src)
            out = guided_call(engine, bucket, lane, x, meta[2], self.scale if self.guided else None)
            self.pool.index_copy_(0, dst, ddim_update(x, out, meta[3], meta[4]))
            if form_meta is not None:
                self._form(form_meta)

        return _Program(fn, meta, bucket=bucket, form_meta=form_meta)

    def _form(self, form_meta: Tensor) -> None:
        out, a, b, c = (form_meta[k].long() for k in range(4))
        pool = self.pool
        pool.index_copy_(0, out, pool.index_select(0, a) + (pool.index_select(0, b) - pool.index_select(0, c)))

    def _form_program(self) -> _Program:
        meta = torch.zeros(4, self._form_cap, dtype=torch.float64, device=self.device)
        return _Program(lambda: self._form(meta), meta)

    def _set_neutral_meta(self) -> None:
        """Meta that only reads ZERO and writes SINK: safe for warm-up and capture."""
        for program in self._programs.values():
            if program.meta.shape[0] == 5:
                program.meta.zero_()
                program.meta[0].fill_(ZERO * self.batch)
                program.meta[1].fill_(SINK * self.batch)
                program.meta[2].fill_(float(self.timesteps[0]))
            else:
                program.meta.zero_()
                program.meta[0].fill_(SINK * self.batch)
            if program.form_meta is not None:
                program.form_meta.zero_()
                program.form_meta[0].fill_(SINK * self.batch)

    def capture(self) -> None:
        """Warm up every program, then capture each as a CUDA graph; one memory pool per stream lane."""
        if self._captured or not self.cuda_graphs:
            return
        self._set_neutral_meta()
        pools: dict[int, object] = {}
        for key, program in sorted(self._programs.items(), key=lambda kv: -kv[0][1]):
            lane = self._lane.get(key[0], 0)
            stream = self._streams[lane]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                program.fn()  # warm-up outside capture: lazy init, allocator growth
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pools.get(lane), stream=stream):
                program.fn()
            pools[lane] = graph.pool()
            program.graph = graph
        torch.cuda.synchronize(self.device)
        self._captured = True

    # ----- one generation -----
    def run(
        self,
        x: Tensor,
        cond: Tensor,
        uncond: Tensor | None = None,
        *,
        guidance_scale: float = 1.0,
        tol: float = DEFAULT_TOL,
        progress: Callable[[int, float], None] | None = None,
    ) -> SampleResult:
        """SRDS from x_T = x [batch, C, H, W] with per-image conditioning; returns the iterate the rule accepts."""
        if x.shape != (self.batch, *self.engine.spec.sample_shape):
            raise ValueError(f"x must have shape {(self.batch, *self.engine.spec.sample_shape)}, got {tuple(x.shape)}")
        if self.guided and uncond is None:
            raise ValueError("this runner was built for guidance: pass uncond")
        tol = effective_tol(check_tol(tol), self.noise_floor)
        rule = StoppingRule(tol, self.plan.num_blocks)
        self.capture()
        self.scale.fill_(guidance_scale)
        self._load_conditioning(cond, uncond)
        self.pool.view(self.slots.count, self.batch, *x.shape[1:])[X_T].copy_(x)
        self.pool.view(self.slots.count, self.batch, *x.shape[1:])[ZERO].zero_()

        on_cuda = self.device.type == "cuda"
        main = self._streams[0] if on_cuda else None
        if on_cuda:
            main.wait_stream(torch.cuda.current_stream(self.device))
            self._streams[1].wait_stream(torch.cuda.current_stream(self.device))
        pending: list[tuple[int, int]] = []  # (iteration, tick its residual was launched at)
        calls: dict[int, int] = {}
        model_evals = 0
        stop: int | None = None
        launched = 0
        for i, tick in enumerate(self.plan.ticks):
            model_evals += tick.rows * self.batch
            self._launch_tick(i, calls)
            launched = i + 1
            for p in tick.completes:
                self._launch_residual(p)
                pending.append((p, i))
            stop = self._poll(pending, rule, progress, now=i)
            if stop is not None:
                break
        if stop is None:
            stop = self._poll(pending, rule, progress, now=None)
        if stop is None:  # only with max_iters = 0
            stop = 0
        if on_cuda:  # speculative ticks may still run; the returned iterate's slot is never written again
            torch.cuda.current_stream(self.device).wait_stream(main)
            torch.cuda.current_stream(self.device).wait_stream(self._streams[1])
        rows = self.pool.view(self.slots.count, self.batch, *x.shape[1:])
        sample = rows[self.slots.U[(stop, self.plan.num_blocks)]].clone()
        exact = stop == self.plan.num_blocks
        return SampleResult(
            sample=sample.to(x.dtype),
            sampler="srds",
            iterations=stop,
            num_blocks=self.plan.num_blocks,
            model_evals=model_evals,
            sequential_calls=self.plan.ticks_until(stop),
            ticks_launched=launched,
            engine_calls=calls,
            residuals=rule.residuals[:stop],
            error_estimates=rule.estimates[:stop],
            boundary_changes=rule.boundary_changes[:stop],
            converged=stop > 0 and (exact or rule.estimates[stop - 1] <= tol),
            tol=tol,
        )

    def _load_conditioning(self, cond: Tensor, uncond: Tensor | None) -> None:
        """Fill the static cond buffer of every bucket (and lane) a program uses."""
        factor = 2 if self.guided else 1
        halves = [uncond, cond] if self.guided else [cond]
        buckets = {p.bucket for p in self._programs.values() if p.bucket is not None}
        for bucket in buckets:
            for lane in set(self._lane.values()):
                load_conditioning(self.engine, bucket, lane, bucket // factor, self.batch, halves)

    def _launch_tick(self, i: int, calls: dict[int, int]) -> None:
        on_cuda = self.device.type == "cuda"
        if self.coarse == "merged":
            cap, table = self._tables["all"][i]
            program = self._programs[("all", cap)]
            with self._on(0):
                program.meta.copy_(table, non_blocking=True)
                program.form_meta.copy_(self._form_tables[i], non_blocking=True)
                program.run()
            calls[program.bucket] = calls.get(program.bucket, 0) + 1
            return
        form = self._programs[("form", self._form_cap)]
        coarse_lane = self._lane["coarse"]
        if on_cuda and coarse_lane == 1:
            self._streams[1].wait_event(self._events[1])  # the previous tick's boundaries exist
        for kind in ("coarse", "fine"):  # coarse first: in overlap mode it runs beside the fine call
            entry = self._tables[kind][i]
            if entry is None:
                continue
            cap, table = entry
            program = self._programs[(kind, cap)]
            with self._on(self._lane[kind]):
                program.meta.copy_(table, non_blocking=True)
                program.run()
                if kind == "coarse" and on_cuda:
                    self._events[0].record(self._streams[self._lane[kind]])
            calls[program.bucket] = calls.get(program.bucket, 0) + 1
        with self._on(0):
            if on_cuda and coarse_lane == 1 and self._tables["coarse"][i] is not None:
                self._streams[0].wait_event(self._events[0])
            form.meta.copy_(self._form_tables[i], non_blocking=True)
            form.run()
            if on_cuda:
                self._events[1].record(self._streams[0])

    def _on(self, lane: int):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(self._streams[lane])

    def _launch_residual(self, p: int) -> None:
        new, old = self._residual_index[p]
        first = max(p, 1)  # boundaries first..B are compared
        with self._on(0):
            diff = (self.pool.index_select(0, new) - self.pool.index_select(0, old)).abs()
            self._res_dev[p, first - 1 :] = diff.view(self.plan.num_blocks - first + 1, -1).amax(1).to(torch.float64)
            if self.device.type == "cuda":
                self._res_host[p].copy_(self._res_dev[p], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._streams[0])
                self._pending_events[p] = event

    def _poll(self, pending, rule: StoppingRule, progress, *, now: int | None) -> int | None:
        """Consume residuals whose copies have landed; return the iteration to stop at, if any.

        now: the tick just launched (None: the plan is done, wait for everything). A residual launched at tick j
        is waited for once now - j >= lookahead.
        """
        while pending:
            p, launched_at = pending[0]
            if self.device.type == "cuda":
                event = self._pending_events[p]
                if now is None or now - launched_at >= self.lookahead:
                    event.synchronize()
                elif not event.query():
                    return None
                changes = self._res_host[p].tolist()
            else:
                changes = self._res_dev[p].tolist()
            pending.pop(0)
            if not all(math.isfinite(c) for c in changes):
                raise NonFiniteError(
                    f"iteration {p}: NaN/Inf in the SRDS state (engine {self.engine.name}, {self.engine.spec.dtype}); "
                    "fp16 overflow is the usual cause: export with upcast attention or run fp32"
                )
            if p == 0:
                continue
            stop = rule.observe(p, changes)
            if progress is not None:
                progress(p, rule.residuals[-1])
            if stop or p == self.plan.max_iters:
                return p
        return None
