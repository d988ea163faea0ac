"""ParaDiGMS (Shih et al. 2023, arXiv 2305.16317): Picard iteration over a sliding window of DDIM steps.

A pure function over the samplers' model contract (base.py): `model(x[rows, ...], t[rows])` with per-row
timesteps, rows stacked segment-major (row r belongs to image r % batch), so guidance.py's wrappers apply.

The N-step DDIM ODE solution satisfies x_{i+1} = x_s + sum_{s <= j <= i} d_j(x_j) for any earlier point s, where
d_j(x) = x_to - x = (c_x[j] - 1) x + c_out[j] model(x, t_j) is one DDIM step's update (solvers.ddim_coefficients).
Picard iteration solves that fixed point over a window of w points t_s .. t_{s+w-1} at once:

    sweep:  eps_j = model(x_j, t_j) for every window point j in ONE batched call (each row its own timestep)
            x_{j+1} <- x_s + cumsum_j d_j(x_j)               (all points of the window, Jacobi style)

After k sweeps the first k points of the window are exact. The window then slides past the prefix that
stopped changing, so the next sweep starts from a converged state (diffusers' StableDiffusionParadigmsPipeline
with DDIMParallelScheduler; re-implemented here over explicit (t_from, t_to) coefficients).

Stopping / sliding rule (what `tol` means, as in the paper and diffusers)
------------------------------------------------------------------------
The change of point j in a sweep is measured per image as the mean over elements of (x_new - x_old)^2 and
compared with tol^2 * sigma_j^2, where sigma_j^2 = (1 - a_{j+1}) / (1 - a_j) * (1 - a_j / a_{j+1}) is the variance
of the noise a stochastic (DDPM, eta = 1) step from t_j to t_{j+1} would inject: `tol` is a per-step RMS change
relative to the sampler's own noise scale, NOT a distance to the serial sample in units of x (contrast
stopping.DEFAULT_TOL). If the first point whose change exceeds its threshold (in any image) is the k-th of the
window, points 1..k-1 did not move, so the k-th point was computed from converged inputs and is accepted too:
the window slides by k (by the whole window when nothing exceeds), at least one point per sweep. The final
point x_N has sigma_N = 0 (only an unchanged state passes there), which never limits the slide: it is always
the last point of its window. With set_alpha_to_one the last step lands on a_N = 1, so sigma_{N-1} = 0 too
(diffusers alike): the final window cannot slide past x_{N-1} unless it is unchanged, which costs at most one
extra one-point sweep at the end. New window points start at the last computed state (diffusers' initialisation).
Differences from diffusers: sigma_j is taken between the actual grid neighbours (diffusers assumes the
evenly spaced neighbour t_j - T/N), and the sweep's host read (how far to slide) is one small [w] bool tensor.

tol = 0 slides only past points that are bit-for-bit unchanged (and always by at least one): the result is
the serial sample up to the rounding of the cumulative sum, whatever the window.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import Model, SampleResult, check_grid, state_dtype
from .ddim import ddim_update
from .solver import resolve_solver
from .stopping import check_finite, check_tol
from .window import default_window, window_result, window_width

# diffusers' StableDiffusionParadigmsPipeline default (`tolerance=0.1`): per-step RMS change <= 0.1 sigma_j.
# Not a max-abs distance to the serial sample: samplers.SAMPLERS['paradigms'] maps the caller's tol onto it.
DEFAULT_TOLERANCE = 0.1


def step_noise_variance(alphas: Tensor) -> Tensor:
    """sigma_j^2 for the points j = 0..N of a grid with alpha_cumprod `alphas` [N+1]; sigma_N^2 = 0 (module doc)."""
    a_from, a_to = alphas[:-1], alphas[1:]
    var = (1 - a_to) / (1 - a_from) * (1 - a_from / a_to)
    return torch.cat([var, var.new_zeros(1)])


def paradigms_sample(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    prediction_type: str = "epsilon",
    window: int | None = None,
    tol: float = DEFAULT_TOLERANCE,
    max_iters: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> SampleResult:
    """Sliding-window Picard iteration over the N-step DDIM grid; converges to `serial_sample`.

    window defaults to round(sqrt(N)) (capped at N); window = N iterates the whole trajectory at once.
    max_iters bounds the sweeps (None: until the window has slid past the end, at most N sweeps).
    progress(sweep, residual) is called after every sweep.
    """
    ode = resolve_solver(alphas_cumprod, prediction_type)
    timesteps = check_grid(x, timesteps)
    steps = len(timesteps) - 1
    tol = check_tol(tol)
    w = window_width(steps, default_window("paradigms", steps) if window is None else window, max_iters)

    batch, dtype, device = x.shape[0], state_dtype(x), x.device
    c_x, c_out = ode.coefficients(timesteps[:-1], timesteps[1:])
    drift_x = c_x - 1  # d_j(x) = (c_x - 1) x + c_out eps: the update, not the next state
    thresholds = (tol**2 * ode.noise_variance(timesteps)).to(device)  # [N+1], float64 (flow: solver.py)
    times = timesteps.to(device)

    # points[j] = current estimate of the state at t_j; all start at x_T.
    points = x.to(dtype).unsqueeze(0).repeat(steps + 1, *([1] * x.dim()))
    begin, end = 0, w
    iterations = model_evals = 0
    residuals: list[float] = []
    slides: list[int] = []
    while begin < steps and (max_iters is None or iterations < max_iters):
        span = end - begin
        state = points[begin:end].flatten(0, 1)  # [span * batch, ...], segment-major
        out = model(state, times[begin:end].repeat_interleave(batch))
        model_evals += state.shape[0]
        delta = ddim_update(state, out, drift_x[begin:end].repeat_interleave(batch), c_out[begin:end].repeat_interleave(batch))
        new = points[begin] + delta.view(span, batch, *x.shape[1:]).cumsum(0)  # points begin+1 .. end
        change = new - points[begin + 1 : end + 1]
        mean_square = change.to(torch.float64).pow(2).flatten(2).mean(-1)  # [span, batch]
        moved = (mean_square > thresholds[begin + 1 : end + 1, None]).any(1)  # [span]
        # Slide past the unchanged prefix and the first moved point (computed from converged inputs).
        first_moved = int(moved.int().argmax()) if bool(moved.any()) else span
        slide = min(first_moved + 1, w)
        points[begin + 1 : end + 1] = new
        iterations += 1
        residuals.append(check_finite(float(change.abs().max()), f"ParaDiGMS sweep {iterations}"))
        slides.append(min(slide, steps - begin))
        if progress is not None:
            progress(iterations, residuals[-1])
        begin, old_end = begin + slide, end
        end = min(begin + w, steps)
        if end > old_end:
            points[old_end + 1 : end + 1] = points[old_end]
    return window_result("paradigms", points[steps], x, iterations=iterations, window=w, model_evals=model_evals,
                         residuals=residuals, slides=slides, converged=begin >= steps, tol=tol)
