"""The ODE solver as a parameter of every sampler: per-step affine coefficients on a grid, and what the window
samplers derive from the schedule.

Every step the samplers take (serial, SRDS fine and coarse, the window samplers' recurrences, the runtime's tick
tables) is affine in (state, model output): x_to = c_x x_from + c_out out(x_from, t_from). A Solver turns pairs of
grid points into those coefficients, float64, once per schedule:

    DDIMSolver(alphas_cumprod, prediction_type)   grid = timesteps; epsilon or v prediction (ddim.py)
    FlowMatchEuler()                              grid = sigmas;    velocity prediction (flow.py)

The samplers' contract keeps its shape, `(model, x, grid, schedule, *, tol, prediction_type, ...)`: `schedule`
is an alphas_cumprod table (DDIM, as before) or a Solver (as_solver). Besides coefficients, a solver gives
eps-Picard its prior slope and warm-start coordinate, and ParaDiGMS its per-point noise variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .ddim import PREDICTION_TYPES, alphas_at, ddim_coefficients, prior_slopes, step_noise_variance
from .flow import FLOW_PREDICTION, FlowMatchEuler

SOLVERS = ("ddim", "flow-euler")


@runtime_checkable
class Solver(Protocol):
    name: str
    prediction_type: str

    def coefficients(self, grid_from: Tensor, grid_to: Tensor) -> tuple[Tensor, Tensor]: ...

    def prior_slope(self, grid: Tensor) -> Tensor: ...

    def extrapolation_coordinate(self, grid: Tensor) -> Tensor: ...

    def noise_variance(self, grid: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class DDIMSolver:
    """DDIM (eta = 0) over a timestep grid of a model trained with `alphas_cumprod` (ddim.ddim_coefficients)."""

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    name = "ddim"

    def alphas(self, grid: Tensor) -> Tensor:
        return alphas_at(grid, self.alphas_cumprod)

    def coefficients(self, grid_from: Tensor, grid_to: Tensor) -> tuple[Tensor, Tensor]:
        return ddim_coefficients(self.alphas(grid_from), self.alphas(grid_to), self.prediction_type)

    def prior_slope(self, grid: Tensor) -> Tensor:
        """d out / d x for unit-variance Gaussian data: sqrt(1 - alpha) for epsilon, 0 for v (eps_picard.py)."""
        return prior_slopes(self.alphas(grid), self.prediction_type)

    def extrapolation_coordinate(self, grid: Tensor) -> Tensor:
        """lambda = log sqrt(alpha / (1 - alpha)), the exponential integrator's variable."""
        a = self.alphas(grid)
        return 0.5 * (a / (1 - a)).log()

    def noise_variance(self, grid: Tensor) -> Tensor:
        """ParaDiGMS's sigma_j^2 for the points j = 0..N (ddim.step_noise_variance)."""
        return step_noise_variance(self.alphas(grid))


def as_solver(schedule, prediction_type: str = "epsilon") -> DDIMSolver | FlowMatchEuler:
    """The solver a sampler runs: `schedule` is a Solver already, or a DDIM alphas_cumprod table."""
    if isinstance(schedule, (DDIMSolver, FlowMatchEuler)):
        if schedule.prediction_type != prediction_type and prediction_type != "epsilon":
            raise ValueError(f"prediction_type {prediction_type!r} does not match the {schedule.name} solver's "
                             f"{schedule.prediction_type!r}")
        return schedule
    if prediction_type == FLOW_PREDICTION:
        raise ValueError("prediction_type 'flow' runs on a sigma grid: pass samplers.flow.FlowMatchEuler() as the "
                         "schedule (alphas_cumprod has no meaning for it)")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES + (FLOW_PREDICTION,)}, got {prediction_type!r}")
    return DDIMSolver(torch.as_tensor(schedule, dtype=torch.float64), prediction_type)



def resolve_solver(schedule, prediction_type: str = "epsilon", name: str | None = None) -> Solver:
    """as_solver, checking an explicit solver `name` ("ddim" | "flow-euler") against what the schedule gives."""
    solver = as_solver(schedule, prediction_type)
    if name is not None and name != solver.name:
        raise ValueError(f"solver must be one of {SOLVERS} and match the schedule ({solver.name!r}), got {name!r}")
    return solver


def solver_grid(scheduler_config: dict, steps: int, prediction_type: str,
                sample_shape: tuple[int, ...] | None = None,
                family: str | None = None) -> tuple[Tensor, Tensor | FlowMatchEuler, str]:
    """(grid, schedule, prediction_type) a model's samplers run for N = `steps`: DDIM timesteps + alphas_cumprod
    (timesteps.ddim_grid), or for a flow model the scheduler's sigma grid + the flow Euler solver, its dynamic shift
    from the latent's token count ((h / 2) (w / 2), as the SD3 / Flux pipelines count it). family="flux": the
    pre-shift sigmas FluxPipeline hands the scheduler, linspace(1, 1/N, N) (flow.flux_sigmas)."""
    if prediction_type == FLOW_PREDICTION or scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        from .flow import flow_sigmas, flux_sigmas

        seq = (sample_shape[-2] // 2) * (sample_shape[-1] // 2) if sample_shape is not None else None
        sigmas = flux_sigmas(steps) if family == "flux" else None
        return flow_sigmas(scheduler_config, steps, image_seq_len=seq, sigmas=sigmas), FlowMatchEuler(), FLOW_PREDICTION
    from .timesteps import ddim_grid

    timesteps, alphas_cumprod = ddim_grid(scheduler_config, steps)
    return timesteps, alphas_cumprod, scheduler_config.get("prediction_type", prediction_type)
