"""What the samplers are benchmarked on: a model contract, starting noise, a DDIM grid per N, and a scorer.

- gmm: the analytic Gaussian mixture (srds_trt.models.analytic.hard_mixture): its model is exact, so serial DDIM is
  the exact solution of the sampler's ODE and every difference is the parallel sampler's own error. Its schedule is
  a cosine one (squaredcos_cap_v2) over 1024 training steps, so N = 1024 is a valid grid, with
  "linspace" spacing (t_0 = 1023 down to 0, then the clean end): diffusers' "trailing" spacing returns N + 1
  timesteps, one of them -1, for 1024 training steps at N = 196 (float arange overshoot).
- digits: the embedded class-conditional digits UNet (srds_trt.models, "digits") with classifier-free guidance,
  one image per class cycling 0..9; scored by an SVC trained on scikit-learn's 8x8 digits. Its training schedule
  has 1000 steps; N = 1024 runs on ddim_grid's fractional-timestep grid (run.BenchConfig.digits_max_steps says why
  the committed set stops at 196).
- digits-random: the same UNet architecture with seeded random weights, for exercising the harness before the
  weights exist (timings are real, accuracy is meaningless and not reported).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from srds_trt.samplers.timesteps import ddim_grid

CASES = ("gmm", "digits", "digits-random")

# Gaussian-mixture variants for the matched sampler comparison (benchmarks/matched.py): besides hard_mixture (8
# narrow modes in 2-D, "hard2"), wider and higher-dimensional mixtures with uneven weights, so that a sampler is
# not tuned to one geometry. name -> (dim, modes, std, seed of means/weights, spread of the means, uneven weights).
MIXTURES = {
    "hard2": None,  # srds_trt.models.analytic.hard_mixture (dim 2, 8 modes, std 0.05)
    "wide2": dict(dim=2, modes=3, std=0.3, seed=3, spread=2.0, uneven=True),
    "mix16": dict(dim=16, modes=6, std=0.1, seed=1, spread=2.0, uneven=True),
    "mix64": dict(dim=64, modes=10, std=0.2, seed=2, spread=1.0, uneven=True),
}

# A cosine training schedule over 1024 steps, linspace spacing (see the module docstring).
GMM_SCHEDULER = {"num_train_timesteps": 1024, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
                 "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "linspace", "steps_offset": 0}
# Fallback architecture for digits-random when srds_trt/models/digits/config.json is absent
# (scripts/train_digits.py: build_unet).
DIGITS_UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": (16, 32, 64),
               "layers_per_block": 1, "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
               "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), "norm_num_groups": 8,
               "attention_head_dim": 32, "num_class_embeds": 11}
DIGITS_NULL_CLASS = 10
DEFAULT_GUIDANCE = 4.0


class CaseUnavailable(RuntimeError):
    """The case cannot run here (e.g. the digits weights are not in the package yet)."""


@dataclass
class Case:
    name: str
    model: Callable[[Tensor, Tensor], Tensor]
    x: Tensor  # starting noise [images, ...] on the device
    scheduler_config: dict
    prediction_type: str
    description: str
    score: Callable[[Tensor], float] | None = None  # sample -> accuracy in [0, 1]

    def grid(self, num_steps: int) -> tuple[Tensor, Tensor, int]:
        """(timesteps, alphas_cumprod, N): N above the training schedule's length gets fractional timesteps."""
        timesteps, alphas = ddim_grid(self.scheduler_config, num_steps)
        return timesteps, alphas, len(timesteps) - 1


def build_case(name: str, *, images: int, device: torch.device, seed: int = 0) -> Case:
    if name == "gmm":
        return _gmm_case(images, device, seed)
    if name in ("digits", "digits-random"):
        return _digits_case(images, device, seed, random_weights=name == "digits-random")
    raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")


def mixture(alphas_cumprod: Tensor, *, dim: int, modes: int, std: float, seed: int, spread: float = 2.0,
            uneven: bool = False):
    """A seeded analytic mixture: means N(0, spread^2 I), one std, weights uniform or uniform(0.2, 1.2) normalised."""
    from srds_trt.models.analytic import GaussianMixture

    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=gen, dtype=torch.float64) * spread
    weights = torch.rand(modes, generator=gen, dtype=torch.float64) + 0.2 if uneven else torch.ones(modes, dtype=torch.float64)
    return GaussianMixture(means, torch.full((modes,), std, dtype=torch.float64), weights / weights.sum(),
                           torch.as_tensor(alphas_cumprod, dtype=torch.float64))


