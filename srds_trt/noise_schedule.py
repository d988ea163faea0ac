"""Timestep grids as plain tensors, built from a diffusers scheduler config.

diffusers' DDIMScheduler keeps a step counter; SRDS advances many time points in one call, so the grid is
materialised once: N+1 points t_0 > ... > t_N where t_N = -1 means the clean end (alpha_cumprod = 1,
DDIM's set_alpha_to_one=True). We let diffusers compute the timesteps so spacing options
("leading", "trailing", "linspace", steps_offset) mean exactly what they mean there.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


def ddim_grid(scheduler_config: Mapping[str, Any], num_steps: int) -> tuple[Tensor, Tensor]:
    """(timesteps [N+1] long, alphas_cumprod float64) of an N-step DDIM sampler for this config."""
    from diffusers import DDIMScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    config = dict(scheduler_config)
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    scheduler = DDIMScheduler.from_config(config)
    if num_steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"num_steps must be <= {scheduler.config.num_train_timesteps} (the training schedule's length)")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.to(torch.long)
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
