"""Tiny stand-ins for registry models (same fields as srds_trt.models.LoadedUNet), shared by the export tests.

No tests here: the registry may be absent, and the real models are too big for fast tests anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
             "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


@dataclass(frozen=True)
class Spec:
    name: str
    source: str
    family: str
    resolution: int
    prediction_type: str


@dataclass
class Loaded:
    spec: Spec
    unet: torch.nn.Module
    scheduler_config: dict
    conditioning: str
    sample_shape: tuple
    cond_shape: tuple
    null_class: Any
    vae_scaling_factor: float
    weights_id: str


def digits_like(seed: int = 0, name: str = "digits") -> Loaded:
    """The digits model's shape: 1×16×16 pixels, 10 classes + a null class for guidance."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=11, attention_head_dim=8,
    ).eval()
    return Loaded(Spec(name, "test", "digits", 16, "epsilon"), unet, dict(SCHEDULER), "class", (1, 16, 16), (),
                  10, 1.0, f"test-digits-{seed}")


def text_like(seed: int = 0, name: str = "tiny-sd") -> Loaded:
    """An SD-shaped UNet in miniature: 4×8×8 latents (64-pixel images), 7×32 text embeddings."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, upcast_attention=True,
    ).eval()
    config = dict(SCHEDULER, prediction_type="v_prediction")
    return Loaded(Spec(name, "test", "sd", 64, "v_prediction"), unet, config, "text", (4, 8, 8), (7, 32),
                  None, 0.18215, f"test-sd-{seed}")
