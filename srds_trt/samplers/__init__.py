"""The samplers: pure functions over a model callable, one contract for all.

    SAMPLERS[name](model, x, timesteps, alphas_cumprod, *, tol, prediction_type, **options) -> SampleResult

`model(x[rows, ...], t[rows]) -> output` with per-row timesteps (guidance.py wraps a conditional model into
one). `tol` means the same everywhere: the max-abs distance to the serial sample the caller accepts. This module
is the ONLY place where it becomes a per-sampler threshold (the window samplers' per-point acceptance,
stopping.window_accept_tol); SRDS's stopping rule reads it directly.

    serial.py      N sequential solver steps (the reference every parallel sampler converges to)
    srds.py        Parareal SRDS over the tick plan (plan.py), stopped by stopping.py's rule
    paradigms.py   ParaDiGMS: Picard sweeps over a sliding window
    eps_picard.py  eps-Picard: Picard on the model outputs, quasi-Newton corrections
    window.py      what the window samplers share; ddim.py / timesteps.py: the DDIM solver and its grid
    solver.py      the solver as a parameter (alphas_cumprod or a Solver); flow.py: flow-matching Euler on the
                   FlowMatchEulerDiscreteScheduler sigma grid, and an exact-velocity Gaussian mixture
"""

from __future__ import annotations

from typing import Callable

from .base import Cancelled, Model, SampleResult, check_grid, state_dtype
from .eps_picard import eps_picard_sample
from .paradigms import paradigms_sample
from .serial import serial_result, serial_sample
from .srds import srds_sample
from .stopping import DEFAULT_TOL, NonFiniteError, window_accept_tol
from .window import WINDOW_SAMPLERS

__all__ = ["Cancelled", "DEFAULT_TOL", "Model", "NonFiniteError", "SAMPLERS", "SampleResult", "WINDOW_SAMPLERS",
           "check_grid", "eps_picard_sample", "paradigms_sample", "run_at_tol", "serial_sample", "srds_sample", "state_dtype",
           "with_asked_tol"]


def run_at_tol(sampler: str, tol: float, run: Callable[[float], SampleResult]) -> SampleResult:
    """Run a sliding-window sampler for the caller's `tol`: `run(threshold)` at the per-point threshold calibrated
    for it (stopping.window_accept_tol); the result says both (.tol asked, .accept_tol run). The reference samplers
    below and the runtime's window runs both come through here."""
    return with_asked_tol(run(window_accept_tol(tol, sampler)), tol)


def _paradigms(*args, tol: float = DEFAULT_TOL, **kwargs) -> SampleResult:
    return run_at_tol("paradigms", tol, lambda threshold: paradigms_sample(*args, tol=threshold, **kwargs))


def _eps_picard(*args, tol: float = DEFAULT_TOL, **kwargs) -> SampleResult:
    return run_at_tol("eps-picard", tol, lambda threshold: eps_picard_sample(*args, tol=threshold, **kwargs))


def with_asked_tol(result: SampleResult, tol: float) -> SampleResult:
    """A sliding-window result run at a per-point threshold (its .tol) for the caller's `tol`: .tol becomes what
    was asked and .accept_tol the threshold that ran (here, and in the runtime's window runs)."""
    result.accept_tol, result.tol = result.tol, tol
    return result


# name -> sampler with the contract (model, x, timesteps, alphas_cumprod, *, tol, prediction_type, **options)
SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "serial": serial_result,
    "srds": srds_sample,
    "paradigms": _paradigms,
    "eps-picard": _eps_picard,
}
