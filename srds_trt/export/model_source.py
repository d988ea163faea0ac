"""The export stage's only door to the model registry (`srds_trt.models`).

Kept to two functions so tests can substitute tiny UNets and so a registry change touches one file. Imports are
deferred: `srds_trt.export` (and its loading side) must import even where the registry's heavy deps are absent.
"""
from __future__ import annotations

from typing import Any

from .config import ExportConfig


def check_model(name: str) -> Any:
    """Resolve a model name or folder cheaply (no weights); raises the registry's UnknownModelError."""
    from srds_trt.models import resolve_model

    return resolve_model(name)


def load_model(config: ExportConfig) -> Any:
    """Load the UNet in fp32 (the parity reference); the export casts a copy to fp16 itself."""
    import torch

    from srds_trt.models import load_unet

    return load_unet(
        config.model, device="cpu", dtype=torch.float32, random_weights=config.random_weights, seed=config.seed
    )


def registry_errors() -> tuple[type[BaseException], ...]:
    """The registry's user-facing errors, which the CLI turns into one-line messages."""
    try:
        from srds_trt.models import UnknownModelError, WeightsUnavailableError
    except ImportError:
        return ()
    return (UnknownModelError, WeightsUnavailableError)
