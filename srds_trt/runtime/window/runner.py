"""The sliding-window samplers (eps-Picard, ParaDiGMS) on the runtime: one captured sweep, one host read per sweep.

A sweep is one fixed-shape program over static buffers: gather the window's w states and tables by a
device-held window start `begin`; ONE engine call at a fixed bucket; the algorithm's update (a subclass:
EpsPicardRunner, ParadigmsRunner); the slide (a device argmax) and the points entering the window; a 3-entry
status [begin, slide, residual] that the host reads once per sweep (pinned memory + event on a GPU). Only the
host needs the slide, so ONE captured program serves every sweep, tail included: every table is padded past N
by identity steps and a `valid = j < N` mask keeps padding out of the residual and the slide.

Iterate-for-iterate the same as the reference functions (tests/runtime/test_runtime_window.py compares every
sweep short of convergence). Design notes and measurements: docs/runtime-window.md.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ...samplers.base import SampleResult
from ...samplers.ddim import as_grid, ddim_update
from ...samplers.solver import resolve_solver
from ...samplers.eps_picard import EpsPicardOptions, extrapolation_weights
from ...samplers.paradigms import DEFAULT_TOLERANCE as PARADIGMS_TOLERANCE
from ...samplers.stopping import DEFAULT_TOL, NonFiniteError, check_tol
from ...samplers.window import check_window_sampler, resolve_window, window_result
from . import fused
from ..cuda_graphs import CapturedGraph, capture_graph
from ..engine_call import guided_call, load_conditioning
from ..engines.base import Engine, EngineError
from ..host import as_tensor, host_stream
from ..srds.runner import effective_tol

BEGIN, SLIDE, RESIDUAL = 0, 1, 2  # entries of the per-sweep status the host reads


@dataclass
class WindowStats:
    """What the last run did beyond its SampleResult: the host reads that decide the slide, measured."""

    sweeps: int = 0
    host_reads: int = 0
    host_read_s: float = 0.0  # wall time the host spent waiting for and reading the per-sweep status
    begins: list[int] = field(default_factory=list)  # window start before each sweep

    @property
    def host_read_ms_per_sweep(self) -> float:
        return 1e3 * self.host_read_s / max(1, self.host_reads)


class WindowRunner:
    """One sliding-window sampler on an engine: the shared sweep (gather, call, slide, status) over static buffers.
    Each algorithm is a subclass with its own update and entering rule (EpsPicardRunner, ParadigmsRunner);
    WindowRunner(engine, sampler=NAME, ...) builds the one registered for NAME in WINDOW_RUNNERS."""

    sampler: str
    default_tol: float

    def __new__(cls, *args: Any, sampler: str = "eps-picard", **kwargs: Any):
        if cls is WindowRunner:
            check_window_sampler(sampler)
            cls = WINDOW_RUNNERS[sampler]
        return super().__new__(cls)

    def __init__(
        self,
        engine: Engine,
        *,
        sampler: str = "eps-picard",
        batch: int,
        timesteps: Tensor,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        window: int | None = None,
        guided: bool = True,
        cuda_graphs: bool | None = None,
        state_dtype: torch.dtype = torch.float32,
        noise_floor: float = 0.0,
        fused_chains: bool | None = None,
        options: EpsPicardOptions | None = None,
    ):
        if sampler != self.sampler:
            raise ValueError(f"{type(self).__name__} runs {self.sampler}, not {sampler!r}")
        ode = resolve_solver(alphas_cumprod, prediction_type)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        on_cuda = engine.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs a CUDA engine")
        self.engine, self.batch, self.guided = engine, batch, guided
        self.device, self.dtype, self.noise_floor = engine.device, state_dtype, noise_floor
        # eps-Picard's two sequential chains as one Triton launch each (fused.py): by default where available
        # (CUDA, float32, Triton importable); False runs the torch loops (the reference for the fused kernels)
        self.fused = fused.available(self.device, self.dtype) if fused_chains is None else fused_chains
        if self.fused and not fused.available(self.device, self.dtype):
            raise ValueError("fused_chains=True needs CUDA, float32 states and Triton")
        self._set_options(options)
        timesteps = as_grid(timesteps)
        self.steps = n = len(timesteps) - 1
        self.window = w = resolve_window(sampler, n, window)
        factor = 2 if guided else 1
        rows = w * batch * factor
        if rows > engine.max_rows:
            raise EngineError(f"a {sampler} sweep needs {rows} engine rows (window {w} x {batch} images x {factor}) "
                              f"but the engine holds {engine.max_rows}: use a smaller window, fewer images or a "
                              "larger max batch")
        self.bucket = engine.bucket_for(rows)

        # Tables padded past the grid end by identity steps, so a window hanging over N needs no other program.
        pad = w + 2
        c_x, c_out = ode.coefficients(timesteps[:-1], timesteps[1:])
        ones, zeros = torch.ones(pad, dtype=torch.float64), torch.zeros(pad, dtype=torch.float64)
        dev = dict(device=self.device)
        self._c_x = torch.cat([c_x, ones]).to(**dev, dtype=state_dtype)
        self._c_out = torch.cat([c_out, zeros]).to(**dev, dtype=state_dtype)
        self._drift = torch.cat([c_x - 1, zeros]).to(**dev, dtype=state_dtype)  # ParaDiGMS: the update, not the state
        self._prior = torch.cat([ode.prior_slope(timesteps[:-1]), zeros]).to(**dev, dtype=state_dtype)
        self._var = torch.cat([ode.noise_variance(timesteps), zeros]).to(**dev)  # ParaDiGMS thresholds / tol^2, float64
        self._t = torch.cat([timesteps[:-1].to(torch.float64), timesteps[-2:-1].to(torch.float64).expand(pad)]
                            ).to(**dev, dtype=engine.spec.timestep_dtype)
        if self.warm_start:
            weights = extrapolation_table(ode, timesteps, w, self.options.extrapolate)
            self._weights = weights.to(**dev, dtype=state_dtype)  # [(N + 1) * w, 3]: row old_end * w + offset
        self._nodes = torch.arange(3, **dev)  # extrapolation nodes old_end - 1 - k
        self._points_w = torch.arange(w, **dev)  # window point i = begin + i
        self._points_w1 = torch.arange(w + 1, **dev)  # its states: begin .. begin + w
        self._row_point = torch.arange(w * batch, **dev) // batch  # engine row r belongs to window point r // batch
        self._sentinel = torch.ones(1, dtype=torch.bool, **dev)

        sample = engine.spec.sample_shape
        self.points = torch.zeros(n + pad + 1, batch, *sample, dtype=state_dtype, **dev)  # points[j]: state at t_j
        self.outs = torch.zeros(n + pad, batch, *sample, dtype=state_dtype, **dev)  # eps-Picard: newest output
        self.used = torch.zeros_like(self.outs)  # the output the last propagation used at point j (slope-corrected)
        self._warm_source = self.used  # the warm start extrapolates the outputs the last propagation used
        self.evaluated_at = torch.zeros_like(self.outs)  # the state outs[j] was evaluated at
        self.has_eval = torch.zeros(n + pad, dtype=torch.bool, **dev)  # False: never evaluated (or warm-started)
        self.slopes = torch.zeros(n + pad, batch, *([1] * len(sample)), dtype=state_dtype, **dev)  # 0: no secant
        self.begin = torch.zeros(1, dtype=torch.int64, **dev)
        self.scale = torch.ones((), dtype=state_dtype, **dev)
        self.tol = torch.zeros((), dtype=state_dtype, **dev)  # eps-Picard: max-abs change in units of x
        self.tol_sq = torch.zeros((), dtype=torch.float64, **dev)  # ParaDiGMS: tol^2 (thresholds = tol^2 sigma_j^2)
        self.status = torch.zeros(3, dtype=torch.float64, **dev)
        self._status_host = torch.zeros(3, dtype=torch.float64, pin_memory=on_cuda)
        self._read_done = torch.cuda.Event() if on_cuda else None
        self.sweep_program: CapturedGraph | None = None
        self.capture_failures: dict[str, str] = {}
        self.last_run = WindowStats()

    # ----- the sweep program (fixed shapes, static buffers, no host read) -----
    def _sweep(self) -> None:
        b, n, w = self.begin, self.steps, self.window
        idx = b + self._points_w
        pts = self.points.index_select(0, b + self._points_w1)  # [w + 1, batch, ...]: states begin .. begin + w
        t = self._t.index_select(0, b + self._row_point)
        out = guided_call(self.engine, self.bucket, 0, pts[:w].flatten(0, 1), t, self.scale if self.guided else None)
        out = out.view(w, *pts.shape[1:])
        valid = idx < n
        span = (n - b).clamp(max=w)  # [1]: window points on the grid
        change, moved, slide, reported = self._update(idx, pts, out, valid, span)
        residual = torch.where(valid, change, torch.zeros_like(change)).amax()
        old_end = b + span
        new_begin = b + slide
        self._enter(new_begin, old_end)
        self.status.copy_(torch.cat([new_begin, reported, residual.reshape(1)]).to(torch.float64))
        b.copy_(new_begin)

    def _first_moved(self, moved: Tensor, valid: Tensor) -> Tensor:
        """Index of the first moved point among the valid ones; a point past N counts as moved, and when none
        moved the sentinel gives w (the reference's `span` either way)."""
        return torch.cat([moved | ~valid, self._sentinel]).int().argmax().reshape(1)

    # ----- what each algorithm defines -----
    def _set_options(self, options: EpsPicardOptions | None) -> None:
        if options is not None:
            raise ValueError(f"{self.sampler} takes no algorithm options, got {options}")
        self.options = None
        self.warm_start = self.secant = self.inherit_slope = self.broyden = self.prior_slope = False

    def _update(self, idx: Tensor, pts: Tensor, out: Tensor, valid: Tensor, span: Tensor):
        """One sweep's state update from the window's model outputs: (change, moved, slide, reported slide)."""
        raise NotImplementedError

    def _run_tol(self, tol: float) -> float:
        return tol

    def _enter(self, new_begin: Tensor, old_end: Tensor) -> None:
        """Points entering the window (j in [old_end, min(new_begin + w, N))): eps-Picard's warm start continues
        the recurrence with the last evaluated output; ParaDiGMS (and warm_start=False) copy x[old_end]."""
        w = self.window
        nidx = new_begin + self._points_w
        entering = (nidx >= old_end) & (nidx < self.steps)
        pts = self.points.index_select(0, new_begin + self._points_w1)
        if self.warm_start:
            # outputs extrapolated (Lagrange, fixed weights per (old_end, offset)) from the outputs the last
            # propagation used at old_end - 1, - 2, - 3, then propagated; unused nodes have weight 0
            nodes = self._warm_source.index_select(0, (old_end - 1 - self._nodes).clamp(min=0))
            offset = (nidx - old_end).clamp(0, w - 1)
            weights = self._weights.index_select(0, old_end * w + offset)  # [w, 3]
            column = lambda k: weights[:, k].view(w, *([1] * (pts.dim() - 1)))  # noqa: E731
            guess = column(0) * nodes[0] + column(1) * nodes[1] + column(2) * nodes[2]  # [w, batch, ...]
            c_x, c_out = (c.index_select(0, nidx).view_as(column(0)) for c in (self._c_x, self._c_out))
            c_guess = c_out * guess  # elementwise, as the reference's c_out[j] * out_j per point
            entering = entering.view_as(column(0))
            self.used.index_copy_(0, nidx, torch.where(entering, guess, self.used.index_select(0, nidx)))
            # the recurrence along the entering points (which ones: data) as x_{i+1} = A_i x_i + B_i, one addcmul
            # per point: entering, A = c_x, B = c_out guess (the reference's step); else A = 0 and B = the old
            # x_{i+1}, kept: 0 * x_i adds 0 because x_i is finite there (a state of this sweep's window, whose
            # NaN/Inf the residual reports, or padding past N, which no valid point reads). B is taken from the
            # old states before the loop overwrites them.
            A = torch.where(entering, c_x, torch.zeros_like(c_x))
            B = torch.where(entering, c_guess, pts[1:])
            if self.fused:  # one Triton launch (fused.py)
                fused.affine_chain(A.contiguous(), B, pts)
            else:
                for i in range(w):
                    torch.addcmul(B[i], A[i], pts[i], out=pts[i + 1])
        else:
            start = self.points.index_select(0, old_end)
            pts[1:] = torch.where(entering.view(w, *([1] * (pts.dim() - 1))), start, pts[1:])
        self.points.index_copy_(0, nidx + 1, pts[1:])

    def capture(self) -> None:
        """Warm up and capture the sweep (once per runner); a failure leaves it eager and says why."""
        if self.sweep_program is not None:
            return
        self.begin.zero_()  # the warm-up sweeps zeros; run() resets every buffer
        self.sweep_program = capture_graph(self._sweep, device=self.device, enabled=self.cuda_graphs)
        if self.sweep_program.failure is not None and self.fused:  # a Triton kernel that does not build or run
            self.capture_failures["fused_chains"] = self.sweep_program.failure  # here: the torch loops instead
            self.fused = False
            self.begin.zero_()
            self.sweep_program = capture_graph(self._sweep, device=self.device, enabled=self.cuda_graphs)
        if self.sweep_program.failure is not None:
            self.capture_failures["sweep"] = self.sweep_program.failure
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
        tol: float | None = None,
        max_iters: int | None = None,
        progress: Callable[[int, float], None] | None = None,
        stream: Any = None,
    ) -> SampleResult:
        """The sampler from x_T = x [batch, C, H, W]; tol defaults to the reference sampler's default.

        tol (eps-Picard: max-abs change in units of x, raised above the engine's noise floor like SRDS's;
        ParaDiGMS: its own per-step RMS knob, paradigms.py) and max_iters (sweeps) are per run: the captured
        program reads tol from a device scalar. stream: the host's CUDA stream (see host.py).
        """
        x, cond = as_tensor(x, "x"), as_tensor(cond, "cond")
        uncond = None if uncond is None else as_tensor(uncond, "uncond")
        if x.shape != (self.batch, *self.engine.spec.sample_shape):
            raise ValueError(f"x must have shape {(self.batch, *self.engine.spec.sample_shape)}, got {tuple(x.shape)}")
        if self.guided and uncond is None:
            raise ValueError("this runner was built for guidance: pass uncond")
        if max_iters is not None and max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {max_iters}")
        tol = self._run_tol(check_tol(self.default_tol if tol is None else tol))
        host = host_stream(stream, self.device)
        self.capture()
        stats = self.last_run = WindowStats()
        residuals: list[float] = []
        slides: list[int] = []
        model_evals, begin = 0, 0
        with torch.cuda.stream(host) if host is not None else contextlib.nullcontext():
            self._reset(x, cond, uncond, guidance_scale, tol)
            while begin < self.steps and (max_iters is None or stats.sweeps < max_iters):
                stats.begins.append(begin)
                self.sweep_program.run()
                stats.sweeps += 1
                model_evals += min(self.window, self.steps - begin) * self.batch
                begin, slide, residual = self._read_status(host)
                residuals.append(residual)
                slides.append(slide)
                if residual != residual or abs(residual) == float("inf"):
                    raise NonFiniteError(f"{self.sampler} sweep {stats.sweeps}: NaN/Inf in the state (engine "
                                         f"{self.engine.name}, {self.engine.spec.dtype}); fp16 overflow is the usual "
                                         "cause: export with upcast attention or run fp32")
                if progress is not None:
                    progress(stats.sweeps, residual)
            # on the host's stream: the copy-out and the finite check are ordered after the last sweep there
            result = window_result(self.sampler, self.points[self.steps].clone(), x, iterations=stats.sweeps,
                                   window=self.window, model_evals=model_evals, residuals=residuals, slides=slides,
                                   converged=begin >= self.steps, tol=tol)
        result.ticks_launched = stats.sweeps
        result.engine_calls = {self.bucket: stats.sweeps} if stats.sweeps else {}
        return result

    def _reset(self, x: Tensor, cond: Tensor, uncond: Tensor | None, guidance_scale: float, tol: float) -> None:
        self.scale.fill_(guidance_scale)
        self.tol.fill_(tol)
        self.tol_sq.fill_(tol**2)
        rows = self.window * self.batch
        load_conditioning(self.engine, self.bucket, 0, rows, self.batch, [uncond, cond] if self.guided else [cond])
        self.points.copy_(x.to(self.device, self.dtype).unsqueeze(0).expand_as(self.points))
        for buffer in (self.outs, self.used, self.evaluated_at, self.slopes, self.has_eval, self.begin):
            buffer.zero_()

    def _read_status(self, host) -> tuple[int, int, float]:
        """THE host read of a sweep: [begin, slide, residual], 24 bytes (pinned + event on a GPU), timed."""
        start = time.perf_counter()
        if host is not None:
            self._status_host.copy_(self.status, non_blocking=True)
            self._read_done.record(host)
            self._read_done.synchronize()
            values = self._status_host.tolist()
        else:
            values = self.status.tolist()
        self.last_run.host_read_s += time.perf_counter() - start
        self.last_run.host_reads += 1
        return int(values[BEGIN]), int(values[SLIDE]), values[RESIDUAL]


