"""Classifier-free guidance as a model wrapper: ONE call with the rows doubled, never two calls.

The conditional model takes per-row conditioning: cond_model(x[rows], t[rows], cond[rows, ...]).
Samplers stack rows segment-major (row r belongs to image r % batch), so per-image embeddings are tiled.
Row layout of the doubled call: [uncond rows, cond rows] — the same layout the exported engines document.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

CondModel = Callable[[Tensor, Tensor, Tensor], Tensor]


def tile_rows(per_image: Tensor, rows: int) -> Tensor:
    """Repeat [batch, ...] conditioning to [rows, ...] for a segment-major row stack."""
    batch = per_image.shape[0]
    if rows % batch:
        raise ValueError(f"{rows} rows are not a whole number of segments of {batch} images")
    return per_image.repeat(rows // batch, *([1] * (per_image.dim() - 1)))


def conditional(cond_model: CondModel, cond: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """A model(x, t) that conditions every row on its image's `cond` (no guidance)."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        return cond_model(x, t, tile_rows(cond, x.shape[0]))

    return model


def classifier_free_guidance(cond_model: CondModel, cond: Tensor, uncond: Tensor, scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """model(x, t) = uncond_out + scale * (cond_out - uncond_out), from one call over [uncond; cond] rows."""
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} must have the same shape")
    if scale == 1.0:
        return conditional(cond_model, cond)  # guidance is the identity: skip the unconditional half

    def model(x: Tensor, t: Tensor) -> Tensor:
        rows = x.shape[0]
        both = torch.cat([tile_rows(uncond, rows), tile_rows(cond, rows)])
        out = cond_model(torch.cat([x, x]), torch.cat([t, t]), both)
        out_uncond, out_cond = out.split(rows)
        return out_uncond + scale * (out_cond - out_uncond)

    return model
