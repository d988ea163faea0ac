"""When to stop a Parareal (SRDS) run: one StoppingRule for the reference sampler and every runner.

What `tol` means, everywhere in srds_trt: the max-abs distance, in the units of x, between the sample a sampler
returns and the serial sample (the N-step DDIM result from the same x_T) that the caller accepts.

The rule sees, after each iteration p >= 1, the per-boundary changes

    changes[b - 1] = max over images and elements of |U[p][b] - U[p-1][b]|,   b = 1..B

(entries b < p are exactly 0: those boundaries stopped changing). Both executors compute exactly this vector:
the reference sampler (sampling.py) on the host, the runtime (runtime/srds_runner.py) as one device reduction
read back asynchronously. A non-finite change means NaN or Inf reached the state: the rule raises
NonFiniteError, so no executor can hand such a sample back as an image.

The estimator itself (current rule): the contraction-rate bound over the global max residual r_p,

    e_p = r_p * max(1, rho_p / (1 - rho_p)),   rho_p = r_p / r_{p-1}     (infinite when rho_p >= 1 or p = 1)

held two iterations running (max(e_p, e_{p-1}) <= tol). See the module's tests for the hard cases it must pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

# Max-abs distance to the serial sample. Below half an 8-bit grey level of an image in [-1, 1]
# (2 / 255 / 2 ~ 3.9e-3) with a margin, and above the batch-variance noise floor of fp32 engines (~1e-5).
DEFAULT_TOL = 1e-3


class NonFiniteError(FloatingPointError):
    """NaN or Inf appeared in a sampler's state (fp16 overflow, a broken model, an absurd guidance scale):
    never returned as an image."""


def check_finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteError(f"{where}: NaN/Inf in the sampler state (fp16 overflow, a model returning NaN, "
                             "or a guidance scale that overflows)")
    return value


def check_tol(tol: float) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return float(tol)


def _contraction_bound(residuals: Sequence[float]) -> float:
    r = residuals[-1]
    if r == 0.0:
        return 0.0
    if len(residuals) < 2 or residuals[-2] == 0.0:
        return math.inf
    rho = r / residuals[-2]
    if rho >= 1.0:
        return math.inf
    return r * max(1.0, rho / (1.0 - rho))


def error_estimate(residuals: Sequence[float]) -> float:
    """Estimated remaining error after the last iteration, from the global residuals r_1..r_p."""
    if residuals[-1] == 0.0:
        return 0.0  # the iterate reproduced itself: it is the fixed point, to rounding
    if len(residuals) < 2:
        return math.inf
    return max(_contraction_bound(residuals), _contraction_bound(residuals[:-1]))


@dataclass
class StoppingRule:
    """One run's stopping decisions. Feed `observe` once per completed iteration p = 1, 2, ... in order.

    tol = 0 never stops early: the run goes on until the plan's last iteration (B: the serial sample).
    """

    tol: float
    num_blocks: int
    residuals: list[float] = field(default_factory=list)  # r_p = max(changes), p = 1..
    estimates: list[float] = field(default_factory=list)  # what was compared with tol, p = 1..
    boundary_changes: list[list[float]] = field(default_factory=list)  # the changes vector of every iteration

    def __post_init__(self) -> None:
        self.tol = check_tol(self.tol)
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")

    def observe(self, iteration: int, changes: Sequence[float]) -> bool:
        """Record iteration `iteration`'s per-boundary changes (length B); True when the run may stop here."""
        if iteration != len(self.residuals) + 1:
            raise ValueError(f"iterations must be observed in order: expected {len(self.residuals) + 1}, got {iteration}")
        changes = [float(c) for c in changes]
        if len(changes) != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} boundary changes, got {len(changes)}")
        residual = check_finite(max(changes), f"iteration {iteration}")
        self.boundary_changes.append(changes)
        self.residuals.append(residual)
        self.estimates.append(error_estimate(self.residuals))
        return self.converged

    @property
    def converged(self) -> bool:
        """The last observed iteration is accepted: exact (p = B) or estimated within tol."""
        p = len(self.residuals)
        return p > 0 and (p >= self.num_blocks or (self.tol > 0 and self.estimates[-1] <= self.tol)
                          or self.estimates[-1] == 0.0)
