"""eps-Picard: Picard iteration on the model outputs over a sliding window; the sweep propagates DDIM exactly.

Only the model output is stale within a sweep: the linear part of each DDIM step is applied to the state of THIS
sweep and the stale output is moved to it along a quasi-Newton model of d out / d x (a secant slope per point
and image, inherited by points not yet evaluated, the Gaussian prior slope in the first sweep, plus a rank-1
Broyden term). Points entering the window start from outputs extrapolated linearly in lambda. A point is
accepted when its state moved by at most the threshold in one sweep. Design and measurements: docs/eps-picard.md.

`eps_picard_sample` is the sampler; `eps_picard_experiment` runs it with EpsPicardOptions (mechanisms switched
off, or research variants) for the benchmarks' ablations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from .base import Model, SampleResult, check_grid, state_dtype
from .solver import resolve_solver
from .stopping import DEFAULT_TOL, check_finite, check_tol
from .window import default_window, window_result, window_width


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


# the options that make up the sampler (a runtime mirrors each); the rest of EpsPicardOptions is research
MECHANISMS = ("warm_start", "secant", "extrapolate", "inherit_slope", "broyden", "prior_slope")


@dataclass(frozen=True)
class EpsPicardOptions:
    """eps-Picard's mechanisms, each switchable to measure what it buys (the defaults are the sampler).

    extrapolate: the warm start's polynomial order in lambda (0: the frozen last output, 2: quadratic);
    inherit_slope, broyden, secant, prior_slope (the first sweep's slope, the solver's prior_slope; False: none);
    warm_start=False: entering points start at the last state (ParaDiGMS / diffusers).
    Research only (the runtime refuses them): extrapolate_span = k puts the warm start's nodes k points apart;
    extrapolate_fit = "lsq" fits a least-squares line; jvp(x, t, direction) replaces the quasi-Newton model by the
    exact linearisation (Newton's correction: its derivatives are SEQUENTIAL, so a bound, not a sampler).
    """

    warm_start: bool = True
    secant: bool = True
    extrapolate: int = 1
    inherit_slope: bool = True
    broyden: bool = True
    prior_slope: bool = True
    extrapolate_span: int = 1
    extrapolate_fit: str = "nodes"
    jvp: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def research(self) -> list[str]:
        """The research-only options set away from their defaults (what a runtime cannot run)."""
        return [name for name, default in (("extrapolate_span", 1), ("extrapolate_fit", "nodes"), ("jvp", None))
                if getattr(self, name) != default]


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
    progress: Callable[[int, float], None] | None = None,
) -> SampleResult:
    """Sliding-window Picard on the model outputs over the N-step DDIM grid; converges to `serial_sample`.

    window: points per sweep (default 2 * round(sqrt(N)), capped at N). tol: the per-point acceptance threshold
    (max-abs change in one sweep; samplers.SAMPLERS maps a caller's tol onto it). max_iters bounds the sweeps
    (None: until the window has slid past the end, at most N sweeps). progress(sweep, residual) per sweep.
    """
    return eps_picard_experiment(model, x, timesteps, alphas_cumprod, prediction_type=prediction_type, window=window,
                                 tol=tol, max_iters=max_iters, progress=progress)


def eps_picard_experiment(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    prediction_type: str = "epsilon",
    window: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iters: int | None = None,
    progress: Callable[[int, float], None] | None = None,
    options: EpsPicardOptions | None = None,
    **switches,
) -> SampleResult:
    """eps_picard_sample with its mechanisms set by `options` or by EpsPicardOptions' fields given as keywords
    (`secant=False`, ...): the benchmarks' ablations."""
    options = replace(options or EpsPicardOptions(), **switches)
    warm_start, secant, extrapolate = options.warm_start, options.secant, options.extrapolate
    inherit_slope, broyden, prior_slope = options.inherit_slope, options.broyden, options.prior_slope
    extrapolate_span, extrapolate_fit, jvp = options.extrapolate_span, options.extrapolate_fit, options.jvp
    ode = resolve_solver(alphas_cumprod, prediction_type)
    timesteps = check_grid(x, timesteps)
    tol = check_tol(tol)
    steps = len(timesteps) - 1
    w = window_width(steps, default_window("eps-picard", steps) if window is None else window, max_iters)
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
