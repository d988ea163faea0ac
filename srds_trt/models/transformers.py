"""Flow-matching diffusion transformers (SD3 / Flux shapes) behind the samplers' one model contract.

`transformer_model_fn` turns a diffusers SD3Transformer2DModel or FluxTransformer2DModel into
cond_model(x[rows, C, h, w], sigma[rows], cond[rows, L + 1, D]) -> velocity[rows, C, h, w]:

- the state is the latent image [C, h, w] for both (Flux's 2x2 token packing happens inside the wrapper: the
  Euler step is elementwise, so packing commutes with it);
- the sampler's grid is the sigma grid (samplers/flow.py); the model sees the timestep diffusers hands it,
  sigma * 1000 formed in float32 (SD3), and that divided by 1000 again (Flux's pipeline passes timestep / 1000);
- per-row conditioning is ONE tensor, as guidance.py tiles it: rows 0..L-1 the text tokens [L, D], row L the
  pooled embedding in its first P entries; for Flux-dev entry P of row L carries the distilled guidance scale
  (the guidance embedding's input: one call, no doubled rows). SD3 uses classifier-free guidance (one doubled
  call, guidance.classifier_free_guidance).

Configs: srds_trt/models/configs/sd3.json and flux.json (public SD3-medium / FLUX.1-dev configs, random weights
for timing), and TINY_CONFIGS for tests. A loaded transformer is a models.LoadedUNet whose `unet` is the
transformer (one loaded-model type for the pipeline, the runtime and export).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .registry import CONFIGS_DIR, read_json, vae_scale_factor
from ..samplers.flow import model_timesteps

KINDS = ("sd3", "flux")
GUIDANCE = {"sd3": "classifier-free", "flux": "distilled"}

def _tiny_vae(**latent_scale) -> dict:
    """A 4-level AutoencoderKL (8 pixels per latent, as the real ones) of 8 channels, 4 latent channels."""
    return {"_class_name": "AutoencoderKL", "block_out_channels": [8, 8, 8, 8], "latent_channels": 4,
            "layers_per_block": 1, "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 64, **latent_scale}


# Test-sized architectures: same classes, a few thousand parameters, latents 4 x 8 x 8.
TINY_CONFIGS = {
    "sd3": {
        "transformer": {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 8, "caption_projection_dim": 16,
                        "in_channels": 4, "joint_attention_dim": 16, "num_attention_heads": 2, "num_layers": 1,
                        "out_channels": 4, "patch_size": 2, "pooled_projection_dim": 8, "pos_embed_max_size": 8,
                        "sample_size": 8},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        "text_embedding": {"max_length": 6, "hidden_size": 16, "pooled_size": 8},
        "vae": _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),  # SD3's latent scale and shift
    },
    "flux": {
        "transformer": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 8, "axes_dims_rope": [2, 2, 4],
                        "guidance_embeds": True, "in_channels": 16, "joint_attention_dim": 16, "num_attention_heads": 2,
                        "num_layers": 1, "num_single_layers": 1, "patch_size": 1, "pooled_projection_dim": 8},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                      "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                      "use_dynamic_shifting": True},
        "text_embedding": {"max_length": 6, "hidden_size": 16, "pooled_size": 8},
        "vae": _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),  # Flux's
    },
}


def transformer_config(name: str, tiny: bool = False) -> dict:
    if name not in KINDS:
        raise ValueError(f"transformer kind must be one of {KINDS}, got {name!r}")
    return TINY_CONFIGS[name] if tiny else read_json(CONFIGS_DIR / f"{name}.json")


TRANSFORMER_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")

# Text tokens the pipelines feed the transformer: SD3 = the CLIP tokenizer's length (77) + T5's 256 (its
# max_sequence_length default); FLUX.1-dev 512 T5 tokens (FluxPipeline's default), FLUX.1-schnell (no guidance
# embedding) 256, its documented limit.
T5_TOKENS = {"sd3": 256, "flux-dev": 512, "flux-schnell": 256}


def transformer_class(name: str):
    import diffusers

    if name not in TRANSFORMER_CLASSES:
        raise ValueError(f"transformer class must be one of {TRANSFORMER_CLASSES}, got {name!r}")
    return getattr(diffusers, name)


def build_transformer(config: dict, seed: int = 0) -> torch.nn.Module:
    """The architecture of config["transformer"] with weights from torch's default initialisers under `seed`
    (the global RNG untouched); diffusers zero-initialises some output layers, so the tiny test models
    re-draw every parameter under the seed (`randomize`) to give the velocity a real dependence on x."""
    arch = config["transformer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformer_class(arch["_class_name"]).from_config(arch).eval().requires_grad_(False)


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter redrawn N(0, scale^2) under `seed` (test models: no zero-initialised output layer)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return module


def folder_config(folder, kind: str) -> dict:
    """{transformer, vae, scheduler, text_embedding} of a local SD3 / Flux diffusers folder,
    read from its json files (the text lengths as the pipelines form them, T5_TOKENS)."""
    transformer = read_json(folder / "transformer" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    if kind == "sd3":  # CLIP-L and CLIP-G tokens, padded to T5's width, then T5's tokens
        tokenizer = folder / "tokenizer" / "tokenizer_config.json"
        clip = read_json(tokenizer).get("model_max_length", 77) if tokenizer.is_file() else 77
        length = clip + T5_TOKENS["sd3"]
    else:
        length = T5_TOKENS["flux-dev" if transformer.get("guidance_embeds") else "flux-schnell"]
    return {"transformer": transformer, "vae": vae,
            "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
            "text_embedding": {"max_length": length, "hidden_size": transformer["joint_attention_dim"],
                               "pooled_size": transformer["pooled_projection_dim"]}}


def load_flow_transformer(spec, *, random_weights: bool = True, seed: int = 0, resolution: int | None = None,
                          config: dict | None = None):
    """A LoadedUNet whose `unet` is an SD3- or Flux-shaped transformer (spec.family): seeded random weights from
    the embedded config (or `config`, e.g. TINY_CONFIGS[kind]; or a local folder's configs), or the real weights
    of a local diffusers folder / HF cache snapshot (its text encoders load with models.text.text_stack)."""
    from pathlib import Path

    from .loading import quiet_loading, sd_folder
    from .registry import WeightsUnavailableError
    from .weights import LoadedUNet, files_sha256, random_weights_id, weight_files as _weight_files

    kind = spec.family
    folder = None if random_weights else sd_folder(spec)  # real weights: a local folder or the HF cache's snapshot
    if folder is not None:
        config = folder_config(folder, kind)
    elif config is None:
        config = folder_config(Path(spec.source), kind) if Path(spec.source).is_dir() else transformer_config(kind)
    if random_weights:
        transformer = build_transformer(config, seed)
        if config is TINY_CONFIGS.get(kind):
            randomize(transformer, seed)
        weights_id = random_weights_id(seed, config["transformer"])
    else:
        files = _weight_files(folder / "transformer") if (folder / "transformer").is_dir() else []
        if not files:
            raise WeightsUnavailableError(spec, f"no transformer weights under {folder}")
        cls = transformer_class(config["transformer"].get("_class_name"))
        with quiet_loading() as load_options:
            transformer = cls.from_pretrained(folder, subfolder="transformer", local_files_only=True, **load_options)
        weights_id = files_sha256(files)
    arch = transformer.config
    size = (resolution or spec.resolution) // vae_scale_factor(config["vae"])
    channels = arch.in_channels if kind == "sd3" else arch.in_channels // 4
    text = config["text_embedding"]
    width = max(text["hidden_size"], text["pooled_size"] + 1)
    scheduler = {**config["scheduler"], "_class_name": "FlowMatchEulerDiscreteScheduler"}
    vae_scale = config["vae"].get("scaling_factor")
    return LoadedUNet(spec, transformer.eval().requires_grad_(False), scheduler, "text", (channels, size, size),
                      (text["max_length"] + 1, width), None, vae_scale, weights_id)


def load_transformer(kind: str, *, tiny: bool = False, seed: int = 0, resolution: int | None = None, device="cpu",
                     dtype=torch.float32):
    """load_flow_transformer for a registry kind ("sd3" | "flux"), random weights; tiny: TINY_CONFIGS (tests)."""
    from .registry import KNOWN_MODELS

    spec = KNOWN_MODELS[kind]
    loaded = load_flow_transformer(spec, seed=seed, resolution=resolution or (64 if tiny else None),
                                   config=TINY_CONFIGS[kind] if tiny else None)
    torch.nn.Module.to(loaded.unet, device=device, dtype=dtype)
    return loaded


def text_length(loaded) -> int:
    return loaded.cond_shape[0] - 1


def pooled_size(loaded) -> int:
    return loaded.unet.config.pooled_projection_dim


def guidance_kind(loaded) -> str:
    """"classifier-free" (SD3: one doubled call) or "distilled" (Flux-dev: the scale is an input, one call)."""
    return GUIDANCE[loaded.spec.family]


def with_distilled_guidance(loaded, cond: Tensor, scale: float) -> Tensor:
    """Flux-dev: the guidance scale written into the pooled row's entry P of every image's cond."""
    cond = cond.clone()
    cond[:, text_length(loaded), pooled_size(loaded)] = scale
    return cond


def image_seq_len(loaded) -> int:
    """Image tokens, as the pipelines compute it for dynamic shifting: (h / 2) * (w / 2) for both."""
    return (loaded.sample_shape[1] // 2) * (loaded.sample_shape[2] // 2)


def pack_cond(text: Tensor, pooled: Tensor, guidance: float | Tensor | None = None) -> Tensor:
    """[n, L, D] text tokens + [n, P] pooled (+ Flux's guidance scale) -> the one cond tensor [n, L + 1, D']."""
    n, length, dim = text.shape
    width = max(dim, pooled.shape[1] + 1)
    cond = text.new_zeros(n, length + 1, width)
    cond[:, :length, :dim] = text
    cond[:, length, : pooled.shape[1]] = pooled
    if guidance is not None:
        cond[:, length, pooled.shape[1]] = torch.as_tensor(guidance, dtype=cond.dtype)
    return cond


def pack_latents(x: Tensor) -> Tensor:
    """[rows, C, h, w] -> Flux tokens [rows, (h/2)(w/2), 4C] (diffusers' FluxPipeline._pack_latents)."""
    rows, c, h, w = x.shape
    return x.view(rows, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(rows, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of pack_latents (diffusers' FluxPipeline._unpack_latents)."""
    rows, _, channels = tokens.shape
    return tokens.view(rows, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(rows, channels // 4, h, w)


def latent_image_ids(h: int, w: int) -> Tensor:
    """Flux's image position ids for (h/2) x (w/2) tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def transformer_model_fn(loaded) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """cond_model(x, sigma, cond) -> velocity, one transformer call over all rows (module docstring)."""
    model, L, P = loaded.unet, text_length(loaded), pooled_size(loaded)
    dtype = next(model.parameters()).dtype
    dim = model.config.joint_attention_dim
    if loaded.spec.family == "sd3":
        def cond_model(x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
            t = model_timesteps(sigma).to(x.device)
            out = model(hidden_states=x.to(dtype), encoder_hidden_states=cond[:, :L, :dim].to(dtype),
                        pooled_projections=cond[:, L, :P].to(dtype), timestep=t, return_dict=False)[0]
            return out.to(x.dtype)
        return cond_model

    distilled = bool(model.config.guidance_embeds)  # FLUX.1-dev; schnell has no guidance input

    def flux_model(x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        t = (model_timesteps(sigma).to(dtype) / 1000).to(x.device)  # FluxPipeline: timestep / 1000 in latents' dtype
        img_ids = latent_image_ids(h, w).to(x.device, dtype)
        txt_ids = torch.zeros(L, 3, device=x.device, dtype=dtype)
        out = model(hidden_states=pack_latents(x.to(dtype)), encoder_hidden_states=cond[:, :L, :dim].to(dtype),
                    pooled_projections=cond[:, L, :P].to(dtype), timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                    guidance=cond[:, L, P].to(torch.float32) if distilled else None, return_dict=False)[0]
        return unpack_latents(out, h, w).to(x.dtype)

    return flux_model
