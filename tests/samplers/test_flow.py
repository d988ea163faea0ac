"""Flow matching: the sigma grid against diffusers' FlowMatchEulerDiscreteScheduler, the exact mixture velocity,
and the SD3 / Flux transformer wrappers against the diffusers pipelines' own helpers."""

from __future__ import annotations

import pytest
import torch

from srds_trt.samplers.flow import (FlowGaussianMixture, FlowMatchEuler, calculate_shift, flow_scheduler,
                                    flow_sigmas, flux_sigmas, hard_flow_mixture, model_timesteps, mu_for)

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def test_calculate_shift_is_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as sd3_shift

    for seq in (16, 256, 1024, 4096, 6000):
        assert calculate_shift(seq) == sd3_shift(seq) == flux_shift(seq)
        assert calculate_shift(seq, 128, 2048, 0.3, 1.2) == sd3_shift(seq, 128, 2048, 0.3, 1.2)


@pytest.mark.parametrize("config,kwargs,steps", [
    ({"num_train_timesteps": 1000}, {}, 10),
    (SD3_SCHEDULER, {}, 28),
    ({"num_train_timesteps": 1000, "shift": 2.0}, {}, 1),
    ({"num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": 0.02}, {}, 20),
    (FLUX_SCHEDULER, {"image_seq_len": 4096}, 28),
    (FLUX_SCHEDULER, {"image_seq_len": 1024, "flux": True}, 50),
])
def test_sigma_grid_is_diffusers(config, kwargs, steps):
    """The grid is the scheduler's own sigmas, bit for bit, and what the model sees its own timesteps."""
    kwargs = dict(kwargs)
    custom = flux_sigmas(steps) if kwargs.pop("flux", False) else None
    grid = flow_sigmas(config, steps, sigmas=custom, **kwargs)
    scheduler = flow_scheduler(config)
    extra = {"mu": mu_for(scheduler.config, kwargs["image_seq_len"])} if "image_seq_len" in kwargs else {}
    if custom is not None:
        scheduler.set_timesteps(sigmas=custom, **extra)
    else:
        scheduler.set_timesteps(steps, **extra)
    assert grid.dtype == torch.float64 and len(grid) == steps + 1 and grid[-1] == 0
    assert torch.equal(grid, scheduler.sigmas.double())
    assert torch.equal(model_timesteps(grid[:-1]), scheduler.timesteps)
    assert (grid[1:] < grid[:-1]).all()


def test_shift_moves_the_grid_toward_noise():
    plain, shifted = flow_sigmas({"shift": 1.0}, 10), flow_sigmas({"shift": 3.0}, 10)
    assert (shifted[1:-1] > plain[1:-1]).all()


def test_dynamic_shifting_needs_the_sequence_length():
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_sigmas(FLUX_SCHEDULER, 10)
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(SD3_SCHEDULER, 0)


def test_euler_coefficients():
    sigmas = flow_sigmas(SD3_SCHEDULER, 7)
    c_x, c_out = FlowMatchEuler().coefficients(sigmas[:-1], sigmas[1:])
    assert torch.equal(c_x, torch.ones(7, dtype=torch.float64))
    assert torch.equal(c_out, sigmas[1:] - sigmas[:-1])
    # a coarse step over a block is the one Euler step over its sigma span
    c_x, c_out = FlowMatchEuler().coefficients(sigmas[[0, 3]], sigmas[[3, 7]])
    assert torch.equal(c_out, torch.stack([sigmas[3] - sigmas[0], sigmas[7] - sigmas[3]]))


def _log_density(mix: FlowGaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    var = (1 - sigma) ** 2 * mix.stds**2 + sigma**2  # [K]
    diff = x[:, None, :] - (1 - sigma) * mix.means[None]
    log_p = mix.weights.log() - 0.5 * (diff**2).sum(-1) / var - 0.5 * x.shape[1] * var.log()
    return torch.logsumexp(log_p, 1)


@pytest.mark.parametrize("sigma", [0.97, 0.6, 0.2, 0.03])
def test_mixture_velocity_is_exact(sigma):
    """v = E[n - x0 | x] = (E[n | x] - x) / (1 - sigma) with E[n | x] = -sigma grad log p (Tweedie), by autograd."""
    mix = hard_flow_mixture(dim=3)
    gen = torch.Generator().manual_seed(1)
    x0 = mix.means[torch.randint(0, 8, (16,), generator=gen)]
    x = ((1 - sigma) * x0 + sigma * torch.randn(16, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    score = torch.autograd.grad(_log_density(mix, x, sigma).sum(), x)[0]
    expected = (-sigma * score - x) / (1 - sigma)
    v = mix(x.detach(), torch.full((16,), sigma, dtype=torch.float64))
    assert torch.allclose(v, expected.detach(), rtol=1e-9, atol=1e-9)


def test_prior_slope_is_the_gaussian_velocity_slope():
    """Unit-variance Gaussian data: the velocity is exactly linear in x with the prior slope."""
    mix = FlowGaussianMixture(torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                              torch.ones(1, dtype=torch.float64))
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.0], dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    slope = FlowMatchEuler().prior_slope(sigmas)
    assert torch.allclose(mix(x, sigmas), slope[:, None] * x, atol=1e-12)
    assert slope[0] == 1 and slope[2] == 0 and slope[-1] == -1


def test_transformer_packing_is_flux_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from srds_trt.models.transformers import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(3, 16, 8, 6)
    tokens = pack_latents(x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, 16, 8, 6))
    assert torch.equal(unpack_latents(tokens, 8, 6), FluxPipeline._unpack_latents(tokens, 64, 48, 8))
    assert torch.equal(unpack_latents(tokens, 8, 6), x)
    assert torch.equal(latent_image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_real_shaped_configs_build_the_public_architectures(kind):
    """The embedded configs are the public SD3-medium / FLUX.1-dev shapes (checked without building them)."""
    from srds_trt.models.transformers import transformer_config

    config = transformer_config(kind)
    arch = config["transformer"]
    heads, head_dim = arch["num_attention_heads"], arch["attention_head_dim"]
    if kind == "sd3":
        assert (arch["num_layers"], heads * head_dim, arch["patch_size"]) == (24, 1536, 2)
        assert config["guidance"] == "classifier-free" and not config["scheduler"].get("use_dynamic_shifting")
    else:
        assert (arch["num_layers"], arch["num_single_layers"], heads * head_dim) == (19, 38, 3072)
        assert arch["guidance_embeds"] and config["scheduler"]["use_dynamic_shifting"]
        assert sum(arch["axes_dims_rope"]) == head_dim
