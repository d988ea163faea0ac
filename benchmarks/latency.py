"""Project a run's call sequence onto measured GPU latency-per-call curves.

Sequential evaluations count every batched call as one, as if a call of 64 rows cost what a call of one row
costs. Real hardware sits in between; these curves are the measured cost of ONE model call vs its rows on an
H200 (torch 2.11, CUDA graphs; /work/shared/DESIGN.md, "This workplace's facts"). Projected latency of a run =
sum over its calls of curve(rows of that call), with rows = trajectory points x ROWS_PER_POINT: one image with
classifier-free guidance, i.e. the latency-oriented case of generating a single image. Between measured row
counts the curve is interpolated linearly; above the largest it is extended with its last slope.
"""

from __future__ import annotations

from typing import Mapping

from srds_trt.autotune.pricing import interpolate_ms

ROWS_PER_POINT = 2  # one image, CFG doubles the rows of every call

# ms per call vs rows, measured on H200 with CUDA graphs (DESIGN.md).
CURVES: Mapping[str, Mapping[int, float]] = {
    "h200_digits": {1: 0.87, 2: 0.92, 8: 0.91, 16: 0.95, 32: 1.23, 64: 1.39, 128: 1.74},  # 1.1 M params, 16x16 fp32
    "h200_sd2": {1: 9.2, 2: 11.5, 4: 15.8, 8: 25.3, 16: 45.0, 32: 86.3},  # SD2-base UNet, 64x64 latents, fp16
}


def call_ms(curve: Mapping[int, float], rows: int) -> float:
    """One call's ms from a measured curve: the same interpolation --sampler auto prices candidates with."""
    return interpolate_ms(curve, rows)


def projected_ms(calls: Mapping[int, int], curve: Mapping[int, float], rows_per_point: int = ROWS_PER_POINT) -> float:
    """Sum of per-call latencies for {trajectory points in a call: number of calls}."""
    return sum(count * call_ms(curve, int(points) * rows_per_point) for points, count in calls.items())
