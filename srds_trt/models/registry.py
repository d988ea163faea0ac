"""Which models exist and what they are, without loading any weights.

`resolve_model` accepts a registry name (`KNOWN_MODELS`), a local diffusers folder (a pipeline folder with
model_index.json, or a bare UNet2DModel folder like the embedded digits model) or a hub id ("owner/name").
Local folders are described from their small json configs only, so resolving stays cheap.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

DIGITS_DIR = Path(__file__).resolve().parent / "digits"
DIGITS_FLOW_DIR = Path(__file__).resolve().parent / "digits-flow"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
FAMILIES = ("digits", "sd", "sd3", "flux")  # sd3 / flux: flow-matching transformers (models/transformers.py)

# model_index.json's _class_name -> family, for the flow-matching transformer pipelines (everything else: "sd")
FLOW_PIPELINES: Mapping[str, str] = MappingProxyType({"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"})

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, or the local path / hub id given
    source: str  # hub id, local folder, or the package folder for digits
    family: str  # "digits" (pixel space, class labels) | "sd" (latent UNet, CLIP text) | "sd3" | "flux" (transformers)
    resolution: int  # default image size in pixels
    prediction_type: str  # "epsilon" | "v_prediction" | "flow" (velocity, FlowMatchEulerDiscreteScheduler)


KNOWN_MODELS: Mapping[str, ModelSpec] = MappingProxyType({
    "digits": ModelSpec("digits", str(DIGITS_DIR), "digits", 16, "epsilon"),
    "digits-flow": ModelSpec("digits-flow", str(DIGITS_FLOW_DIR), "digits", 16, "flow"),
    "sd2": ModelSpec("sd2", "stabilityai/stable-diffusion-2-1-base", "sd", 512, "epsilon"),
    "sd2.1": ModelSpec("sd2.1", "stabilityai/stable-diffusion-2-1", "sd", 768, "v_prediction"),
    "sd1.5": ModelSpec("sd1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, "epsilon"),
    "sd3": ModelSpec("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 1024, "flow"),
    "flux": ModelSpec("flux", "black-forest-labs/FLUX.1-dev", "flux", 1024, "flow"),
})

# Embedded architecture configs for --random-weights (no download): registry name -> file stem in configs/.
RANDOM_WEIGHT_CONFIGS: Mapping[str, str] = MappingProxyType({"sd2": "sd2", "sd2.1": "sd2.1", "sd1.5": "sd1.5",
                                                              "sd3": "sd3", "flux": "flux"})


class UnknownModelError(ValueError):
    def __init__(self, name: str, reason: str = "not a known model, a local diffusers folder or a hub id"):
        self.name = name
        super().__init__(f"unknown model {name!r} ({reason}); known models: {', '.join(KNOWN_MODELS)}")


class WeightsUnavailableError(RuntimeError):
    def __init__(self, spec: ModelSpec, detail: str = ""):
        self.spec = spec
        hint = (f"weights for {spec.name!r} ({spec.source}) are not available offline"
                f"{': ' + detail if detail else ''}. Get them with `huggingface-cli download {spec.source}` "
                f"on a machine with hub access (then copy the HF cache, or pass the downloaded folder as the model)")
        if spec.name in RANDOM_WEIGHT_CONFIGS:
            hint += ", or use --random-weights (real architecture, seeded random weights, for timing only)"
        super().__init__(hint)


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent of an AutoencoderKL config: 2 ** (its blocks - 1), 8 when the config says nothing."""
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def resolve_model(name_or_path: str) -> ModelSpec:
    """The ModelSpec for a registry name, a local diffusers folder or a hub id; loads no weights."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return describe_folder(name_or_path, path)
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/", "~")):
        # Unknown until its configs are read; SD-shaped defaults, described from its cached snapshot when loading.
        return ModelSpec(name_or_path, name_or_path, "sd", 512, "epsilon")
    reason = "no such folder" if ("/" in name_or_path or name_or_path.startswith(".")) else None
    raise UnknownModelError(name_or_path, reason) if reason else UnknownModelError(name_or_path)


def describe_folder(name: str, path: Path) -> ModelSpec:
    """The ModelSpec of a local diffusers folder (or a hub id's cached snapshot), from its json files only."""
    source = str(path.resolve())
    if (path / "model_index.json").is_file():
        vae = read_json(path / "vae" / "config.json") if (path / "vae" / "config.json").is_file() else {}
        scale = vae_scale_factor(vae)
        family = FLOW_PIPELINES.get(read_json(path / "model_index.json").get("_class_name"), "sd")
        denoiser = path / ("unet" if family == "sd" else "transformer") / "config.json"
        config = read_json(denoiser) if denoiser.is_file() else {}
        # Flux's transformer config has no sample_size: FluxPipeline's default_sample_size is 128 latents
        resolution = int(config.get("sample_size", 64 if family == "sd" else 128)) * scale
        return ModelSpec(name, source, family, resolution, _prediction_type(path / "scheduler" / "scheduler_config.json"))
    config_file = path / "config.json"
    if config_file.is_file() and read_json(config_file).get("_class_name") == "UNet2DModel":
        config = read_json(config_file)
        return ModelSpec(name, source, "digits", int(config.get("sample_size", 16)),
                         _prediction_type(path / "scheduler_config.json"))
    raise UnknownModelError(name, "folder holds neither model_index.json nor a UNet2DModel config.json")


def _prediction_type(scheduler_config: Path) -> str:
    """epsilon / v_prediction from a DDPM-family config; "flow" for a FlowMatchEulerDiscreteScheduler's."""
    config = read_json(scheduler_config) if scheduler_config.is_file() else {}
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return "flow"
    return config.get("prediction_type", "epsilon")
