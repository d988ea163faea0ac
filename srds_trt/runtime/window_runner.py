"""The sliding-window samplers (eps-Picard, ParaDiGMS) on the runtime: one captured sweep, one host read per sweep.

A sweep of either sampler (eps_picard.py, paradigms.py) evaluates the w points of its window in ONE batched
model call, updates the window's states, and slides the window past the points that stopped moving. Here that
sweep is one fixed-shape program over static buffers:

    gather    the window's w states and tables by a device-held window start `begin` (index_select)
    call      one engine call at a fixed bucket (w x images rows, x2 under guidance: engine_call.guided_call)
    update    eps-Picard: secant slopes (inherited by points not yet evaluated, the prior slope in the first
              sweep, plus the rank-1 Broyden term), then the w-point DDIM recurrence unrolled in the program;
              ParaDiGMS: the cumulative sum of the window's DDIM updates
    slide     the first moved point (a device argmax), the new `begin`, the points entering the window
              (eps-Picard's extrapolated warm start, ParaDiGMS's copy of the last state), written back by
              index_copy_
    status    [begin, slide, residual] into a small static buffer

The slide is data-dependent, but only the HOST needs its value (to know when to stop): the program itself reads
`begin` from the device, so ONE captured program (cuda_graphs.capture_graph; eager where capture fails, the
reason kept in capture_failures) serves every sweep, tail of the grid included. The tail needs no second
program: every table (timesteps, DDIM coefficients, thresholds) and the state buffer are padded by w (+2)
entries past the grid end (padding steps are the identity: c_x = 1, c_out = 0, a valid timestep), so window
points past N compute finite values into padding rows, and a `valid = j < N` mask keeps them out of the
residual and the slide. The host reads the 3-entry status once per sweep (pinned memory + event on a GPU);
the number of reads and the time spent in them are kept in `last_run` (WindowStats): measured, not assumed.

Iterate-for-iterate the same as the reference functions (tests/test_runtime_window.py compares every sweep
short of convergence), to rounding: eps-Picard's recurrence is the reference's rewritten linear in d = x - e
(_eps_picard_update), so only a 3-kernel chain per point is sequential and the rest is vectorised over the
window. Float64 states agree with the reference's to 3e-14 at tol = 1e-3 (1e-7 at tol = 1e-5, where secants of
nearly converged points, dx at rounding level, amplify rounding in the reference itself), and the slides are the
same: 0 of 60 runs differed at tol = 1e-3 and 1e-5 (5 grids up to N = 100, guided and not, 6 seeds). tol = 0
still gives the serial sample bit for bit (a converged point's update is the serial one exactly), but its
slides are decided by states equal to the last bit, which rounding decides: 37 of those 60 runs slid
differently there (1602 sweeps in all against the reference's 1579; the op-for-op runner before: 3 of 60, 1578).

eps-Picard's algorithm options (EPS_PICARD_OPTIONS) and their defaults are read from eps_picard_sample's
signature. The reference's "None" (no slope, no rank-1 term) is a zero here: out + 0 * d is out exactly. What is
not stored, because it cannot change a result: outs[j] of points entering the window (every such point is
evaluated, which overwrites it, before it is read) and the rank-1 terms (set and used within one sweep).

Cost besides the model call (kernel-launching ops counted on the CPU, views not counted): eps-Picard ~4 per window
point plus ~100 (w = 64, guided, batch 1: 360 per sweep, update 265 + warm start 95; it was 988 while the
recurrence ran op for op as the reference's). On a GPU with Triton its two sequential chains (~250 of those
launches at w = 64) are one kernel each (fused.py; H100, digits N = 1024: ~0.5 ms of update per sweep instead of
1.36 ms). ParaDiGMS 67 per sweep whatever w. Not done: launching sweep k+1 before reading sweep k's status
(SRDSRunner's lookahead) would take the read off the GPU's critical path; it needs x_N snapshotted per sweep.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..eps_picard import default_window as eps_picard_window
from ..paradigms import (WINDOW_SAMPLERS, default_window as paradigms_window, window_result,
                         window_width)
from ..sampling import SampleResult
from ..samplers.solver import resolve_solver
from ..solvers import as_grid, ddim_update
from ..stopping import NonFiniteError, check_tol
from . import fused
from .cuda_graphs import CapturedGraph, capture_graph
from .engine_call import guided_call, load_conditioning
from .engines.base import Engine, EngineError
from .host import as_tensor, host_stream
from .srds_runner import effective_tol

# eps_picard_sample keywords that change its algorithm (the runner mirrors each; defaults come from the reference)
EPS_PICARD_OPTIONS = ("warm_start", "secant", "extrapolate", "inherit_slope", "broyden", "prior_slope")
# eps_picard_sample keywords the runner does NOT mirror (experiments): refused unless left at the reference's default
REFERENCE_ONLY_OPTIONS = ("extrapolate_span", "extrapolate_fit", "jvp")
BEGIN, SLIDE, RESIDUAL = 0, 1, 2  # entries of the per-sweep status the host reads


def default_window(sampler: str, steps: int) -> int:
    """The reference sampler's default window (eps-Picard: 2 round(sqrt N); ParaDiGMS: round(sqrt N))."""
    _check_sampler(sampler)
    return eps_picard_window(steps) if sampler == "eps-picard" else paradigms_window(steps)


