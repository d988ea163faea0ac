"""Serial sampling: the N sequential solver steps every parallel sampler converges to."""

from __future__ import annotations

from torch import Tensor

from .base import Model, SampleResult, check_grid, state_dtype
from .ddim import as_grid, ddim_update
from .solver import resolve_solver
from .stopping import check_finite, check_tol


def serial_sample(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    solver: str | None = None,
    prediction_type: str = "epsilon",
) -> Tensor:
    """The reference: N sequential solver steps t_0 -> t_1 -> ... -> t_N (DDIM, or flow Euler on a sigma grid:
    `alphas_cumprod` is then the solver, samplers/solver.py)."""
    ode = resolve_solver(alphas_cumprod, prediction_type, solver)
    timesteps = check_grid(x, timesteps)
    c_x, c_out = ode.coefficients(timesteps[:-1], timesteps[1:])
    state = x.to(state_dtype(x))
    for i in range(len(timesteps) - 1):
        out = model(state, timesteps[i].expand(x.shape[0]).to(x.device))
        state = ddim_update(state, out, c_x[i].expand(x.shape[0]), c_out[i].expand(x.shape[0]))
    check_finite(float(state.abs().max()), "serial sample")
    return state.to(x.dtype)


def serial_result(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    tol: float = 0.0,
    prediction_type: str = "epsilon",
    solver: str | None = None,
) -> SampleResult:
    """serial_sample in the SAMPLERS contract (tol is accepted and meaningless: the serial sample is exact)."""
    check_tol(tol)
    steps = len(as_grid(timesteps)) - 1
    sample = serial_sample(model, x, timesteps, alphas_cumprod, solver=solver, prediction_type=prediction_type)
    return SampleResult(sample=sample, sampler="serial", iterations=None, model_evals=steps * x.shape[0],
                        sequential_calls=steps, converged=True)


