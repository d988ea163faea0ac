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


def alphas_at(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """alpha_cumprod at each timestep, float64; timestep -1 is the clean end (alpha = 1)."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if timesteps.numel() and (timesteps.min() < -1 or timesteps.max() >= table.numel()):
        raise ValueError(f"timesteps must lie in [-1, {table.numel() - 1}], got {timesteps.tolist()}")
    clean = timesteps < 0
    alphas = table[timesteps.clamp(min=0)]
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
