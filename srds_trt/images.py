"""Tensors in [-1, 1] to PIL images, and a grid for viewing."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, C, H, W] in [-1, 1] (C = 1 or 3) -> B PIL images, grey ("L") or "RGB"."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    if pixels.shape[1] == 1:
        return [Image.fromarray(p[0], mode="L") for p in pixels]
    return [Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0)), mode="RGB") for p in pixels]


def make_grid(images: list[Image.Image], *, columns: int | None = None, min_tile: int = 64, pad: int = 2) -> Image.Image:
    """Tile images row by row; tiles smaller than `min_tile` are upscaled (nearest) so 16x16 digits stay visible."""
    if not images:
        raise ValueError("no images to tile")
    columns = columns or min(len(images), 10)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    scale = max(1, math.ceil(min_tile / max(width, height)))
    tile_w, tile_h = width * scale, height * scale
    grid = Image.new(images[0].mode, (columns * (tile_w + pad) + pad, rows * (tile_h + pad) + pad))
    for i, image in enumerate(images):
        tile = image.resize((tile_w, tile_h), Image.NEAREST) if scale > 1 else image
        grid.paste(tile, (pad + (i % columns) * (tile_w + pad), pad + (i // columns) * (tile_h + pad)))
    return grid
