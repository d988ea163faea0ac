"""Flow matching: the velocity field's Euler solver on diffusers' FlowMatchEulerDiscreteScheduler sigma grid.

A flow-matching model (SD3, Flux, the digits-flow model) learns the velocity v = noise - x0 of the straight path
x_sigma = (1 - sigma) x0 + sigma noise, sigma from 1 (noise) to 0 (data). Its Euler step

    x_to = x_from + (sigma_to - sigma_from) v(x_from, sigma_from)

is affine in (state, model output) like a DDIM step, with c_x = 1 and c_out = sigma_to - sigma_from, so every
sampler written over per-step (c_x, c_out) coefficients runs it unchanged (FlowMatchEuler.coefficients).

The grid handed to the samplers is the sigma grid itself, sigma_0 = 1 > ... > sigma_N = 0, exactly the values
(float32, as float64) diffusers' scheduler computes: ``shift``, ``use_dynamic_shifting`` with mu from the image
sequence length as the SD3 / Flux pipelines compute it, ``shift_terminal``, custom ``sigmas`` (Flux passes
linspace(1, 1/N, N)). The model sees the timestep sigma * num_train_timesteps formed in float32 as diffusers
forms it (``model_timesteps``): that conversion is the model wrapper's business, not the solver's.

Also here: a Gaussian-mixture data distribution whose velocity field is known in closed form (FlowGaussianMixture),
the flow counterpart of analytic.GaussianMixture, so every error a sampler shows on it is the sampler's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

FLOW_PREDICTION = "flow"  # the model predicts the velocity noise - x0


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu for dynamic shifting, linear in the image's token count: diffusers' SD3 / Flux pipelines'
    ``calculate_shift``, written out because importing a pipeline module pulls in transformers (test-checked)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def mu_for(scheduler_config: Mapping[str, Any], image_seq_len: int) -> float:
    """mu as the pipelines derive it from the scheduler config and the image's token count."""
    return calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", 1.15))


def flux_sigmas(num_steps: int) -> list[float]:
    """The custom sigmas the Flux pipeline hands the scheduler before shifting: linspace(1, 1/N, N)."""
    import numpy as np

    return np.linspace(1.0, 1 / num_steps, num_steps).tolist()


