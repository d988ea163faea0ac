"""`tol` of the sliding-window samplers means what it means everywhere (max-abs distance to the serial sample).

The registry (sampling.SAMPLERS) and the runtime run them with the calibrated per-point threshold
stopping.window_accept_tol(tol). These tests fail when the mapping is dropped: on measured cases where the raw
threshold = tol returns a sample farther than tol from serial (a flipped mixture mode: error ~3.5 at tol 5e-2),
the registry's sample stays within tol.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import mixture_case
from srds_trt.samplers.eps_picard import eps_picard_sample
from srds_trt.samplers.paradigms import paradigms_sample
from srds_trt.samplers import SAMPLERS, serial_sample
from srds_trt.samplers.stopping import WINDOW_ACCEPT, window_accept_tol

RAW = {"eps-picard": eps_picard_sample, "paradigms": paradigms_sample}
# (case, N, window, tol) where the raw threshold = tol misses by far: eps-Picard mix64 N=196 at 5e-2, a flipped
# mode, error 3.49 = 70x tol (measured 2026-11-27 with the prior slope; before it, hard2 N=196 missed at 1e-2 with
# 2.95 and no longer does); ParaDiGMS mix64 N=196 w=14 at 1e-2: 1.9e-2 = 1.9x tol
# (an earlier matched run, git b6c7018)
MISSES = {"eps-picard": ("mix64", 196, 28, 5e-2), "paradigms": ("mix64", 196, 14, 1e-2)}


def _run(sampler, fn, tol, samples=64):
    name, steps, window, _ = MISSES[sampler]
    case = mixture_case(name, images=samples, device=torch.device("cpu"))
    timesteps, alphas, _ = case.grid(steps)
    serial = serial_sample(case.model, case.x, timesteps, alphas)
    result = fn(case.model, case.x, timesteps, alphas, tol=tol, window=window)
    return result, float((result.sample - serial).abs().max())


@pytest.mark.parametrize("sampler", sorted(RAW))
def test_accept_tol_is_a_fraction_of_tol_under_a_cap(sampler):
    fraction, cap = WINDOW_ACCEPT[sampler]
    assert window_accept_tol(0.0, sampler) == 0.0
    assert window_accept_tol(1e-3, sampler) == pytest.approx(fraction * 1e-3)
    assert window_accept_tol(1.0, sampler) == cap
    with pytest.raises(ValueError):
        window_accept_tol(-1.0, sampler)
    with pytest.raises(ValueError):
        window_accept_tol(1e-3, "srds")  # SRDS has its own rule (stopping.StoppingRule)


def test_eps_picard_runs_looser_than_paradigms():
    """eps-Picard's calibration (prior slope) is looser than ParaDiGMS's at the default tol: the two are separate."""
    assert window_accept_tol(1e-3, "eps-picard") == pytest.approx(2e-4)
    assert window_accept_tol(1e-3, "paradigms") == pytest.approx(1e-4)


@pytest.mark.parametrize("sampler", sorted(RAW))
def test_registry_runs_the_accept_threshold_and_reports_both(sampler):
    tol = 1e-2
    got, _ = _run(sampler, SAMPLERS[sampler], tol, samples=8)
    raw, _ = _run(sampler, RAW[sampler], window_accept_tol(tol, sampler), samples=8)
    assert torch.equal(got.sample, raw.sample) and got.sequential_calls == raw.sequential_calls
    assert got.tol == tol and got.accept_tol == window_accept_tol(tol, sampler)


@pytest.mark.parametrize("sampler", sorted(RAW))
def test_tol_is_the_distance_to_serial_where_the_raw_threshold_misses(sampler):
    tol = MISSES[sampler][3]
    _, raw_err = _run(sampler, RAW[sampler], tol)
    assert raw_err > tol  # the measured miss this mapping exists for (if it stops missing, pick another case)
    _, err = _run(sampler, SAMPLERS[sampler], tol)
    assert err <= tol
