"""Build an engine for a registry model and a backend name (what `--backend` selects)."""

from __future__ import annotations

import torch

from .base import EngineSpec
from .torch_engine import TorchEngine

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def engine_spec(loaded, dtype: torch.dtype) -> EngineSpec:
    """The IO contract of a registry UNet (srds_trt.models.LoadedUNet) at a float precision."""
    text = loaded.conditioning == "text"
    return EngineSpec(
        sample_shape=tuple(loaded.sample_shape),
        cond_shape=tuple(loaded.cond_shape),
        cond_dtype=dtype if text else torch.long,
        dtype=dtype,
        timestep_dtype=torch.float32,
    )


def torch_engine(loaded, *, device, dtype: torch.dtype, max_rows: int = 64, cuda_graphs: bool | None = None, lanes: int = 1,
                 tf32: bool = False) -> TorchEngine:
    from ...models import unet_model_fn

    device = torch.device(device)
    graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    return TorchEngine(unet_model_fn(loaded), engine_spec(loaded, dtype), device=device, max_rows=max_rows,
                       cuda_graphs=graphs, lanes=lanes, tf32=tf32)
