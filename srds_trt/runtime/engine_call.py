"""The guided engine call both runners make: rows in (twice under guidance), one enqueue, guided output out.

Row layout of the engine bucket: [uncond rows, cond rows] under guidance, the rows once without; conditioning
is loaded once per run, row r of each half belonging to image r % batch (samplers stack rows segment-major).
Everything here reads and writes static buffers only, so it can sit inside a captured CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engines.base import Engine


def load_conditioning(engine: Engine, bucket: int, lane: int, rows: int, batch: int, halves: list[Tensor]) -> None:
    """Write per-image conditioning ([batch, ...] each; [uncond, cond] or [cond]) into a bucket's cond buffer."""
    io = engine.io(bucket, lane)
    image = torch.arange(rows, device=io.cond.device) % batch
    for k, per_image in enumerate(halves):
        io.cond[k * rows : (k + 1) * rows].copy_(per_image.to(io.cond.device)[image])


def guided_call(engine: Engine, bucket: int, lane: int, x: Tensor, t: Tensor, scale: Tensor | None) -> Tensor:
    """The model output for x's rows at timesteps t, guided with `scale` (None: no guidance), in x's dtype."""
    io, rows = engine.io(bucket, lane), x.shape[0]
    halves = 1 if scale is None else 2
    for k in range(halves):
        io.sample[k * rows : (k + 1) * rows].copy_(x)
        io.timestep[k * rows : (k + 1) * rows].copy_(t)
    stream = torch.cuda.current_stream(engine.device) if engine.device.type == "cuda" else None
    engine.enqueue(bucket, lane, stream, replay=False)
    out = io.output[: rows * halves].to(x.dtype)
    if scale is None:
        return out
    uncond, cond = out[:rows], out[rows:]
    return uncond + scale * (cond - uncond)