def mixture_case(name: str, *, images: int, device: torch.device, seed: int = 0) -> Case:
    """One of MIXTURES on the GMM_SCHEDULER grid, float64, `images` samples."""
    from srds_trt.models.analytic import hard_mixture

    _, alphas = ddim_grid(GMM_SCHEDULER, 1)
    spec = MIXTURES[name]
    gmm = hard_mixture(alphas) if spec is None else mixture(alphas, **spec)
    dim = gmm.means.shape[1]
    x = torch.randn(images, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    what = "8 modes, std 0.05, equal weights" if spec is None else (
        f"{spec['modes']} modes, std {spec['std']:g}, {'uneven' if spec['uneven'] else 'equal'} weights")
    return Case(name, gmm, x.to(device), dict(GMM_SCHEDULER), "epsilon",
                f"analytic Gaussian mixture in {dim}-D ({what}), float64, {images} samples")


def _gmm_case(images: int, device: torch.device, seed: int) -> Case:
    from srds_trt.models.analytic import hard_mixture

    _, alphas = ddim_grid(GMM_SCHEDULER, 1)
    gmm = hard_mixture(alphas)
    x = torch.randn(images, gmm.means.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Case("gmm", gmm, x.to(device), dict(GMM_SCHEDULER), "epsilon",
                f"analytic 8-mode Gaussian mixture in 2-D (std 0.05), float64, {images} samples")


def _digits_case(images: int, device: torch.device, seed: int, random_weights: bool) -> Case:
    from srds_trt.samplers.guidance import classifier_free_guidance
    from srds_trt.models import load_unet, unet_model_fn
    from srds_trt.models.registry import KNOWN_MODELS

    folder = KNOWN_MODELS["digits"].source
    meta_file = f"{folder}/digits_meta.json"
    try:
        loaded = load_unet("digits", device=device, random_weights=random_weights)
        cond_model, scheduler_config = unet_model_fn(loaded), loaded.scheduler_config
        null_class, shape = loaded.null_class, loaded.sample_shape
    except Exception as exc:  # the package has no digits folder / no weights yet
        if not random_weights:
            raise CaseUnavailable(f"digits weights are not available ({type(exc).__name__}: {exc}); "
                                  f"train them with `python scripts/train_digits.py` (writes {folder})") from exc
        cond_model, scheduler_config, null_class, shape = _random_digits(device, seed)
    try:
        with open(meta_file) as fh:
            scale = float(json.load(fh).get("default_guidance_scale", DEFAULT_GUIDANCE))
    except OSError:
        scale = DEFAULT_GUIDANCE
    labels = (torch.arange(images) % 10).to(device)
    model = classifier_free_guidance(cond_model, cond=labels, uncond=torch.full_like(labels, null_class), scale=scale)
    x = torch.randn(images, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    kind = "random weights (harness check)" if random_weights else "trained"
    if not random_weights and not _has_sklearn():
        kind += "; accuracy not measured: scikit-learn is not installed"
    score = None if random_weights or not _has_sklearn() else _digits_scorer(labels.cpu().numpy())
    return Case("digits-random" if random_weights else "digits", model, x, dict(scheduler_config), "epsilon",
                f"digits UNet ({kind}), 16x16, CFG scale {scale:g}, fp32, {images} images (classes 0..9 cycling)",
                score)


def _random_digits(device: torch.device, seed: int):
    from diffusers import UNet2DModel

    from srds_trt.models.loading import seeded_init

    unet = seeded_init(lambda: UNet2DModel(**DIGITS_UNET), seed)
    torch.nn.Module.to(unet, device=device).eval().requires_grad_(False)

    def cond_model(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return unet(x, t, class_labels=cond).sample

    config = dict(GMM_SCHEDULER, num_train_timesteps=1000, timestep_spacing="trailing")
    return cond_model, config, DIGITS_NULL_CLASS, (1, 16, 16)


def digits_features(pixels: Tensor) -> np.ndarray:
    """[n, 1, 16, 16] in [-1, 1] -> [n, 64] on load_digits' 8x8, 0..16 scale (2x2 average pooling)."""
    small = torch.nn.functional.avg_pool2d(pixels.detach().float().cpu(), 2)
    return ((small + 1) * 8).clamp(0, 16).flatten(1).numpy()


def _has_sklearn() -> bool:
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """SVC on the real 8x8 digits, passed through the model's 8->16 bilinear upsampling and back (fit once)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8 - 1
    up = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return SVC(gamma=0.001, C=10).fit(digits_features(up), digits.target)


def _digits_scorer(labels: np.ndarray) -> Callable[[Tensor], float]:
    def score(sample: Tensor) -> float:
        return float((digits_classifier().predict(digits_features(sample.clamp(-1, 1))) == labels).mean())

    return score
