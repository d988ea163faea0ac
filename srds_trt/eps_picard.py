"""Picard iteration on the model outputs, not on the states: sliding windows whose sweep propagates DDIM exactly.

ParaDiGMS (paradigms.py) writes the N-step DDIM solution as x_{j+1} = x_s + sum_{s<=i<=j} d_i(x_i) and iterates
all of it Jacobi-style: BOTH parts of d_i(x) = (c_x[i] - 1) x + c_out[i] out_i(x) come from the previous sweep,
so even a model whose output does not depend on x (out constant) needs one sweep per point. Here only the
model output is stale; the linear part of each DDIM step is applied to the state of THIS sweep (in y = x /
sqrt(alpha) coordinates, epsilon prediction, Picard on the exponential-integrator form that ParaSolver and
ParaTAA iterate), and the stale output is moved to the new state along a quasi-Newton model of d out / d x.
The Picard error then contracts with what the quasi-Newton model misses of the output's x-dependence, not with
the Lipschitz constant of the whole step.

One sweep (window = points begin .. end-1; `w` = 2 round(sqrt N) at most; fixed-shape tensor ops given the window
position, only the slide is data-dependent, so a CUDA-graph runner can replay it):

 1. out_j = model(x_j, t_j) for every window point, ONE batched call (rows point-major, each row its timestep).
 2. Quasi-Newton model per point and image, from the last two evaluations (dx = x_j - x_j', dout = out_j - out_j'):
      secant slope  s_j = <dout, dx> / |dx|^2                      (0 where dx = 0)
      Broyden term  u_j = dout - s_j dx,  v_j = dx / |dx|^2        (J_j = s_j I + u_j v_j^T: J_j dx = dout exactly,
                                                                    s_j on the directions the secant has not seen)
    A point evaluated for the first time has no secant: it inherits s_{j-1} (the slope varies slowly in t, and
    the point's first evaluation was at a warm-start state, so its correction is what matters most); no Broyden
    term. Why: the scalar secant alone measures the output's stiffness along the error direction, which
    dominates where modes separate; the rank-1 term keeps the part of dout that is not parallel to dx.
    The first sweep has nothing to inherit: its points take the PRIOR slope (prior_slopes), the exact d out / d x
    for unit-variance Gaussian data (x_t ~ N(0, I) at every t): sqrt(1 - alpha_j) for epsilon, 0 for v. It is
    the true slope as alpha -> 0 (there the output is the noise, out ~ x), where the default first window lies
    (it ends at alpha < 0.05 for N >= 196 on the grids here), and never above 1, so a wide window reaching low
    noise is not pushed by a large guess. Why it pays: without it the first sweep propagates model(x_T, t_j)
    unmoved, the second sweep's states are far off, and the early, mode-deciding points can be accepted with
    errors (the mixtures' errors of 3 at loose tol, below).
 3. Recurrence along the window, no model call:
      x_{j+1} <- c_x[j] x_j + c_out[j] (out_j + s_j d_j + u_j <v_j, d_j>),  d_j = x_j (this sweep) - x_j (evaluated)
 4. Slide (the one host read): past the prefix whose states moved <= tol and the first point that moved (it was
    computed from converged inputs), at least one point.
 5. Warm start of the points entering the window (ParaSolver's "initialise from a cheap solve", at zero model
    cost): their outputs are EXTRAPOLATED, linearly in lambda = log(sqrt(alpha / (1 - alpha))) (the
    exponential integrator's variable: DPM-Solver's second-order multistep predictor, Adams-Bashforth-like), from
    the outputs the recurrence just used at the last two points of the old window, and propagated by step 3 with
    d = 0. A straight trajectory (output linear in lambda) is then predicted exactly, and the first evaluation of
    a new point lands near its converged state. The first window has no outputs to extrapolate from: its points
    start at x_T.

Measured (CPU, sequential calls at matched max-abs error, `python -m benchmarks.matched`, results in
benchmarks/results/matched-2026-11-27/): on the mixtures the three mechanisms together save 1-8 calls over the
sampler before them (frozen output, no inheritance, scalar secant; e.g. N=1024 at 1e-2: 28 -> 23, 27 -> 21,
30 -> 25, 32 -> 27). Switching one off costs: the extrapolation 1-6 calls, the inherited slope 0-5, the Broyden
term -1..3 (it pays only where the output is high-dimensional; in 2-D a wash). On the digits UNet (fp32, CFG 4)
they buy 1-2 calls at 1e-2 (N=100/196/1024: 16 -> 14, 17 -> 16, 25 -> 24) but LOSE at 1e-3 for N >= 196 (20 -> 22,
32 -> 36, N=1024 on a coarse tol grid); likely because a point that starts nearer its fixed point moves less
per sweep for the same remaining error, so change <= tol accepts it with more error (not verified). At N=100
they still win (17 -> 16). Tried and dropped: quadratic
extrapolation (1-2 fewer calls at N=1024, no better at N=196, worse on digits N=100: 15/18 vs 14/16 calls),
inheriting the neighbour's Broyden term too (more calls), a data-prior first window (x_t = sqrt(1 - a_t) x_T:
no change), accepting points by predicted error (change x the point's contraction estimate: unsafe at loose
tol, no gain).
The prior slope (benchmarks/results/matched-2026-11-27c/, column "-no-prior" = the sampler before it): 1-8 fewer
calls in 16 of the 22 rows, a tie in 4, one more in 2; mixtures at N = 1024 at 1e-2: hard2 23 -> 18, wide2 21 -> 17,
mix16 25 -> 17, mix64 27 -> 21; digits at 1e-3: N = 100/196/1024 16 -> 16, 22 -> 20, 35 -> 33. With it no mode
flipped below a threshold of 3e-2 (5 of 116 runs, mix64 at 3e-2 and up; without it 27 of 125, from 3e-3 up), which
is what let stopping.py calibrate eps-Picard's threshold looser than ParaDiGMS's. Not adopted (2026-11-27, README
"Why the digits rows miss"): per-image windows, the inherited slope carried in x0 space, a pooled multi-secant
normalised by Tweedie's form of the Jacobian (J = (I - K) / sigma, K symmetric) for every correction
(benchmarks/results/newton-bound-2026-11-27/: the digits rows need about a quarter of this model's error).
Experimental options (off by default; the runtime runner refuses them): a wide-baseline warm start
(extrapolate_span, extrapolate_fit="lsq"), measured in benchmarks/results/eps-picard-experiments-2026-11-27/, and
`jvp`, the exact linearisation in place of the quasi-Newton model: Newton's correction, whose derivatives are
sequential, so not a parallel sampler but the bound on what a better Jacobian model could buy
(benchmarks/newton_bound.py, benchmarks/results/newton-bound-2026-11-27/).
Measured and removed: a ParaSolver-style coarse warm start (a K-step DDIM solve from x_T initialising every point;
+2..+12 calls, the same folder; code at commit d68db7c).

What `tol` means (sampling.py's meaning: max-abs distance to the serial sample)
-------------------------------------------------------------------------------
As in ParaDiGMS, a point whose state did not move in a sweep (max-abs change over images and elements <= tol)
had converged inputs. The threshold is `tol` itself in units of x (not ParaDiGMS's per-step RMS relative to the
noise std). This is a per-point rule, not a proof: an accepted point carries an error up to about the
contraction of its last change, and the flow carries it to x_N (near a mode decision it can flip the mode at
loose tol). The benchmarks therefore match samplers by the measured max-abs error against serial.
tol = 0 slides only past bit-for-bit unchanged points, where every correction term is exactly zero and the
recurrence is the serial DDIM update itself, so the result is the serial sample (float64 and float32 alike).
The switches (extrapolate=0: the frozen last output; inherit_slope, broyden, secant, warm_start=False:
ParaDiGMS's "last state") exist so the benchmark can show what each mechanism buys.

Row layout: rows stacked point-major (row r belongs to image r % batch), as in sampling.py, so guidance.py's
wrappers apply.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .sampling import Model, SampleResult, check_grid, state_dtype
from .paradigms import window_result, window_width
from .samplers.solver import resolve_solver
from .stopping import DEFAULT_TOL, check_finite, check_tol


def default_window(num_steps: int) -> int:
    """2 * round(sqrt(N)) points per image per call: the width of a pipelined SRDS call at its peak (and of
    ParaDiGMS's wider window), so the samplers compare at equal parallel width."""
    return max(1, min(2 * round(math.sqrt(num_steps)), num_steps))


def extrapolation_weights(coord: list[float], nodes: list[int], target: int) -> list[float]:
    """Lagrange weights of the polynomial through coord[nodes] evaluated at coord[target] (fixed per window)."""
    weights = []
    for m in nodes:
        w = 1.0
        for k in nodes:
            if k != m:
                w *= (coord[target] - coord[k]) / (coord[m] - coord[k])
        weights.append(w)
    return weights


def least_squares_weights(coord: list[float], nodes: list[int], target: int) -> list[float]:
    """Weights of the least-squares line through (coord[m], out_m), m in nodes, evaluated at coord[target]:
    1/M + (c_t - mean)(c_m - mean) / sum_k (c_k - mean)^2 (linear in the outputs, fixed per window)."""
    mean = sum(coord[m] for m in nodes) / len(nodes)
    spread = sum((coord[m] - mean) ** 2 for m in nodes)
    if spread == 0:
        return [1.0 / len(nodes)] * len(nodes)
    return [1.0 / len(nodes) + (coord[target] - mean) * (coord[m] - mean) / spread for m in nodes]


EXTRAPOLATE_FITS = ("nodes", "lsq")


def prior_slopes(alphas: Tensor, prediction_type: str) -> Tensor:
    """d out / d x per point (float64) for unit-variance Gaussian data, where x_t ~ N(0, I) at every t and the
    model's output is exactly linear in x: epsilon = sqrt(1 - alpha) x, v = sqrt(alpha) eps - sqrt(1 - alpha) x0 = 0.
    The first sweep's slope (module docstring)."""
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    if prediction_type == "epsilon":
        return (1 - alphas).sqrt()
    if prediction_type == "v_prediction":
        return torch.zeros_like(alphas)
    raise ValueError(f"no prior slope for prediction_type {prediction_type!r}")


def eps_picard_sample(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    prediction_type: str = "epsilon",
    window: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iters: int | None = None,
    warm_start: bool = True,
    secant: bool = True,
    extrapolate: int = 1,
    inherit_slope: bool = True,
    broyden: bool = True,
    extrapolate_span: int = 1,
    extrapolate_fit: str = "nodes",
    prior_slope: bool = True,
    jvp: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> SampleResult:
    """Sliding-window Picard on the model outputs over the N-step DDIM grid; converges to `serial_sample`.

    window: points per sweep (default 2 * round(sqrt(N)), capped at N). max_iters bounds the sweeps (None: until
    the window has slid past the end, at most N sweeps). progress(sweep, residual) per sweep. The switches turn
    single mechanisms off (module docstring), to measure what each buys: extrapolate = the warm start's
    polynomial order in lambda (0: the frozen last output, 2: quadratic), inherit_slope, broyden, secant,
    prior_slope (the first sweep's slope sqrt(1 - alpha), prior_slopes; False: none) and warm_start=False (entering
    points start at the last state, as in ParaDiGMS / diffusers).

    Experimental options (benchmarks/results/eps-picard-experiments-2026-11-27; the runtime runner refuses them):
    extrapolate_span = k: the warm start's nodes are k points apart (first - 1, first - 1 - k, ...) instead of
    adjacent (a wide baseline that averages the output's step-to-step roughness); extrapolate_fit = "lsq": a
    least-squares line in lambda through the last k + 1 used outputs instead (needs extrapolate = 1).
    jvp(x, t, direction) = d model(x, t) / dx applied to `direction` (rows as the model's): replaces the
    quasi-Newton model by the exact linearisation, Newton's correction. Not a parallel sampler: each step of the
    recurrence needs the derivative along a direction known only after the step before, so a sweep's w
    corrections are w SEQUENTIAL derivative calls, which sequential_calls does not count. It measures what an
    exact Jacobian would buy the sliding window (benchmarks/newton_bound.py: the bound on the digits rows).
    """
    ode = resolve_solver(alphas_cumprod, prediction_type)
    timesteps = check_grid(x, timesteps)
    tol = check_tol(tol)
    steps = len(timesteps) - 1
    w = window_width(steps, default_window(steps) if window is None else window, max_iters)
    if extrapolate not in (0, 1, 2):
        raise ValueError(f"extrapolate must be 0, 1 or 2, got {extrapolate}")
    if int(extrapolate_span) != extrapolate_span or extrapolate_span < 1:
        raise ValueError(f"extrapolate_span must be an integer >= 1, got {extrapolate_span}")
    if extrapolate_fit not in EXTRAPOLATE_FITS:
        raise ValueError(f"extrapolate_fit must be one of {EXTRAPOLATE_FITS}, got {extrapolate_fit!r}")
    if extrapolate_fit == "lsq" and extrapolate != 1:
        raise ValueError("extrapolate_fit='lsq' fits a line: it needs extrapolate=1")
    extrapolate_span = int(extrapolate_span)

    batch, dtype, device = x.shape[0], state_dtype(x), x.device
    c_x, c_out = ode.coefficients(timesteps[:-1], timesteps[1:])
    c_x, c_out = c_x.tolist(), c_out.tolist()  # python floats: the recurrence is serial_sample's update, op for op
    # the warm start's extrapolation variable at the evaluated points: DDIM lambda = log sqrt(alpha / (1 - alpha)),
    # flow sigma (samplers/solver.py)
    lam = ode.extrapolation_coordinate(timesteps[:-1]).tolist()
    prior = ode.prior_slope(timesteps[:-1]).tolist()
    times = timesteps.to(device)

    points = x.to(dtype).unsqueeze(0).repeat(steps + 1, *([1] * x.dim()))  # points[j]: state at t_j
    outs: list[Tensor | None] = [None] * steps  # newest model output per point (None: never evaluated)
    evaluated_at: list[Tensor | None] = [None] * steps  # the state outs[j] was evaluated at (None: extrapolated)
    slopes: list[Tensor | None] = [None] * steps  # secant d out / d x per image at point j (None: unknown)
    used: list[Tensor | None] = [None] * steps  # the output the last propagation used at point j
    rank1: list[tuple[Tensor, Tensor] | None] = [None] * steps  # (dout - s dx, dx / |dx|^2) of the last secant
    shape = (batch,) + (1,) * (x.dim() - 1)

    def propagate(first: int, last: int) -> None:
        """points[j+1] = c_x[j] points[j] + c_out[j] out_j for j = first..last-1, out_j the newest output moved
        along the point's quasi-Newton model to the state of this sweep (zero correction at the fixed point)."""
        for j in range(first, last):
            out_j = outs[j]
            if jvp is not None:
                if evaluated_at[j] is not None:  # Newton: the exact derivative along this sweep's move
                    out_j = out_j + jvp(evaluated_at[j], times[j].repeat(batch), points[j] - evaluated_at[j]).to(dtype)
            elif slopes[j] is not None and evaluated_at[j] is not None:
                d = points[j] - evaluated_at[j]
                out_j = out_j + slopes[j] * d
                if rank1[j] is not None:
                    u, v = rank1[j]
                    out_j = out_j + u * (v * d).flatten(1).sum(1).view(shape)
            used[j] = out_j
            points[j + 1] = c_x[j] * points[j] + c_out[j] * out_j

    def warm(first: int, last: int) -> None:
        """New points first..last-1: outputs extrapolated from the last evaluated ones, then propagated."""
        if extrapolate_fit == "lsq" and first >= 2:
            nodes = list(range(first - 1, max(first - 2 - extrapolate_span, -1), -1))
            fit = least_squares_weights
        else:
            span = min(extrapolate_span, (first - 1) // extrapolate) if extrapolate else 1
            order = min(extrapolate, first - 1)
            nodes = [first - 1 - k * max(span, 1) for k in range(order + 1)]
            fit = extrapolation_weights
        for j in range(first, last):
            weights = fit(lam, nodes, j)
            outs[j] = sum(wt * used[m] for wt, m in zip(weights, nodes))
            evaluated_at[j] = None
            slopes[j] = None
        propagate(first, last)

    begin, end = 0, w
    iterations = model_evals = 0
    residuals: list[float] = []
    slides: list[int] = []
    while begin < steps and (max_iters is None or iterations < max_iters):
        span = end - begin
        state = points[begin:end].flatten(0, 1)  # [span * batch, ...], point-major
        out = model(state, times[begin:end].repeat_interleave(batch)).to(dtype)
        model_evals += state.shape[0]
        new_outs = out.view(span, batch, *x.shape[1:]).unbind(0)
        for i, j in enumerate(range(begin, end)):
            if secant and prior_slope and iterations == 0:  # nothing measured yet: the prior slope
                slopes[j] = torch.full(shape, prior[j], dtype=dtype, device=device)
                rank1[j] = None
            elif secant and evaluated_at[j] is not None:
                dx, dout = points[j] - evaluated_at[j], new_outs[i] - outs[j]
                norm = dx.flatten(1).pow(2).sum(1)
                slope = (dout * dx).flatten(1).sum(1) / norm.clamp_min(torch.finfo(dtype).tiny)
                slopes[j] = torch.where(norm > 0, slope, 0).view(shape)
                if broyden:
                    inv = torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(dtype).tiny), 0).view(shape)
                    rank1[j] = (dout - slopes[j] * dx, dx * inv)
            elif secant and inherit_slope and j > 0 and slopes[j - 1] is not None:
                slopes[j] = slopes[j - 1]
                rank1[j] = None
            else:
                slopes[j] = None
                rank1[j] = None
            if not (secant and broyden):
                rank1[j] = None
            outs[j], evaluated_at[j] = new_outs[i], points[j].clone()
        old = points[begin + 1 : end + 1].clone()
        propagate(begin, end)
        change = (points[begin + 1 : end + 1] - old).abs().flatten(1).amax(1)  # [span]
        moved = change > tol
        first_moved = int(moved.int().argmax()) if bool(moved.any()) else span
        slide = min(first_moved + 1, span)
        iterations += 1
        residuals.append(check_finite(float(change.max()), f"eps-Picard sweep {iterations}"))
        slides.append(slide)
        if progress is not None:
            progress(iterations, residuals[-1])
        begin, old_end = begin + slide, end
        end = min(begin + w, steps)
        if end > old_end:  # new points enter the window
            if warm_start:
                warm(old_end, end)
            else:
                points[old_end + 1 : end + 1] = points[old_end]
    return window_result("eps-picard", points[steps], x, iterations=iterations, window=w, model_evals=model_evals,
                         residuals=residuals, slides=slides, converged=begin >= steps, tol=tol)
