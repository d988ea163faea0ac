"""What every sampler shares: the model contract, the result type, state precision and grid checks.

`model(x[rows, ...], t[rows]) -> output[rows, ...]` with per-row timesteps. Samplers stack the rows of every
live point segment-major: row r of a call belongs to image r % batch, so conditioning wrappers (guidance.py)
can tile per-image embeddings without knowing the schedule. States are kept in at least float32 whatever `x` is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .ddim import as_grid

Model = Callable[[Tensor, Tensor], Tensor]


class Cancelled(Exception):
    """The caller's cancel() returned True at an iteration, sweep or step boundary: the call stopped there."""


def check_cancel(cancel: Callable[[], bool] | None, where: str) -> None:
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled after {where}")


@dataclass
class SampleResult:
    """What every sampler returns (reference samplers and runtime runners alike).

    iterations: parallel iterations run (SRDS: Parareal iterations, 0 = the coarse sample alone; ParaDiGMS: Picard
    sweeps; serial: None). sequential_calls: batched model calls on the critical path (hardware-free latency).
    model_evals: state rows evaluated in all calls (x2 engine rows under guidance). residuals: the max-abs change
    per iteration; error_estimates: what the stopping rule compared with tol. converged: stopped by the rule or
    by exactness, not by max_iters.
    """

    sample: Tensor
    sampler: str
    iterations: int | None
    model_evals: int
    sequential_calls: int
    residuals: list[float] = field(default_factory=list)
    error_estimates: list[float] = field(default_factory=list)
    converged: bool = False
    tol: float = 0.0  # the tolerance used (a runtime raises a positive tol above its engine's noise floor)
    accept_tol: float | None = None  # sliding-window samplers: the per-point threshold run for tol (stopping.py)
    num_blocks: int | None = None  # SRDS-family samplers
    window: int | None = None  # ParaDiGMS: points per sweep
    slides: list[int] = field(default_factory=list)  # ParaDiGMS: how far the window advanced per sweep
    boundary_changes: list[list[float]] = field(default_factory=list)  # SRDS: per-boundary changes, per iteration
    ticks_launched: int | None = None  # runtime: includes speculative ticks launched while a residual was in flight
    engine_calls: dict[int, int] = field(default_factory=dict)  # runtime: engine bucket -> calls


def state_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def check_grid(x: Tensor, timesteps: Tensor) -> Tensor:
    timesteps = as_grid(timesteps)
    if timesteps.dim() != 1 or timesteps.numel() < 2:
        raise ValueError("timesteps must be a 1-D tensor of N+1 >= 2 grid points t_0 > ... > t_N")
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing, got {timesteps.tolist()}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a batch [images, ...] with at least one image")
    return timesteps