def extrapolation_table(ode, timesteps: Tensor, w: int, extrapolate: int) -> Tensor:
    """Warm-start weights, float64 [(N + 1) * w, 3]: row old_end * w + d holds the Lagrange weights (in the
    reference's coordinate) of the nodes old_end - 1 - k, k = 0..order, for the entering point old_end + d;
    weight 0 for unused nodes and for points past the grid. Computed by the reference's own function."""
    steps = len(timesteps) - 1
    table = torch.zeros(steps + 1, w, 3, dtype=torch.float64)
    if extrapolate == 0:  # one node, weight 1 (the empty Lagrange product)
        table[:, :, 0] = 1.0
        return table.view(-1, 3)
    s = warm_start_coordinate(ode, timesteps)
    rows = [[0.0] * 3 for _ in range((steps + 1) * w)]
    for first in range(1, steps + 1):
        order = min(extrapolate, first - 1)
        nodes = [first - 1 - k for k in range(order + 1)]
        for d in range(min(w, steps - first)):
            rows[first * w + d][: order + 1] = extrapolation_weights(s, nodes, first + d)
    table = torch.tensor(rows, dtype=torch.float64).view(steps + 1, w, 3)
    return table.view(-1, 3)


def warm_start_coordinate(ode, timesteps: Tensor) -> list[float]:
    """The coordinate eps_picard.py extrapolates outputs in: lambda = log(sqrt(a / (1 - a))) per grid point (python
    floats, computed as there)."""
    return ode.extrapolation_coordinate(timesteps[:-1]).tolist()  # DDIM lambda, flow sigma (samplers/solver.py)


