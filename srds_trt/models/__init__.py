"""Model registry: the embedded digits model, Stable Diffusion variants, local folders and hub ids."""

from .loading import LoadedUNet, load_unet, unet_model_fn
from .registry import (KNOWN_MODELS, ModelSpec, UnknownModelError, WeightsUnavailableError, resolve_model)

__all__ = ["KNOWN_MODELS", "LoadedUNet", "ModelSpec", "UnknownModelError", "WeightsUnavailableError", "load_unet",
           "resolve_model", "unet_model_fn"]