def resolve_window(sampler: str, steps: int, window: int | None) -> int:
    """The points per sweep a sliding-window sampler runs with: its default when window is None, capped at N
    (checked: window >= 1)."""
    return window_width(steps, default_window(sampler, steps) if window is None else window, None)


def window_rows(sampler: str, steps: int, window: int | None, images: int, guided: bool) -> int:
    """Engine rows of one sweep: window x images x (2 under guidance)."""
    return resolve_window(sampler, steps, window) * images * (2 if guided else 1)


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
        **options: Any,
    ):
        _check_sampler(sampler)
        ode = resolve_solver(alphas_cumprod, prediction_type)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        on_cuda = engine.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs a CUDA engine")
        self.sampler, self.engine, self.batch, self.guided = sampler, engine, batch, guided
        self.device, self.dtype, self.noise_floor = engine.device, state_dtype, noise_floor
        # eps-Picard's two sequential chains as one Triton launch each (fused.py): by default where available
        # (CUDA, float32, Triton importable); False runs the torch loops (the reference for the fused kernels)
        self.fused = fused.available(self.device, self.dtype) if fused_chains is None else fused_chains
        if self.fused and not fused.available(self.device, self.dtype):
            raise ValueError("fused_chains=True needs CUDA, float32 states and Triton")
        self.options = eps_picard_options(**options) if sampler == "eps-picard" else _no_options(options)
        self.warm_start = self.options.get("warm_start", False)
        self.secant = self.options.get("secant", False)
        self.inherit_slope = self.secant and self.options.get("inherit_slope", False)
        self.broyden = self.secant and self.options.get("broyden", False)
        self.prior_slope = self.secant and self.options.get("prior_slope", False)
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
        if sampler == "eps-picard" and self.warm_start:
            weights = extrapolation_table(ode, timesteps, w, self.options)
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
        # an eps_picard.py without `extrapolate` warm-starts from the newest raw output (outs), not from `used`
        self._warm_source = self.used if "extrapolate" in self.options else self.outs
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
        if self.sampler == "eps-picard":
            change, moved, slide, reported = self._eps_picard_update(idx, pts, out, valid, span)
        else:
            change, moved, slide, reported = self._paradigms_update(idx, pts, out, valid, span)
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

    def _eps_picard_update(self, idx, pts, out, valid, span):
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

    def _paradigms_update(self, idx, pts, out, valid, span):
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

    def _enter(self, new_begin: Tensor, old_end: Tensor) -> None:
        """Points entering the window (j in [old_end, min(new_begin + w, N))): eps-Picard's warm start continues
        the recurrence with the last evaluated output; ParaDiGMS (and warm_start=False) copy x[old_end]."""
        w = self.window
        nidx = new_begin + self._points_w
        entering = (nidx >= old_end) & (nidx < self.steps)
        pts = self.points.index_select(0, new_begin + self._points_w1)
        if self.sampler == "eps-picard" and self.warm_start:
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
        tol = check_tol(_default_tol(self.sampler) if tol is None else tol)
        if self.sampler == "eps-picard":
            tol = effective_tol(tol, self.noise_floor)
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


