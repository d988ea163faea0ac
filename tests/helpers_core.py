"""Shared fixtures for the sampler-core tests: small deterministic models, an independent Parareal reference,
and a counting wrapper. Nothing here imports the code under test except where noted (the analytic GMM).

The reference implementations below are deliberately written from the paper's formulas, not from
srds_trt.samplers.ddim / srds_trt.samplers.plan, so that agreement is evidence and not a tautology.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor


@pytest.fixture(scope="module", autouse=False)
def single_thread():
    """Tiny models on a shared 2-core box: intra-op threads spin against each other (measured 200x slower
    with 2 threads under load). Restored afterwards so other test modules are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    set_alpha_to_one=True,
    clip_sample=False,
    steps_offset=1,
)
LINEAR_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True, clip_sample=False)


def sd_alphas_cumprod(config: dict = SD_CONFIG) -> Tensor:
    """alphas_cumprod of a diffusers config, float64 (the same float32 table diffusers holds, upcast)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config).alphas_cumprod.to(torch.float64)


class RowwiseMLP:
    """A tiny deterministic nonlinear model(x[rows, ...], t[rows]) -> [rows, ...] with a timestep embedding.

    Row-wise: each output row depends only on its own input row and timestep, so batching rows differently
    (as SRDS does) cannot change a row's value beyond float rounding. Works for any trailing shape: the
    trailing dims are flattened to `features`.
    """

    def __init__(self, features: int, hidden: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(features, hidden, generator=gen, dtype=torch.float64) / math.sqrt(features)
        self.wt = torch.randn(8, hidden, generator=gen, dtype=torch.float64)
        self.b1 = torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.1
        self.w2 = torch.randn(hidden, features, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
        self.freqs = torch.exp(torch.linspace(0.0, -6.0, 4, dtype=torch.float64))
        self.features = features
        self.calls = 0

    def embed(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        arg = t.to(torch.float64)[:, None] * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1).to(dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],), (t.shape, x.shape)
        assert t.dtype == torch.long
        flat = x.reshape(x.shape[0], -1)
        w1, wt, b1, w2 = (w.to(x.dtype) for w in (self.w1, self.wt, self.b1, self.w2))
        h = torch.tanh(flat @ w1 + self.embed(t, x.dtype) @ wt + b1)
        return (0.5 * torch.tanh(h @ w2) + 0.3 * flat).reshape(x.shape)


@dataclass
class CountingModel:
    """Wraps a model and records every call's row count and timesteps."""

    inner: object
    rows: list[int] = field(default_factory=list)
    timesteps: list[Tensor] = field(default_factory=list)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.rows.append(int(x.shape[0]))
        self.timesteps.append(t.clone())
        return self.inner(x, t)


def alpha_of(t: int, alphas_cumprod: Tensor) -> float:
    return 1.0 if t < 0 else float(alphas_cumprod[t])


def ddim_step_ref(x: Tensor, out: Tensor, a_from: float, a_to: float, prediction_type: str) -> Tensor:
    """DDIM (eta = 0), written the way diffusers' DDIMScheduler.step spells it: predict x0 and eps, re-noise."""
    if prediction_type == "epsilon":
        x0 = (x - math.sqrt(1 - a_from) * out) / math.sqrt(a_from)
        eps = out
    elif prediction_type == "v_prediction":
        x0 = math.sqrt(a_from) * x - math.sqrt(1 - a_from) * out
        eps = math.sqrt(a_from) * out + math.sqrt(1 - a_from) * x
    else:
        raise AssertionError(prediction_type)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


def serial_ref(model, x: Tensor, grid: list[int], alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> Tensor:
    for t_from, t_to in zip(grid[:-1], grid[1:]):
        out = model(x, torch.full((x.shape[0],), t_from, dtype=torch.long))
        x = ddim_step_ref(x, out, alpha_of(t_from, alphas_cumprod), alpha_of(t_to, alphas_cumprod), prediction_type)
    return x


def parareal_ref(model, x: Tensor, grid: list[int], alphas_cumprod: Tensor, bounds: list[int], iterations: int,
                 prediction_type: str = "epsilon") -> list[list[Tensor]]:
    """Textbook Parareal, iteration by iteration: returns U[p][b] for p = 0..iterations, b = 0..B."""
    blocks = len(bounds) - 1

    def coarse(u: Tensor, b: int) -> Tensor:
        return serial_ref(model, u, [grid[bounds[b]], grid[bounds[b + 1]]], alphas_cumprod, prediction_type)

    def fine(u: Tensor, b: int) -> Tensor:
        return serial_ref(model, u, grid[bounds[b]: bounds[b + 1] + 1], alphas_cumprod, prediction_type)

    U = [[x]]
    for b in range(blocks):
        U[0].append(coarse(U[0][b], b))
    for p in range(iterations):
        prev = U[p]
        F = [fine(prev[b], b) for b in range(blocks)]
        G_old = [coarse(prev[b], b) for b in range(blocks)]
        new = [x]
        for b in range(blocks):
            new.append(coarse(new[b], b) + F[b] - G_old[b])
        U.append(new)
    return U


def gaussian_mixture(alphas_cumprod: Tensor, dim: int, seed: int, std: float = 0.02, modes: int = 8,
                     prediction_type: str = "epsilon"):
    """The 'hard' GMM family of the brief: `modes` narrow modes, means 2*randn (seeded)."""
    from srds_trt.models.analytic import GaussianMixture

    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=gen, dtype=torch.float64) * 2.0
    return GaussianMixture(
        means=means,
        stds=torch.full((modes,), std, dtype=torch.float64),
        weights=torch.full((modes,), 1.0 / modes, dtype=torch.float64),
        alphas_cumprod=torch.as_tensor(alphas_cumprod, dtype=torch.float64),
        prediction_type=prediction_type,
    )


def max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())