class EpsPicardRunner(WindowRunner):
    """eps_picard.py's sweep on the runtime (its mechanisms from EpsPicardOptions; research-only ones refused)."""

    sampler = "eps-picard"
    default_tol = DEFAULT_TOL

    def _set_options(self, options: EpsPicardOptions | None) -> None:
        options = options or EpsPicardOptions()
        if options.research():
            raise ValueError(f"research-only eps-Picard options {options.research()}: the runner runs the sampler's "
                             "mechanisms only (warm_start, secant, extrapolate, inherit_slope, broyden, prior_slope)")
        if options.extrapolate not in (0, 1, 2):
            raise ValueError(f"extrapolate must be 0, 1 or 2, got {options.extrapolate}")
        self.options = options
        self.warm_start, self.secant = options.warm_start, options.secant
        self.inherit_slope = self.secant and options.inherit_slope
        self.broyden = self.secant and options.broyden
        self.prior_slope = self.secant and options.prior_slope

    def _run_tol(self, tol: float) -> float:
        return effective_tol(tol, self.noise_floor)  # max-abs change in units of x: above the engine's noise

    def _update(self, idx, pts, out, valid, span):
        """eps_picard.py's sweep: secant slopes from the previous evaluation, then the DDIM recurrence along the
        window with the newest outputs moved along their slopes to this sweep's states."""
        w = self.window
        c_x, c_out = (c.index_select(0, idx) for c in (self._c_x, self._c_out))
        evaluated = pts[:w]  # pts is a copy (index_select) that nothing below writes
        slopes = self.slopes.index_select(0, idx)
        if self.secant:
            dx, dout = pts[:w] - self.evaluated_at.index_select(0, idx), out - self.outs.index_select(0, idx)
            norm = dx.flatten(2).pow(2).sum(2)  # [w, batch]
            slope = (dout * dx).flatten(2).sum(2) / norm.clamp_min(torch.finfo(self.dtype).tiny)
            slope = torch.where(norm > 0, slope, torch.zeros_like(slope)).view_as(slopes)
            if self.broyden:  # rank-1 (Broyden) term of an evaluated point: (dout - s dx, dx / |dx|^2); else 0
                inv = torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(self.dtype).tiny), torch.zeros_like(norm))
                evaluated_before = self.has_eval.index_select(0, idx).view(w, *([1] * (dx.dim() - 1)))
                rank_u = torch.where(evaluated_before, dout - slope * dx, torch.zeros_like(dx))
                rank_v = torch.where(evaluated_before, dx * inv.view_as(slope), torch.zeros_like(dx))
            has = self.has_eval.index_select(0, idx)
            per_point = (w,) + (1,) * (slope.dim() - 1)  # a [w] vector broadcast over images and elements
            # "no slope" is a zero slope here (out + 0 * dx is out exactly). A point never evaluated inherits its
            # predecessor's slope, which the reference's loop order makes the slope of the nearest evaluated point
            # before it in the window, or the one behind the window: a selection (cummax of indices), no arithmetic
            if self.inherit_slope:
                before = self.slopes.index_select(0, (self.begin - 1).clamp(min=0))
                behind = torch.where(self.begin > 0, before, torch.zeros_like(before))  # [1, batch, 1, ...]
                nearest = torch.where(has, self._points_w, -1).cummax(0).values  # -1: none in the window
                slopes = torch.cat([behind, slope]).index_select(0, nearest + 1)
            else:
                slopes = torch.where(has.view(per_point), slope, torch.zeros_like(slope))
            if self.prior_slope:  # the first sweep (the only one with begin = 0: every sweep slides >= 1)
                slopes = torch.where((self.begin == 0).view((1,) * slope.dim()),
                                     self._prior.index_select(0, idx).view(per_point), slopes)
            self.slopes.index_copy_(0, idx, slopes)
        self.outs.index_copy_(0, idx, out)
        self.evaluated_at.index_copy_(0, idx, evaluated)
        self.has_eval.index_fill_(0, idx, True)
        # The reference's propagate, x_{i+1} = c_x[i] x_i + c_out[i] u_i with u_i = out_i + s_i d_i + r_u_i <r_v_i, d_i>
        # and d_i = x_i - e_i (e: the states evaluated this sweep; d_0 = 0), is linear in d. Only the chain of d is
        # sequential; with B = c_x e + c_out out (the serial update at the evaluated state), A = c_x + c_out s (a
        # scalar per image) and R = c_out r_u, all vectorised over the window,
        #     d_{i+1} = C_i + A_i d_i + R_i <r_v_i, d_i>,   C_i = B_i - e_{i+1}:
        # one addcmul per point, plus a dot (bmm) and an addcmul_ with the Broyden term (the reference's op order
        # took 7-11 kernels per point). The states and the outputs they used then follow from d, vectorised and in
        # the reference's op order: u_i as there, x_{i+1} = c_x (e_i + d_i) + c_out u_i.
        # Exact where it must be: where d_i = 0 every correction adds an exact 0, so x_{i+1} = B_i bit for bit and
        # d_{i+1} = B_i - e_{i+1} = x_{i+1} - e_{i+1} exactly. Along the prefix of points that did not move d stays
        # exactly 0, as in the reference, so tol = 0 (which accepts that prefix and the first moved point only)
        # still gives the serial sample bit for bit. Elsewhere the states agree with the reference's to rounding,
        # not bit for bit (d is not x - e of a rounded x, the dot is a bmm): see the module docstring for what
        # that changes at tol = 0.
        shape = (w,) + (1,) * (pts.dim() - 1)
        c_x, c_out = c_x.view(shape), c_out.view(shape)
        B = c_x * evaluated + c_out * out
        A = c_x + c_out * slopes if self.secant else c_x  # [w, batch, 1, ...] (a scalar per image)
        C = B[:-1] - evaluated[1:]
        d = torch.zeros_like(evaluated)
        if self.broyden:
            R = c_out * rank_u
            dots = torch.zeros_like(slopes)  # <r_v_i, d_i> per image, [w, batch, 1, ...]; d_0 = 0: dots[0] = 0
            v_rows, d_cols = rank_v.flatten(2).unsqueeze(2), d.flatten(2).unsqueeze(3)  # [w, batch, 1, n], [.., n, 1]
            dot_out = dots.view(w, -1, 1, 1)
        if self.fused:  # one Triton launch for the whole chain (fused.py; on a GPU ~190 fewer kernels per sweep)
            fused.propagate(C, A.expand_as(slopes).contiguous(), R if self.broyden else None,
                            rank_v if self.broyden else None, d, dots if self.broyden else None)
        else:
            for i in range(w - 1):  # unrolled: the chain along the window
                if self.broyden and i > 0:
                    torch.bmm(v_rows[i], d_cols[i], out=dot_out[i])
                torch.addcmul(C[i], A[i], d[i], out=d[i + 1])
                if self.broyden and i > 0:
                    d[i + 1].addcmul_(R[i], dots[i])
        # dots[w - 1] stays 0: the window's last point has no Broyden term (r_v = 0) unless it lies past N (every
        # sweep slides by >= 1, so a last point on the grid has never been in a window: it was not evaluated before)
        x = evaluated + d  # the states x_0 .. x_{w-1}: c_x x below rounds as the next sweep's B does at a fixed point
        used = out
        if self.secant:
            used = used + slopes * d
            if self.broyden:
                used = used + rank_u * dots
        new = c_x * x + c_out * used
        self.used.index_copy_(0, idx, used)
        self.points.index_copy_(0, idx + 1, new)
        change = (new - pts[1:]).abs().flatten(1).amax(1)  # [w]
        moved = change > self.tol
        slide = torch.minimum(self._first_moved(moved, valid) + 1, span)
        return change, moved, slide, slide