def eps_picard_options(**given: Any) -> dict[str, Any]:
    """eps_picard_sample's algorithm options (warm start, secant, ...), defaults read from its signature, so a
    runner built without options runs what the reference runs by default."""
    from ..eps_picard import eps_picard_sample

    known = {name: p.default for name, p in inspect.signature(eps_picard_sample).parameters.items()
             if name in EPS_PICARD_OPTIONS}
    reference = {name: p.default for name, p in inspect.signature(eps_picard_sample).parameters.items()}
    for name in [name for name in given if name in REFERENCE_ONLY_OPTIONS and name in reference]:
        if given[name] != reference[name]:
            raise ValueError(f"reference-only option {name}={given[name]!r}: the runner runs eps_picard_sample's "
                             f"default {name}={reference[name]!r} only")
        given = {k: v for k, v in given.items() if k != name}
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(f"unknown eps-Picard options {sorted(unknown)}; the runner mirrors {sorted(known)}")
    options = {**known, **given}
    if options.get("extrapolate", 0) not in (0, 1, 2):
        raise ValueError(f"extrapolate must be 0, 1 or 2, got {options['extrapolate']}")
    return options


def extrapolation_table(ode, timesteps: Tensor, w: int, options: dict[str, Any]) -> Tensor:
    """Warm-start weights, float64 [(N + 1) * w, 3]: row old_end * w + d holds the Lagrange weights (in the
    reference's coordinate) of the nodes old_end - 1 - k, k = 0..order, for the entering point old_end + d;
    weight 0 for unused nodes and for points past the grid. Computed by the reference's own function."""
    steps = len(timesteps) - 1
    table = torch.zeros(steps + 1, w, 3, dtype=torch.float64)
    if options.get("extrapolate", 0) == 0:  # one node, weight 1 (the empty Lagrange product)
        table[:, :, 0] = 1.0
        return table.view(-1, 3)
    from ..eps_picard import extrapolation_weights

    s = warm_start_coordinate(ode, timesteps)
    rows = [[0.0] * 3 for _ in range((steps + 1) * w)]
    for first in range(1, steps + 1):
        order = min(options["extrapolate"], first - 1)
        nodes = [first - 1 - k for k in range(order + 1)]
        for d in range(min(w, steps - first)):
            rows[first * w + d][: order + 1] = extrapolation_weights(s, nodes, first + d)
    table = torch.tensor(rows, dtype=torch.float64).view(steps + 1, w, 3)
    return table.view(-1, 3)


def warm_start_coordinate(ode, timesteps: Tensor) -> list[float]:
    """The coordinate eps_picard.py extrapolates outputs in, per grid point (python floats, computed as there):
    the solver's (DDIM lambda = log(sqrt(a / (1 - a))), flow sigma)."""
    return ode.extrapolation_coordinate(timesteps[:-1]).tolist()


def _no_options(options: dict[str, Any]) -> dict[str, Any]:
    if options:
        raise ValueError(f"ParaDiGMS takes no algorithm options here, got {sorted(options)}")
    return {}


def _default_tol(sampler: str) -> float:
    from ..paradigms import DEFAULT_TOL as PARADIGMS_TOL
    from ..stopping import DEFAULT_TOL

    return DEFAULT_TOL if sampler == "eps-picard" else PARADIGMS_TOL


def _check_sampler(sampler: str) -> None:
    if sampler not in WINDOW_SAMPLERS:
        raise ValueError(f"sampler must be one of {WINDOW_SAMPLERS}, got {sampler!r}")
