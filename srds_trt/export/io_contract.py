"""The UNet's I/O contract, shared by the exporter, the parity gate, the plan builder and the manifest.

Inputs: `sample` [rows, C, H, W] (export dtype), `timestep` [rows] float32 (each SRDS row carries its own time,
and fp32 keeps large timesteps exact), then `class_labels` [rows] int64 or `encoder_hidden_states` [rows, L, D]
(export dtype). Output: `model_output` [rows, C, H, W] (export dtype). `rows` is the one dynamic axis; it counts
model rows, so classifier-free guidance's doubling is inside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ROWS = "rows"
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "int64": np.int64}
EXPORT_DTYPES = {"fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: float16 | float32 | int64
    shape: tuple[Any, ...]  # ROWS first, then ints

    def concrete(self, rows: int) -> tuple[int, ...]:
        return (rows, *self.shape[1:])

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class IOContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    conditioning: str  # "class" | "text"

    @property
    def all(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs


def io_contract(conditioning: str, sample_shape: tuple[int, ...], cond_shape: tuple[int, ...], dtype: str) -> IOContract:
    """Contract for a UNet taking `sample_shape` (C, H, W) and conditioning of `cond_shape` ((L, D) for text)."""
    float_type = EXPORT_DTYPES[dtype]
    sample = TensorSpec("sample", float_type, (ROWS, *sample_shape))
    timestep = TensorSpec("timestep", "float32", (ROWS,))
    if conditioning == "class":
        cond = TensorSpec("class_labels", "int64", (ROWS,))
    elif conditioning == "text":
        cond = TensorSpec("encoder_hidden_states", float_type, (ROWS, *cond_shape))
    else:
        raise ValueError(f"unknown conditioning {conditioning!r}")
    output = TensorSpec("model_output", float_type, (ROWS, *sample_shape))
    return IOContract((sample, timestep, cond), (output,), conditioning)


def sample_inputs(contract: IOContract, rows: int, *, seed: int, num_classes: int = 11,
                  timestep_max: float = 999.0) -> dict[str, np.ndarray]:
    """Deterministic inputs for parity checks: SRDS-like per-row timesteps spread over [0, timestep_max] (flow
    models: sigma, timestep_max = 1)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        shape = spec.concrete(rows)
        if spec.name == "timestep":
            value = np.linspace(timestep_max, 0.0, rows) if rows > 1 else np.array([timestep_max / 2])
        elif spec.name == "class_labels":
            value = rng.integers(0, num_classes, size=shape)
        else:
            value = rng.standard_normal(shape)
        feeds[spec.name] = value.astype(NUMPY_DTYPES[spec.dtype])
    return feeds
