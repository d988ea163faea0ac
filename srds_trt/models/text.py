"""Text conditioning: the text encoders + VAE decoder of a diffusers folder (SD: CLIP; SD3: CLIP-L + CLIP-G + T5;
Flux: CLIP-L + T5), or seeded random stand-ins of the right shapes (timing without weights)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .loading import LoadedUNet, quiet_loading, random_weights_config, sd_folder, seeded_init
from .registry import read_json, vae_scale_factor


@dataclass
class TextStack:
    """How an SD pipeline turns prompts into encoder_hidden_states and latents into pixels."""

    encode: Callable[[list[str]], Tensor]  # prompts -> [n, L, D]
    decode: Callable[[Tensor], Tensor]  # latents -> pixels in [-1, 1]
    description: str
    pixels_per_latent: int  # the VAE's downsampling (registry.vae_scale_factor)


def text_stack(loaded: LoadedUNet) -> TextStack:
    """The text encoders, tokenizers and VAE of a diffusers folder (local or HF cache): CLIP for SD, the
    flow pipelines' own encode_prompt for SD3 / Flux (flow_text_stack)."""
    if loaded.spec.family in ("sd3", "flux"):
        return flow_text_stack(loaded)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = sd_folder(loaded.spec)
    device, dtype = next(loaded.unet.parameters()).device, next(loaded.unet.parameters()).dtype
    with quiet_loading():
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).to(device, dtype).eval()
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, low_cpu_mem_usage=False)
    vae = torch.nn.Module.to(vae, device, dtype).eval()
    length = loaded.cond_shape[0]

    def encode(prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return encoder(ids.input_ids.to(device))[0]

    return TextStack(encode, vae_decoder(vae, loaded.vae_scaling_factor), f"CLIP + VAE from {folder}",
                     vae_scale_factor(vae.config))


def flow_text_stack(loaded: LoadedUNet) -> TextStack:
    """SD3: CLIP-L + CLIP-G (padded to T5's width) then T5 tokens, pooled = both CLIPs' projections; Flux: T5
    tokens, pooled = CLIP-L's. Encoded by diffusers' StableDiffusion3Pipeline / FluxPipeline.encode_prompt (the
    pipeline loaded without its transformer: the sampler's copy is the one in `loaded`), so prompts mean what they
    mean in diffusers; the result packed into the one cond tensor (transformers.pack_cond)."""
    from .transformers import pack_cond, text_length

    folder = sd_folder(loaded.spec)
    device, dtype = next(loaded.unet.parameters()).device, next(loaded.unet.parameters()).dtype
    sd3 = loaded.spec.family == "sd3"
    with quiet_loading() as load_options:
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        pipe = (StableDiffusion3Pipeline if sd3 else FluxPipeline).from_pretrained(
            folder, transformer=None, local_files_only=True, **load_options)
    encoders = [pipe.text_encoder, pipe.text_encoder_2] + ([pipe.text_encoder_3] if sd3 else [])
    for module in encoders + [pipe.vae]:
        torch.nn.Module.to(module, device, dtype).eval()
    t5_tokens = text_length(loaded) - (pipe.tokenizer_max_length if sd3 else 0)

    def encode(prompts: list[str]) -> Tensor:
        with torch.inference_mode():
            if sd3:
                text, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                        do_classifier_free_guidance=False,
                                                        max_sequence_length=t5_tokens)
            else:
                text, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=t5_tokens)
        return pack_cond(text, pooled)

    names = "CLIP-L + CLIP-G + T5" if sd3 else "CLIP-L + T5"
    return TextStack(encode, vae_decoder(pipe.vae, loaded.vae_scaling_factor), f"{names} + VAE from {folder}",
                     vae_scale_factor(pipe.vae.config))


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

    return TextStack(encode, vae_decoder(vae, loaded.vae_scaling_factor), "random VAE + seeded random text embeddings",
                     vae_scale_factor(vae.config))


def vae_decoder(vae, scaling_factor: float) -> Callable[[Tensor], Tensor]:
    def decode(latents: Tensor) -> Tensor:
        shift = vae.config.get("shift_factor") or 0.0  # SD3 / Flux latents are shifted as well as scaled
        return vae.decode(latents.to(vae.dtype) / scaling_factor + shift).sample.clamp(-1, 1)

    return decode
