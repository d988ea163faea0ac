"""A Gaussian-mixture data distribution whose noise prediction is known exactly.

Under the forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps, a mixture sum_k w_k N(mu_k, s_k^2 I) stays a
mixture: sum_k w_k N(sqrt(a) mu_k, (a s_k^2 + 1 - a) I). Its score is closed-form, so the "model" is exact and
every error a sampler shows is the sampler's own. Trajectories bend sharply where the modes separate, which
makes it a hard case for Parareal stopping rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..samplers.ddim import alphas_at


@dataclass(frozen=True)
class GaussianMixture:
    means: Tensor  # [K, d]
    stds: Tensor  # [K]
    weights: Tensor  # [K], sums to 1
    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact epsilon prediction E[eps | x_t = x] for rows x [rows, d] at per-row timesteps t [rows]."""
        dtype = x.dtype
        x = x.to(torch.float64)
        a = alphas_at(t, self.alphas_cumprod).to(x.device).view(-1, 1, 1)  # [rows, 1, 1]
        means = self.means.to(x)[None] * a.sqrt()  # [rows, K, d]
        var = (a * self.stds.to(x)[None, :, None] ** 2 + 1 - a)  # [rows, K, 1]
        diff = x[:, None, :] - means
        d = x.shape[1]
        log_p = torch.log(self.weights.to(x))[None] - 0.5 * (diff**2 / var).sum(-1) - 0.5 * d * torch.log(var[..., 0])
        resp = torch.softmax(log_p, dim=1)[..., None]  # [rows, K, 1]
        score = -(resp * diff / var).sum(1)
        return (-(1 - a[:, :, 0]).sqrt() * score).to(dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        eps = self.eps(x, t)
        if self.prediction_type == "epsilon":
            return eps
        a = alphas_at(t, self.alphas_cumprod).to(x.device, x.dtype).view(-1, 1)
        # v = sqrt(a) eps - sqrt(1 - a) x0 with x0 consistent with (x, eps)
        return eps / a.sqrt() - ((1 - a) / a).sqrt() * x


def hard_mixture(alphas_cumprod: Tensor, dim: int = 2, prediction_type: str = "epsilon") -> GaussianMixture:
    """Well-separated narrow modes: the sample's mode is decided late and sharply."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(8, dim, generator=gen, dtype=torch.float64) * 2.0
    return GaussianMixture(
        means=means,
        stds=torch.full((8,), 0.05, dtype=torch.float64),
        weights=torch.full((8,), 1 / 8, dtype=torch.float64),
        alphas_cumprod=torch.as_tensor(alphas_cumprod, dtype=torch.float64),
        prediction_type=prediction_type,
    )
