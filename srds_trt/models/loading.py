"""Load a registry model's UNet (real or seeded random weights) behind one model contract.

`unet_model_fn` turns any loaded UNet into cond_model(x[rows, C, H, W], t[rows], cond[rows, ...]); guidance
and the samplers never see diffusers. Hub models are read from the local HF cache only (local_files_only):
this workplace has no hub, and a silent download would be a surprise anywhere else.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from .weights import LoadedUNet, files_sha256, random_weights_id, weight_files as _weight_files  # noqa: F401
from .registry import (CONFIGS_DIR, KNOWN_MODELS, RANDOM_WEIGHT_CONFIGS, ModelSpec, WeightsUnavailableError,
                       describe_folder, read_json, resolve_model, vae_scale_factor)

DEFAULT_TEXT_LENGTH = 77


def load_unet(name_or_path: str, *, device="cpu", dtype=torch.float32, random_weights: bool = False, seed: int = 0,
              resolution: int | None = None) -> LoadedUNet:
    """The model's UNet, its DDIM config and the shapes of its inputs.

    random_weights builds the real architecture from its config with weights drawn from torch's default
    initialisers under `seed` (for timing and export without weights); registry SD models use the configs
    embedded in srds_trt/models/configs, so nothing is downloaded.
    """
    spec = resolve_model(name_or_path)
    if spec.name not in KNOWN_MODELS and not Path(spec.source).is_dir():  # a hub id: what its cached snapshot is
        spec = describe_folder(spec.name, sd_folder(spec))  # (SD, SD3, Flux, ...), from model_index.json
    if spec.family == "digits":
        loaded = _load_pixel_unet(spec, random_weights, seed)
    elif spec.family in ("sd3", "flux"):
        from .transformers import load_flow_transformer

        loaded = load_flow_transformer(spec, random_weights=random_weights, seed=seed, resolution=resolution)
    else:
        loaded = _load_sd_unet(spec, random_weights, seed, resolution)
    # nn.Module.to, not diffusers' override: that one warns about fp32-pinned modules on every dtype cast.
    torch.nn.Module.to(loaded.unet, device=device, dtype=dtype).eval().requires_grad_(False)
    return loaded


def unet_model_fn(loaded: LoadedUNet) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """cond_model(x, t, cond) -> the UNet's raw output (epsilon or v), one call over all rows.

    Inputs are cast to the UNet's dtype and the output back to x's: samplers keep their states in at least
    float32 (sampling.py) while a half-precision UNet computes in fp16.
    """
    if loaded.spec.family in ("sd3", "flux"):  # a flow transformer: its own wrapper (text + pooled in one cond)
        from .transformers import transformer_model_fn

        return transformer_model_fn(loaded)
    if loaded.spec.prediction_type == "flow":  # the samplers' grid is sigma; the UNet saw sigma * 1000 in training
        from ..samplers.flow import model_timesteps

        inner = unet_model_fn_ddpm(loaded)
        return lambda x, t, cond: inner(x, model_timesteps(t).to(x.device), cond)
    return unet_model_fn_ddpm(loaded)


def unet_model_fn_ddpm(loaded: LoadedUNet) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The UNet called at the timesteps it is given."""
    unet, dtype = loaded.unet, loaded.unet.dtype
    if loaded.conditioning == "class":
        def cond_model(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            return unet(x.to(dtype), t, class_labels=cond).sample.to(x.dtype)
    else:
        def cond_model(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            return unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.to(x.dtype)
    return cond_model


@contextmanager
def quiet_loading() -> Iterator[dict]:
    """diffusers' and transformers' loading bars (one per pipeline component, one per weight file) and their
    warnings off while a model loads, their settings restored after: generate draws its own progress, and errors
    still raise. Yields the keyword that keeps diffusers from warning about accelerate on every load
    (low_cpu_mem_usage only where accelerate can provide it)."""
    from diffusers.utils import is_accelerate_available
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libs = [(lib, lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in libs:
        lib.disable_progress_bar()
        lib.set_verbosity_error()  # e.g. transformers' "image processor requires torchvision" on a pipeline import
    try:
        yield {"low_cpu_mem_usage": is_accelerate_available()}
    finally:
        for lib, bars, verbosity in libs:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def sd_folder(spec: ModelSpec) -> Path:
    """The local diffusers folder of a text-conditioned model: the folder given, or its snapshot in the HF cache
    (T5's spiece.model included)."""
    path = Path(spec.source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.source, local_files_only=True,
                                      allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors", "*.bin"]))
    except Exception as exc:  # LocalEntryNotFoundError, offline mode, a half-filled cache: all mean "not here"
        raise WeightsUnavailableError(spec, type(exc).__name__) from exc


def random_weights_config(spec: ModelSpec) -> dict:
    """The embedded {unet, vae, scheduler, text_embedding} configs of a registry SD model."""
    if spec.name not in RANDOM_WEIGHT_CONFIGS:
        raise WeightsUnavailableError(spec, "no embedded architecture config for random weights")
    return read_json(CONFIGS_DIR / f"{RANDOM_WEIGHT_CONFIGS[spec.name]}.json")


def ddim_config(config: dict) -> dict:
    """A model's scheduler config as the DDIM config SRDS runs: final step lands on the clean image, no clipping."""
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    out.update(_class_name="DDIMScheduler", set_alpha_to_one=True, clip_sample=False)
    return out


def flow_config(config: dict) -> dict:
    """A flow model's FlowMatchEulerDiscreteScheduler config as shipped (the Euler grid is the scheduler's own)."""
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    out["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    return out


def seeded_init(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a module with torch's default initialisers under `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load_pixel_unet(spec: ModelSpec, random_weights: bool, seed: int) -> LoadedUNet:
    from diffusers import UNet2DModel

    folder = Path(spec.source)
    config = read_json(folder / "config.json")
    if random_weights:
        unet = seeded_init(lambda: UNet2DModel.from_config(config), seed)
        weights_id = random_weights_id(seed, config)
    else:
        files = _weight_files(folder)
        if not files:
            raise WeightsUnavailableError(spec, f"no weight files in {folder}")
        unet = UNet2DModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        weights_id = files_sha256(files)
    meta_file = folder / "digits_meta.json"
    meta = read_json(meta_file) if meta_file.is_file() else {}
    classes = config.get("num_class_embeds")
    null_class = meta.get("null_class", classes - 1 if classes else None)
    channels = int(config.get("in_channels", 1))
    size = int(config.get("sample_size", spec.resolution))
    scheduler = read_json(folder / "scheduler_config.json")
    scheduler = flow_config(scheduler) if spec.prediction_type == "flow" else ddim_config(scheduler)
    return LoadedUNet(spec, unet, scheduler, "class",
                      (channels, size, size), (), null_class, None, weights_id)


def _load_sd_unet(spec: ModelSpec, random_weights: bool, seed: int, resolution: int | None) -> LoadedUNet:
    from diffusers import UNet2DConditionModel

    if random_weights and Path(spec.source).is_dir():
        folder = Path(spec.source)
        configs = {"unet": read_json(folder / "unet" / "config.json"), "vae": read_json(folder / "vae" / "config.json"),
                   "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
                   "text_embedding": _text_embedding(folder)}
    elif random_weights:
        configs = random_weights_config(spec)
    else:
        folder = sd_folder(spec)
        configs = None
    if configs is not None:
        unet = seeded_init(lambda: UNet2DConditionModel.from_config(configs["unet"]), seed)
        weights_id = random_weights_id(seed, configs["unet"])
    else:
        files = _weight_files(folder / "unet") if (folder / "unet").is_dir() else []
        if not files:
            raise WeightsUnavailableError(spec, f"no UNet weights under {folder}")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                    low_cpu_mem_usage=False)
        weights_id = files_sha256(files)
        configs = {"vae": read_json(folder / "vae" / "config.json"),
                   "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
                   "text_embedding": _text_embedding(folder)}
    latent = (resolution or spec.resolution) // vae_scale_factor(configs["vae"])
    text = configs["text_embedding"]
    return LoadedUNet(spec, unet, ddim_config(configs["scheduler"]), "text",
                      (int(unet.config.in_channels), latent, latent), (text["max_length"], int(unet.config.cross_attention_dim)),
                      None, float(configs["vae"].get("scaling_factor", 0.18215)), weights_id)


def _text_embedding(folder: Path) -> dict:
    config_file = folder / "text_encoder" / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    return {"max_length": int(config.get("max_position_embeddings", DEFAULT_TEXT_LENGTH))}
