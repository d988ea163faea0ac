"""What a call reports: the per-chunk stats merged, and the convergence report every entry point returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ConvergenceReport:
    """How close the returned sample is to the serial one, and what it cost (every protocol returns this).

    iterations: Parareal iterations (srds) or sweeps (window samplers; iteration_unit says which), None for serial.
    residual: the last max-abs change between iterates. estimated_error: the stopping rule's estimate of the
    max-abs distance to the serial sample (SRDS; the window samplers' last residual). tol: what the caller asked;
    tol_used: what was held (raised to the engine's noise floor where it had to be, noise_floor then set).
    converged: stopped by the rule or by exactness; cut: stopped by max_iters before that.
    """

    sampler: str
    iterations: int | None
    iteration_unit: str | None
    sequential_calls: int
    residual: float | None
    estimated_error: float | None
    tol: float
    tol_used: float
    noise_floor: float | None
    converged: bool
    cut: bool

    def as_dict(self) -> dict:
        return asdict(self)


def convergence_report(stats: dict) -> ConvergenceReport:
    sampler = stats["sampler"]
    residuals = _last_of_chunks(stats.get("residuals"))
    estimates = _last_of_chunks(stats.get("error_estimates"))
    tol = float(stats.get("tol", 0.0) or 0.0)
    tol_used = float(stats.get("tol_used", tol) or tol)
    unit = None if sampler == "serial" else ("iterations" if sampler == "srds" else "sweeps")
    converged = bool(stats.get("converged", True))
    return ConvergenceReport(
        sampler=sampler, iterations=stats.get("iterations"), iteration_unit=unit,
        sequential_calls=int(stats.get("sequential_calls", 0)), residual=residuals,
        estimated_error=estimates if estimates is not None else (None if sampler == "serial" else residuals),
        tol=tol, tol_used=tol_used, noise_floor=stats.get("engine_noise_floor") if tol_used > tol else None,
        converged=converged, cut=not converged)


def warnings_for(stats: dict) -> list[str]:
    """One line per thing a user should know about a run that finished: tol raised, no convergence."""
    out = []
    report = convergence_report(stats)
    if report.tol_used > report.tol:
        out.append(f"tol raised from {report.tol:g} to {report.tol_used:g}: the {stats.get('engine_dtype', '')} engine's "
                   f"batch-noise floor is {report.noise_floor:.2g} (an fp32 export holds tighter tols)")
    if report.cut:
        out.append(f"{report.sampler} stopped at its iteration limit without meeting tol {report.tol_used:g} "
                   f"(last residual {report.residual:.2g}): the sample may be farther from the serial one")
    elif stats["sampler"] == "srds" and stats.get("blocks") and stats.get("iterations") == stats.get("blocks"):
        out.append(f"srds needed all {stats['blocks']} iterations (the exact serial sample, no speedup): "
                   "raise tol or use --sampler serial")
    return out


def merge_chunks(parts: list[dict]) -> dict:
    """One chunk's stats as they are; several: counts summed, sequential calls and times per chunk summed,
    iterations the max, converged only if every chunk did."""
    if len(parts) == 1:
        return parts[0]
    merged = dict(parts[0])
    for key in ("model_evals", "sequential_calls", "wall_time_s", "setup_s"):
        if key in merged:
            merged[key] = sum(p[key] for p in parts)
    if merged.get("iterations") is not None:
        merged["iterations"] = max(p["iterations"] for p in parts)
    merged["converged"] = all(p["converged"] for p in parts)
    merged["first_call"] = any(p.get("first_call") for p in parts)
    if "max_abs_diff_vs_serial" in merged:
        merged["max_abs_diff_vs_serial"] = max(p["max_abs_diff_vs_serial"] for p in parts)
        merged["serial"] = {k: sum(p["serial"][k] for p in parts) if isinstance(v, (int, float)) and not isinstance(v, bool)
                            else v for k, v in parts[0]["serial"].items()}
    merged["residuals"] = [p["residuals"] for p in parts]
    merged["error_estimates"] = [p.get("error_estimates", []) for p in parts]
    return merged


def finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def _last_of_chunks(values) -> float | None:
    """The largest last value over chunks (a list per chunk after merge_chunks, or one list)."""
    if not values:
        return None
    lists = values if isinstance(values[0], list) else [values]
    lasts = [v[-1] for v in lists if v and v[-1] is not None]
    return max(lasts) if lasts else None
