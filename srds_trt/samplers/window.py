"""What the sliding-window samplers (ParaDiGMS, eps-Picard) share: names, widths, rows per sweep, the result."""

from __future__ import annotations

import math

from torch import Tensor

from .base import SampleResult
from .stopping import check_finite

# their names in samplers.SAMPLERS, defined once for the pipeline, autotune and the runtime's window runners
WINDOW_SAMPLERS = ("eps-picard", "paradigms")


def default_window(sampler: str, steps: int) -> int:
    """Points per sweep when the caller gives none. ParaDiGMS: round(sqrt(N)), its usual window. eps-Picard:
    2 round(sqrt(N)), the width of a pipelined SRDS call at its peak (so the two compare at equal parallel width).
    Neither is plan.default_num_blocks, which is tuned to SRDS's pipelined critical path."""
    check_window_sampler(sampler)
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    factor = 2 if sampler == "eps-picard" else 1
    return max(1, min(steps, factor * round(math.sqrt(steps))))


def window_width(steps: int, window: int, max_iters: int | None) -> int:
    """The points per sweep of a sliding-window sampler (window capped at N), after checking its arguments."""
    w = int(window)
    if w < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if max_iters is not None and max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    return min(w, steps)


def resolve_window(sampler: str, steps: int, window: int | None) -> int:
    """The points per sweep a sliding-window sampler runs with: its default when window is None, capped at N."""
    return window_width(steps, default_window(sampler, steps) if window is None else window, None)


def window_rows(sampler: str, steps: int, window: int | None, images: int, guided: bool) -> int:
    """Engine rows of one sweep: window x images x (2 under guidance)."""
    return resolve_window(sampler, steps, window) * images * (2 if guided else 1)


def window_result(sampler: str, final: Tensor, x: Tensor, *, iterations: int, window: int, model_evals: int,
                  residuals: list[float], slides: list[int], converged: bool, tol: float) -> SampleResult:
    """A sliding-window sampler's result: one sweep is one sequential call; NaN/Inf in the sample is an error."""
    check_finite(float(final.abs().max()), f"{sampler} after {iterations} sweeps")
    return SampleResult(sample=final.to(x.dtype), sampler=sampler, iterations=iterations, window=window,
                        model_evals=model_evals, sequential_calls=iterations, residuals=residuals, slides=slides,
                        converged=converged, tol=tol)


def check_window_sampler(sampler: str) -> None:
    if sampler not in WINDOW_SAMPLERS:
        raise ValueError(f"sliding-window sampler must be one of {WINDOW_SAMPLERS}, got {sampler!r}")
