"""Picard iteration on the model outputs, not on the states: sliding windows whose sweep propagates DDIM exactly.

ParaDiGMS (paradigms.py) writes the N-step DDIM solution as x_{j+1} = x_s + sum_{s<=i<=j} d_i(x_i) and iterates
all of it Jacobi-style: BOTH parts of d_i(x) = (c_x[i] - 1) x + c_out[i] out_i(x) come from the previous sweep,
so even a model whose output does not depend on x (out constant) needs one sweep per point. Here only the
model output is stale; the linear part of each DDIM step is applied to the state of THIS sweep:

    sweep:  out_j = model(x_j, t_j) for every window point j in ONE batched call (each row its own timestep)
            x_{j+1} <- c_x[j] x_{j+1 - 1}^{new} + c_out[j] out_j         (a recurrence along the window, no model)

(in y = x / sqrt(alpha) coordinates, epsilon prediction, this is the cumulative sum y_{j+1} = y_s + sum c'_i
eps_i: Picard on the exponential-integrator form, the form ParaSolver and ParaTAA iterate). The Picard error then
contracts with the Lipschitz constant of the noise prediction alone, which is small where trajectories are
straight. The recurrence is w small elementwise ops on the host/device, no model call, no host read.

Warm start (ParaSolver's "initialise from a cheap solve", at zero model cost): a point entering the window is
not set to the last state (ParaDiGMS / diffusers) but continued by the same recurrence with the newest model
output available (that of the last evaluated point): DDIM with a frozen noise prediction, exact for straight
trajectories.

What `tol` means and how the window decides (sampling.py's meaning: max-abs distance to the serial sample)
--------------------------------------------------------------------------------------------------------
As in ParaDiGMS, a point whose state did not move in a sweep (max-abs change over images and elements <= tol)
had converged inputs, so the point after it was computed from exact model outputs: the window slides past the
unmoved prefix and the first moved point, at least one point per sweep. The threshold is `tol` itself in units
of x (not ParaDiGMS's per-step RMS relative to the noise std). This is a per-point rule, not a proof: an accepted
point carries an error up to about the contraction of its last change, and the flow carries it to x_N. The
benchmarks (benchmarks/run.py) therefore report the measured max-abs error against serial beside every tol.
tol = 0 slides only past bit-for-bit unchanged points, and the recurrence is the serial DDIM update itself, so the
result is the serial sample bit-for-bit (float64 and float32 alike).

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
from .solvers import alphas_at, check_solver, ddim_coefficients
from .stopping import DEFAULT_TOL, check_finite, check_tol


def default_window(num_steps: int) -> int:
    """2 * round(sqrt(N)) points per image per call: the width of a pipelined SRDS call at its peak (and of
    ParaDiGMS's wider window), so the samplers compare at equal parallel width."""
    return max(1, min(2 * round(math.sqrt(num_steps)), num_steps))


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
    progress: Callable[[int, float], None] | None = None,
) -> SampleResult:
    """Sliding-window Picard on the model outputs over the N-step DDIM grid; converges to `serial_sample`.

    window: points per sweep (default 2 * round(sqrt(N)), capped at N). max_iters bounds the sweeps (None: until
    the window has slid past the end, at most N sweeps). warm_start=False starts new window points at the last
    state, as ParaDiGMS does (kept to measure what the warm start buys). progress(sweep, residual) per sweep.
    """
    check_solver("ddim", prediction_type)
    timesteps = check_grid(x, timesteps)
    tol = check_tol(tol)
    steps = len(timesteps) - 1
    w = window_width(steps, default_window(steps) if window is None else window, max_iters)

    batch, dtype, device = x.shape[0], state_dtype(x), x.device
    alphas = alphas_at(timesteps, alphas_cumprod)
    c_x, c_out = ddim_coefficients(alphas[:-1], alphas[1:], prediction_type)
    c_x, c_out = c_x.tolist(), c_out.tolist()  # python floats: the recurrence is serial_sample's update, op for op
    times = timesteps.to(device)

    points = x.to(dtype).unsqueeze(0).repeat(steps + 1, *([1] * x.dim()))  # points[j]: state at t_j
    outs: list[Tensor | None] = [None] * steps  # newest model output per point (None: never evaluated)
    evaluated_at: list[Tensor | None] = [None] * steps  # the state outs[j] was evaluated at (None: extrapolated)
    slopes: list[Tensor | None] = [None] * steps  # secant d out / d x per image at point j (None: unknown)
    shape = (batch,) + (1,) * (x.dim() - 1)

    def propagate(first: int, last: int) -> None:
        """points[j+1] = c_x[j] points[j] + c_out[j] out_j for j = first..last-1, out_j the newest output,
        moved along its secant slope to the state of this sweep (zero correction at the fixed point)."""
        for j in range(first, last):
            out_j = outs[j]
            if slopes[j] is not None:
                out_j = out_j + slopes[j] * (points[j] - evaluated_at[j])
            points[j + 1] = c_x[j] * points[j] + c_out[j] * out_j

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
            if secant and evaluated_at[j] is not None:
                dx, dout = points[j] - evaluated_at[j], new_outs[i] - outs[j]
                norm = dx.flatten(1).pow(2).sum(1)
                slope = (dout * dx).flatten(1).sum(1) / norm.clamp_min(torch.finfo(dtype).tiny)
                slopes[j] = torch.where(norm > 0, slope, 0).view(shape)
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
                outs[old_end:end] = [outs[old_end - 1]] * (end - old_end)
                evaluated_at[old_end:end] = [None] * (end - old_end)
                propagate(old_end, end)
            else:
                points[old_end + 1 : end + 1] = points[old_end]
    return window_result("eps-picard", points[steps], x, iterations=iterations, window=w, model_evals=model_evals,
                         residuals=residuals, slides=slides, converged=begin >= steps, tol=tol)