class ParadigmsRunner(WindowRunner):
    """paradigms.py's sweep on the runtime (tol: its per-step RMS knob, as there)."""

    sampler = "paradigms"
    default_tol = PARADIGMS_TOLERANCE

    def _update(self, idx, pts, out, valid, span):
        """paradigms.py's sweep: x_{j+1} = x_begin + cumsum of the window's DDIM updates (Jacobi), slide by the
        per-point RMS change against tol^2 sigma_j^2."""
        w, batch = self.window, self.batch
        rows = pts[:w].flatten(0, 1)
        row_index = self.begin + self._row_point
        delta = ddim_update(rows, out.flatten(0, 1), self._drift.index_select(0, row_index),
                            self._c_out.index_select(0, row_index))
        new = pts[0] + delta.view(w, batch, *pts.shape[2:]).cumsum(0)
        change = new - pts[1:]
        mean_square = change.to(torch.float64).pow(2).flatten(2).mean(-1)  # [w, batch]
        thresholds = self.tol_sq * self._var.index_select(0, idx + 1)
        moved = (mean_square > thresholds[:, None]).any(1)
        self.points.index_copy_(0, idx + 1, new)
        slide = torch.clamp(self._first_moved(moved, valid) + 1, max=w)
        return change.abs().flatten(1).amax(1), moved, slide, torch.minimum(slide, self.steps - self.begin)


WINDOW_RUNNERS: dict[str, type[WindowRunner]] = {"eps-picard": EpsPicardRunner, "paradigms": ParadigmsRunner}
