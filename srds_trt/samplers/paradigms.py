"""ParaDiGMS (Shih et al. 2023, arXiv 2305.16317): Picard iteration over a sliding window of DDIM steps.

A pure function over the samplers' model contract (base.py): `model(x[rows, ...], t[rows])` with per-row
timesteps, rows stacked segment-major (row r belongs to image r % batch), so guidance.py's wrappers apply.

The full design note (what was measured, why these choices): docs/samplers.md, section "Module notes: srds_trt/samplers/paradigms.py".
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