def flow_scheduler(scheduler_config: Mapping[str, Any]):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def flow_sigmas(scheduler_config: Mapping[str, Any], num_steps: int, *, image_seq_len: int | None = None,
                mu: float | None = None, sigmas: Sequence[float] | None = None) -> Tensor:
    """The N+1 sigmas (float64, sigma_N = 0) of diffusers' FlowMatchEulerDiscreteScheduler for N steps.

    diffusers computes them (set_timesteps), so every option means what it means there. With dynamic shifting,
    mu comes from `mu` or, as the SD3 / Flux pipelines do, from `image_seq_len` (tokens: (H / patch) * (W / patch)
    latent pixels). `sigmas`: custom pre-shift sigmas (flux_sigmas for the Flux pipeline's).
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    scheduler = flow_scheduler(scheduler_config)
    kwargs: dict[str, Any] = {}
    if scheduler.config.use_dynamic_shifting:
        if mu is None:
            if image_seq_len is None:
                raise ValueError("this scheduler shifts dynamically: give image_seq_len (or mu)")
            mu = mu_for(scheduler.config, image_seq_len)
        kwargs["mu"] = mu
    if sigmas is not None:
        if len(sigmas) != num_steps:
            raise ValueError(f"sigmas must have num_steps={num_steps} values, got {len(sigmas)}")
        scheduler.set_timesteps(sigmas=list(sigmas), **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    grid = scheduler.sigmas.to(torch.float64).cpu()
    if len(grid) != num_steps + 1 or bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError(f"the scheduler's {num_steps}-step sigma grid is not strictly decreasing: {grid.tolist()[:4]}...")
    return grid


def model_timesteps(sigmas: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """The timesteps diffusers hands the model for these sigmas: sigma * T in float32 (scheduler.timesteps)."""
    return torch.as_tensor(sigmas).to(torch.float32) * num_train_timesteps


@dataclass(frozen=True)
class FlowMatchEuler:
    """The flow-matching Euler solver over a sigma grid: c_x = 1, c_out = sigma_to - sigma_from.

    The grid points ARE the sigmas. Besides the step coefficients it gives what eps-Picard's window needs:
    the coordinate in which its warm start extrapolates outputs (sigma: Euler is exact for a velocity constant
    in sigma, so a straight path is predicted exactly by a velocity linear in sigma), and the prior slope.
    """

    name = "flow-euler"
    prediction_type = FLOW_PREDICTION

    def coefficients(self, grid_from: Tensor, grid_to: Tensor) -> tuple[Tensor, Tensor]:
        s_from = torch.as_tensor(grid_from, dtype=torch.float64)
        s_to = torch.as_tensor(grid_to, dtype=torch.float64)
        return torch.ones_like(s_from), s_to - s_from

    def extrapolation_coordinate(self, grid: Tensor) -> Tensor:
        return torch.as_tensor(grid, dtype=torch.float64)

    def prior_slope(self, grid: Tensor) -> Tensor:
        """d v / d x for unit-variance Gaussian data: x = (1 - s) x0 + s n ~ N(0, ((1 - s)^2 + s^2) I) and
        E[n - x0 | x] = (s - (1 - s)) / ((1 - s)^2 + s^2) x: +1 at pure noise, 0 at s = 1/2, -1 at the data."""
        s = torch.as_tensor(grid, dtype=torch.float64)
        return (2 * s - 1) / ((1 - s) ** 2 + s**2)

    def noise_variance(self, grid: Tensor) -> Tensor:
        """ParaDiGMS's per-point threshold variance on a flow grid: the DDPM step variance of the equivalent
        variance-preserving process (x / r with r^2 = (1 - s)^2 + s^2, alpha = (1 - s)^2 / r^2), in the flow
        state's units at the point it is compared at (r_{j+1}^2); 0 at the last point, as for DDIM."""
        s = torch.as_tensor(grid, dtype=torch.float64)
        r2 = (1 - s) ** 2 + s**2
        a = (1 - s) ** 2 / r2
        a_from, a_to = a[:-1], a[1:]
        var = (1 - a_to) / (1 - a_from) * (1 - a_from / a_to) * r2[1:]
        return torch.cat([var, var.new_zeros(1)])


@dataclass(frozen=True)
class FlowGaussianMixture:
    """Data sum_k w_k N(mu_k, s_k^2 I) under x_sigma = (1 - sigma) x0 + sigma n: the exact velocity E[n - x0 | x].

    Given component k, x ~ N((1 - sigma) mu_k, var_k I) with var_k = (1 - sigma)^2 s_k^2 + sigma^2, and
    E[n - x0 | x, k] = (sigma - (1 - sigma) s_k^2) / var_k (x - (1 - sigma) mu_k) - mu_k; the velocity is that
    averaged over the posterior responsibilities. Called as a model: (x [rows, d], sigma [rows]) -> v.
    """

    means: Tensor  # [K, d]
    stds: Tensor  # [K]
    weights: Tensor  # [K], sums to 1

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64).to(x.device).view(-1, 1, 1)  # [rows, 1, 1]
        mu = self.means.to(x)[None]  # [1, K, d]
        var = (1 - s) ** 2 * self.stds.to(x)[None, :, None] ** 2 + s**2  # [rows, K, 1]
        diff = x[:, None, :] - (1 - s) * mu  # [rows, K, d]
        d = x.shape[1]
        log_p = torch.log(self.weights.to(x))[None] - 0.5 * (diff**2 / var).sum(-1) - 0.5 * d * torch.log(var[..., 0])
        resp = torch.softmax(log_p, dim=1)[..., None]
        v_k = (s - (1 - s) * self.stds.to(x)[None, :, None] ** 2) / var * diff - mu
        return (resp * v_k).sum(1).to(dtype)


def hard_flow_mixture(dim: int = 2) -> FlowGaussianMixture:
    """analytic.hard_mixture's data (8 narrow, well-separated modes, same seed) under the flow-matching path."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(8, dim, generator=gen, dtype=torch.float64) * 2.0
    return FlowGaussianMixture(means=means, stds=torch.full((8,), 0.05, dtype=torch.float64),
                               weights=torch.full((8,), 1 / 8, dtype=torch.float64))
