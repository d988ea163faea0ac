"""What a loaded model is (LoadedUNet) and how its weights are identified: shared by the UNet and transformer loaders."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .registry import ModelSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class LoadedUNet:
    spec: ModelSpec
    unet: torch.nn.Module  # eval(), requires_grad False
    scheduler_config: dict  # a DDIMScheduler config, set_alpha_to_one=True (flow models: FlowMatchEulerDiscrete)
    conditioning: str  # "class" (class_labels int64 [rows]) | "text" (encoder_hidden_states [rows, L, D])
    sample_shape: tuple[int, int, int]  # (C, H, W) of the UNet input; latents for SD
    cond_shape: tuple[int, ...]  # () for class labels, (L, D) for text
    null_class: int | None  # the unconditional class id (digits: 10)
    vae_scaling_factor: float | None
    weights_id: str  # sha256 over the weight files, or "random-seed-<seed>-<config sha>"


def files_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def random_weights_id(seed: int, config: dict) -> str:
    blob = json.dumps(config, sort_keys=True).encode()
    return f"random-seed-{seed}-{hashlib.sha256(blob).hexdigest()[:16]}"


def weight_files(folder: Path) -> list[Path]:
    files = [f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    return safetensors or files
