"""Text conditioning for SD-family UNets: CLIP encoder + VAE decoder from a diffusers folder, or seeded random
stand-ins of the right shapes (timing without weights)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .loading import LoadedUNet, random_weights_config, sd_folder, seeded_init
from .registry import read_json


@dataclass
class TextStack:
    """How an SD pipeline turns prompts into encoder_hidden_states and latents into pixels."""

    encode: Callable[[list[str]], Tensor]  # prompts -> [n, L, D]
    decode: Callable[[Tensor], Tensor]  # latents -> pixels in [-1, 1]
    description: str


def text_stack(loaded: LoadedUNet) -> TextStack:
    """CLIP text encoder, tokenizer and VAE of a diffusers SD folder (local or HF cache)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = sd_folder(loaded.spec)
    device, dtype = next(loaded.unet.parameters()).device, next(loaded.unet.parameters()).dtype
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).to(device, dtype).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, low_cpu_mem_usage=False)
    vae = torch.nn.Module.to(vae, device, dtype).eval()
    length = loaded.cond_shape[0]

    def encode(prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return encoder(ids.input_ids.to(device))[0]

    return TextStack(encode, vae_decoder(vae, loaded.vae_scaling_factor), f"CLIP + VAE from {folder}")


def random_text_stack(loaded: LoadedUNet, seed: int, vae_config: dict | None = None) -> TextStack:
    """For timing without weights: the real VAE architecture with seeded random weights, and seeded random
    text embeddings of the right shape instead of a text encoder (no tokenizer vocabulary ships offline; the
    text encoder runs once per call and does not affect the sampler's timing)."""
    from diffusers import AutoencoderKL

    source = Path(loaded.spec.source)
    if vae_config is None:
        vae_config = read_json(source / "vae" / "config.json") if source.is_dir() else random_weights_config(loaded.spec)["vae"]
    device, dtype = next(loaded.unet.parameters()).device, next(loaded.unet.parameters()).dtype
    vae = torch.nn.Module.to(seeded_init(lambda: AutoencoderKL.from_config(vae_config), seed), device, dtype).eval()

    def encode(prompts: list[str]) -> Tensor:
        rows = [torch.randn(loaded.cond_shape, generator=torch.Generator().manual_seed(seed ^ zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows)

    return TextStack(encode, vae_decoder(vae, loaded.vae_scaling_factor), "random VAE + seeded random text embeddings")


def vae_decoder(vae, scaling_factor: float) -> Callable[[Tensor], Tensor]:
    def decode(latents: Tensor) -> Tensor:
        shift = vae.config.get("shift_factor") or 0.0  # SD3 / Flux latents are shifted as well as scaled
        return vae.decode(latents.to(vae.dtype) / scaling_factor + shift).sample.clamp(-1, 1)

    return decode
