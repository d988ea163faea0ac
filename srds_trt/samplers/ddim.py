"""One-step ODE updates with explicit (t_from, t_to).

A DDIM (eta = 0) step is linear in the current state and the model output:

    x_to = c_x * x_from + c_out * model(x_from, t_from)

so a solver step is fully described by two per-row coefficients. They are computed once per schedule
in float64 (no host work in the hot loop) and a batched call can advance every row between its own pair
of time points: SRDS rows of different blocks sit at different timesteps in one model call.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")
SOLVERS = ("ddim",)


def as_grid(timesteps) -> Tensor:
    """A timestep grid on the CPU: long when every point is an integer, else float64 (fractional timesteps)."""
    grid = torch.as_tensor(timesteps).cpu()
    if grid.is_floating_point():
        grid = grid.to(torch.float64)
        if bool((grid == grid.round()).all()):
            grid = grid.long()
    return grid.long() if not grid.is_floating_point() else grid


def alphas_at(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """alpha_cumprod at each timestep, float64; timestep -1 is the clean end (alpha = 1).

    Integer timesteps index the training table. Fractional ones (grids finer than the training schedule, e.g.
    1024 steps over 1000 training timesteps) interpolate log(alpha_cumprod) linearly between the neighbours,
    i.e. geometrically, like the cumulative product it is.
    """
    timesteps = as_grid(timesteps)
    table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if timesteps.numel() and (timesteps.min() < -1 or timesteps.max() > table.numel() - 1):
        raise ValueError(f"timesteps must lie in [-1, {table.numel() - 1}], got {timesteps.tolist()}")
    clean = timesteps < 0
    if not timesteps.is_floating_point():
        alphas = table[timesteps.clamp(min=0)]
    else:
        t = timesteps.clamp(min=0)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        log_table = table.log()
        alphas = torch.where(w == 0, table[lo], ((1 - w) * log_table[lo] + w * log_table[hi]).exp())
    return torch.where(clean, torch.ones_like(alphas), alphas)


def ddim_coefficients(a_from: Tensor, a_to: Tensor, prediction_type: str = "epsilon") -> tuple[Tensor, Tensor]:
    """(c_x, c_out) of the DDIM step from alpha_cumprod a_from to a_to, elementwise, float64.

    epsilon: x0 = (x - sqrt(1-a) eps) / sqrt(a),  x_to = sqrt(a_to) x0 + sqrt(1-a_to) eps
    v:       x0 = sqrt(a) x - sqrt(1-a) v,  eps = sqrt(1-a) x + sqrt(a) v
    """
    a_from = torch.as_tensor(a_from, dtype=torch.float64)
    a_to = torch.as_tensor(a_to, dtype=torch.float64)
    s_from, s_to = a_from.sqrt(), a_to.sqrt()
    n_from, n_to = (1 - a_from).sqrt(), (1 - a_to).sqrt()
    if prediction_type == "epsilon":
        return s_to / s_from, n_to - s_to * n_from / s_from
    if prediction_type == "v_prediction":
        return s_to * s_from + n_to * n_from, n_to * s_from - s_to * n_from
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def check_solver(solver: str, prediction_type: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def per_row(coefficients: Tensor, like: Tensor) -> Tensor:
    """Reshape a [rows] coefficient vector to broadcast over a [rows, ...] batch, in its dtype and device."""
    return coefficients.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ddim_update(x: Tensor, model_output: Tensor, c_x: Tensor, c_out: Tensor) -> Tensor:
    """Apply one DDIM step to every row: c_x, c_out are [rows] coefficient vectors."""
    return per_row(c_x, x) * x + per_row(c_out, x) * model_output.to(x.dtype)


def parareal_update(g_new: Tensor, f_old: Tensor, g_old: Tensor) -> Tensor:
    """The Parareal correction U[p][b+1] = G(p, b) + (F(p-1, b) - G(p-1, b)), the one place it is written.

    The difference is formed first: F and G_old are close, and their difference is what must not lose digits.
    """
    return g_new + (f_old - g_old)


def prior_slopes(alphas: Tensor, prediction_type: str) -> Tensor:
    """d out / d x per point (float64) for unit-variance Gaussian data, where x_t ~ N(0, I) at every t and the
    model's output is exactly linear in x: epsilon = sqrt(1 - alpha) x, v = sqrt(alpha) eps - sqrt(1 - alpha) x0 = 0.
    eps-Picard's first-sweep slope (eps_picard.py)."""
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    if prediction_type == "epsilon":
        return (1 - alphas).sqrt()
    if prediction_type == "v_prediction":
        return torch.zeros_like(alphas)
    raise ValueError(f"no prior slope for prediction_type {prediction_type!r}")


def step_noise_variance(alphas: Tensor) -> Tensor:
    """sigma_j^2 for the points j = 0..N of a grid with alpha_cumprod `alphas` [N+1]; sigma_N^2 = 0 (ParaDiGMS's thresholds, paradigms.py)."""
    a_from, a_to = alphas[:-1], alphas[1:]
    var = (1 - a_to) / (1 - a_from) * (1 - a_from / a_to)
    return torch.cat([var, var.new_zeros(1)])
