"""Timestep grids as plain tensors, built from a diffusers scheduler config.

diffusers' DDIMScheduler keeps a step counter; SRDS advances many time points in one call, so the grid is
materialised once: N+1 points t_0 > ... > t_N where t_N = -1 means the clean end (alpha_cumprod = 1,
DDIM's set_alpha_to_one=True). We let diffusers compute the timesteps so spacing options
("leading", "trailing", "linspace", steps_offset) mean exactly what they mean there.

One deliberate difference: each step goes from t_i to the next grid point t_{i+1}. diffusers' DDIMScheduler.step
lands on t_i - T // N instead, which is the next grid point for "leading" spacing (SD's default) and whenever N
divides T, but not for "linspace", nor for "trailing" with N not dividing T; there diffusers' steps leave the grid
(e.g. linspace, N = 10: the model is called at 999, 888, ... while the steps go 999 -> 899). Chaining the grid is
the DDIM discretisation of that grid; SRDS needs block ends that are grid points anyway.

Grids finer than the training schedule (N > T, e.g. 1024 steps of a 1000-step model) use fractional timesteps,
evenly spaced from T - 1 down to (T - 1) / N, then the clean end; alphas are interpolated (solvers.alphas_at) and
the model sees fractional timesteps (sinusoidal embeddings take any real value).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


def ddim_grid(scheduler_config: Mapping[str, Any], num_steps: int) -> tuple[Tensor, Tensor]:
    """(timesteps [N+1], alphas_cumprod float64) of an N-step DDIM sampler for this config.

    Timesteps are long for N <= T (the training schedule's length), float64 for finer grids.
    """
    from diffusers import DDIMScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    config = dict(scheduler_config)
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    scheduler = DDIMScheduler.from_config(config)
    train_steps = scheduler.config.num_train_timesteps
    if num_steps > train_steps:
        fine = torch.arange(num_steps, 0, -1, dtype=torch.float64) * (train_steps - 1) / num_steps
        end = -1.0 if scheduler.config.set_alpha_to_one else 0.0
        return torch.cat([fine, torch.tensor([end], dtype=torch.float64)]), scheduler.alphas_cumprod.to(torch.float64)
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.to(torch.long)
    # diffusers' float rounding can return N+1 points (e.g. "trailing", T=1024, N=196) or repeat one: refuse that
    # grid rather than sample a different N than asked.
    if len(timesteps) != num_steps or bool((timesteps < 0).any()) or bool((timesteps[1:] >= timesteps[:-1]).any()):
        raise ValueError(
            f"diffusers' {scheduler.config.timestep_spacing!r} spacing gives an invalid {num_steps}-step grid for "
            f"T={train_steps} ({timesteps.tolist()[:4]}...); choose another --steps or timestep_spacing"
        )
    # The point each step lands on, as DDIMScheduler.step computes it; the last one is the clean end.
    step_ratio = scheduler.config.num_train_timesteps // num_steps
    end = int(timesteps[-1]) - step_ratio
    if end >= 0 or not scheduler.config.set_alpha_to_one:
        # Not the clean end: honour the config (final_alpha_cumprod = alphas_cumprod[0] when set_alpha_to_one is False).
        end = max(end, 0)
    else:
        end = -1
    grid = torch.cat([timesteps, torch.tensor([end])])
    return grid, scheduler.alphas_cumprod.to(torch.float64)
