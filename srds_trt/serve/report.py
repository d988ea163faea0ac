"""The convergence report every response carries: which sampler ran, how many iterations / sweeps and sequential
model calls it took, the last residual, the stopping rule's estimate of the distance to the serial sample and the
tol it was held to, whether it converged or was cut, and the noise floor that raised tol if one did.

The pipeline's own `output.report` (srds_trt.ConvergenceReport) is used where the pipeline has it; otherwise the
same fields are read from its stats.
"""

from __future__ import annotations

import math

WINDOW_SAMPLERS = ("paradigms", "eps-picard")
FIELDS = ("sampler", "iterations", "iteration_unit", "sequential_calls", "residual", "estimated_error", "tol",
          "tol_used", "noise_floor", "converged", "cut")


def convergence_report(output, tol: float) -> dict:
    report = getattr(output, "report", None)
    if report is not None:
        return {k: _plain(v) for k, v in report.as_dict().items()}
    return report_from_stats(output.stats, tol)


def report_from_stats(stats: dict, tol: float) -> dict:
    sampler = stats.get("sampler")
    serial = sampler == "serial"
    tol_used = stats.get("tol_used", tol)
    raised = tol_used is not None and tol_used > tol
    converged = bool(stats.get("converged", True))
    return {
        "sampler": sampler,
        "iterations": None if serial else stats.get("iterations"),
        "iteration_unit": None if serial else ("sweeps" if sampler in WINDOW_SAMPLERS else "iterations"),
        "sequential_calls": stats.get("sequential_calls"),
        "residual": None if serial else _plain(_last(stats.get("residuals"))),
        "estimated_error": 0.0 if serial else _plain(_last(stats.get("error_estimates"))),
        "tol": tol,
        "tol_used": _plain(tol_used if tol_used is not None else tol),
        "noise_floor": _plain(stats.get("engine_noise_floor")) if raised else None,
        "converged": converged,
        "cut": not converged,
    }


def _last(values):
    """The last finite value of a list, or of the last chunk's list (several chunks: worst chunk's last)."""
    if not values:
        return None
    if isinstance(values[0], list):
        lasts = [_last(v) for v in values]
        lasts = [v for v in lasts if v is not None]
        return max(lasts) if lasts else None
    return values[-1]


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
