"""Fused Triton kernels for the sequential chains of eps-Picard's sweep (window_runner.py), GPU only.

Two recurrences of a sweep run along the window one point after another and cannot be vectorised over it:

    the propagation  d_{i+1} = C_i + A_i d_i + R_i <V_i, d_i>   (A_i a scalar per image; the dot over the image)
    the warm start   x_{i+1} = A_i x_i + B_i                      (A_i a scalar per point; elementwise)

In PyTorch each step is 1-3 small kernels (a bmm for the dot, one or two addcmul): ~190 + ~64 launches per sweep
at w = 64, which on an H100 cost more than the digits UNet's call itself (measured: 1.36 ms of update per sweep
besides a 1.57 ms engine call). Here each chain is ONE launch: the propagation with one program per image looping
over the points (the dot needs the whole image: a reduction, then the update, a barrier between steps), the warm
start with one program per block of elements looping over the points.

Same arithmetic as the torch loops (the fused multiply-adds may round differently: equal to rounding, which the
GPU tests bound). Used when `available(device, dtype)`: CUDA, float32 states and Triton importable; anywhere
else (CPU, float64 tests, no Triton) window_runner.py runs its torch loops. SRDS_TRT_FUSED=0 turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with PyTorch's CUDA wheels; a CPU install has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (triton is not None and device.type == "cuda" and dtype == torch.float32
            and os.environ.get("SRDS_TRT_FUSED", "1") != "0")


if triton is not None:

    @triton.jit
    def _propagate_kernel(c_ptr, a_ptr, r_ptr, v_ptr, d_ptr, dots_ptr, w, batch, n,
                          BLOCK: tl.constexpr, BROYDEN: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        for i in range(0, w - 1):
            row = (i * batch + b).to(tl.int64)
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            if BROYDEN:  # <V_i, d_i>; d_0 = 0 gives 0 exactly (V finite)
                for start in range(0, n, BLOCK):
                    mask = start + offs < n
                    v = tl.load(v_ptr + row * n + start + offs, mask=mask, other=0.0)
                    d = tl.load(d_ptr + row * n + start + offs, mask=mask, other=0.0)
                    dot += v * d
                total = tl.sum(dot, axis=0)
                tl.store(dots_ptr + row, total)
            else:
                total = tl.sum(dot, axis=0)
            a = tl.load(a_ptr + row)
            nxt = (row + batch) * n
            for start in range(0, n, BLOCK):
                mask = start + offs < n
                c = tl.load(c_ptr + row * n + start + offs, mask=mask, other=0.0)
                d = tl.load(d_ptr + row * n + start + offs, mask=mask, other=0.0)
                new = c + a * d
                if BROYDEN:
                    r = tl.load(r_ptr + row * n + start + offs, mask=mask, other=0.0)
                    new = new + r * total
                tl.store(d_ptr + nxt + start + offs, new, mask=mask)
            tl.debug_barrier()  # d_{i+1} is read whole (the dot) by other threads of this program next step

    @triton.jit
    def _affine_chain_kernel(a_ptr, b_ptr, x_ptr, w, size, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        b_row, x_row = b_ptr, x_ptr + size  # 64-bit pointers stepped by one row: no int32 row offset to overflow
        for i in range(0, w):
            a = tl.load(a_ptr + i)
            x = a * x + tl.load(b_row + offs, mask=mask, other=0.0)
            tl.store(x_row + offs, x, mask=mask)
            b_row += size
            x_row += size


def propagate(C: Tensor, A: Tensor, R: Tensor | None, V: Tensor | None, d: Tensor, dots: Tensor | None) -> None:
    """In place: d[i + 1] = C[i] + A[i] d[i] (+ R[i] <V[i], d[i]>, writing dots[i]) for i = 0 .. w - 2.

    C, R, V, d: [w, batch, ...] contiguous float32 (C may have w - 1 rows); A, dots: [w, batch, 1, ...]; d[0] is
    the chain's start (0 in a sweep). R, V, dots None: no Broyden term."""
    w, batch = d.shape[0], d.shape[1]
    n = d[0, 0].numel()
    broyden = R is not None
    _propagate_kernel[(batch,)](C, A, R if broyden else C, V if broyden else C, d, dots if broyden else A,
                                w, batch, n, BLOCK=min(1024, triton.next_power_of_2(n)), BROYDEN=broyden)


def affine_chain(A: Tensor, B: Tensor, x: Tensor) -> None:
    """In place: x[i + 1] = A[i] x[i] + B[i] for i = 0 .. w - 1 (A: [w] scalars; B: [w, ...]; x: [w + 1, ...],
    all contiguous float32)."""
    w = B.shape[0]
    size = x[0].numel()
    block = 1024
    _affine_chain_kernel[(triton.cdiv(size, block),)](A, B, x, w, size, BLOCK=block)
