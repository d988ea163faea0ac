"""The stopping rule on the analytic Gaussian mixture (exact model: every error is the sampler's own).

The brief: a naive rule (stop when the final sample changes by < 0.1 between consecutive iterations) stops
on images whose true error is > 1. srds_sample's rule (sampling.py) must not, and `tol` must bound the
distance of the returned sample to the serial sample (or the sample must be the exact one, p = B).

Images are found by search, never hard-coded: a batched textbook Parareal (helpers_core.parareal_ref, which
is row-wise, so each row is an independent image) gives every iterate of every row; candidate images are then
re-run alone (batch = 1) through srds_sample.
"""

from __future__ import annotations

import pytest
import torch

from helpers_core import SD_CONFIG, CountingModel, gaussian_mixture, max_abs, parareal_ref
from helpers_core import single_thread  # noqa: F401  (fixture)
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers import DEFAULT_TOL, serial_sample, srds_sample
from srds_trt.samplers.stopping import error_estimate
from srds_trt.samplers.plan import block_bounds

pytestmark = pytest.mark.usefixtures("single_thread")

NAIVE_TOL = 0.1
_CACHE: dict = {}


def _grid(n: int):
    if n not in _CACHE:
        _CACHE[n] = ddim_grid(SD_CONFIG, n)
    return _CACHE[n]


def _images(seed: int, dim: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _iterates(n: int, seed: int, dim: int, rows: int):
    """(gmm, x, U) with U[p][b] for every Parareal iteration p = 0..B, batched over independent rows."""
    key = ("it", n, seed, dim, rows)
    if key not in _CACHE:
        grid, alphas = _grid(n)
        gmm = gaussian_mixture(alphas, dim, seed)
        x = _images(seed, dim, rows)
        bounds = list(block_bounds(n))
        _CACHE[key] = gmm, x, parareal_ref(gmm, x, grid.tolist(), alphas, bounds, len(bounds) - 1)
    return _CACHE[key]


def _naive_traps(n: int, configs, rows: int):
    """(seed, dim, row, k, change, error): the naive rule would stop after iteration k at an error > 1."""
    traps = []
    for seed, dim in configs:
        _, _, U = _iterates(n, seed, dim, rows)
        blocks = len(U) - 1
        serial = U[blocks][blocks]
        for r in range(rows):
            for k in range(1, blocks):
                change = float((U[k][blocks][r] - U[k - 1][blocks][r]).abs().max())
                error = float((U[k][blocks][r] - serial[r]).abs().max())
                if change < NAIVE_TOL and error > 1.0:
                    traps.append((seed, dim, r, k, change, error))
                    break
    return traps


SEARCH = [(0, 2), (0, 3), (0, 4), (1, 4), (3, 4)]  # (seed, dim) of the hard mixture family of the brief


@pytest.mark.parametrize("pipelined", [False, True])
def test_naive_rule_stops_far_from_serial_but_srds_rule_does_not(pipelined):
    n = 100
    grid, alphas = _grid(n)
    traps = _naive_traps(n, SEARCH, rows=16)
    assert traps, "the search found no image on which the naive rule fails: the test would be vacuous"
    for seed, dim, row, k, change, error in traps:
        gmm, x, U = _iterates(n, seed, dim, 16)
        image = x[row: row + 1]
        serial = serial_sample(gmm, image, grid, alphas)
        # Confirm the trap with the sampler itself, batch = 1: iterates k-1 and k are close, k is far.
        prev = srds_sample(gmm, image, grid, alphas, tol=0.0, max_iters=k - 1, pipelined=pipelined).sample
        at_k = srds_sample(gmm, image, grid, alphas, tol=0.0, max_iters=k, pipelined=pipelined).sample
        assert max_abs(at_k, prev) < NAIVE_TOL and max_abs(at_k, serial) > 1.0
        res = srds_sample(gmm, image, grid, alphas, tol=NAIVE_TOL, pipelined=pipelined)
        assert res.iterations != k, (seed, dim, row, k, res.residuals)
        err = max_abs(res.sample, serial)
        assert err <= NAIVE_TOL or (res.iterations == res.num_blocks and err <= 1e-9), (seed, dim, row, res.iterations, err)


# (N, seed, dim) searched image by image (64 images each) for the promise "error <= tol, or exact".
PROMISE_SEARCH = [(25, 1, 4), (25, 2, 3), (100, 0, 3), (100, 2, 1)]


@pytest.mark.parametrize("n, seed, dim, tol", [c + (0.1,) for c in PROMISE_SEARCH] + [(100, 0, 3, 1e-2)])
def test_tol_bounds_the_error_image_by_image(n, seed, dim, tol):
    """Every image run alone: the returned sample is within tol of the serial one, or is the serial one.

    FAILS with the core's rule at tol=0.1 (N=25 seed 1 dim 4, N=100 seed 0 dim 3, ...): residuals like
    [0.35, 0.07, 2.34] make rho_2 = 0.2, so err_2 ~ 0.07 <= tol, while the true error is 2.4 — two consecutive
    iterates agree because both are wrong the same way. See the report for the proposed fix.
    """
    grid, alphas = _grid(n)
    gmm, x, U = _iterates(n, seed, dim, 64)
    blocks = len(U) - 1
    serial = U[blocks][blocks]
    failures = []
    for r in range(x.shape[0]):
        res = srds_sample(gmm, x[r: r + 1], grid, alphas, tol=tol)
        err = max_abs(res.sample, serial[r: r + 1])
        if not (err <= tol or (res.iterations == blocks and err <= 1e-9)):
            failures.append((r, res.iterations, round(err, 4), [round(v, 4) for v in res.residuals]))
    assert not failures, f"false stops (row, iteration, true error, residuals): {failures}"


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("n", [25, 100])
def test_default_tol_holds_over_a_batch_of_images(n, pipelined):
    grid, alphas = _grid(n)
    for seed, dim in [(0, 2), (1, 4)]:
        gmm = gaussian_mixture(alphas, dim, seed)
        x = _images(100 + seed, dim, 64)
        serial = serial_sample(gmm, x, grid, alphas)
        res = srds_sample(gmm, x, grid, alphas, pipelined=pipelined)  # default tol
        assert res.converged
        assert max_abs(res.sample, serial) <= DEFAULT_TOL, (seed, dim, res.iterations, res.residuals)
        assert res.error_estimates[-1] <= DEFAULT_TOL or res.iterations == res.num_blocks


@pytest.mark.parametrize("n, seed, dim", [(25, 0, 2), (100, 0, 3)])
def test_last_residual_is_the_true_error_of_the_previous_iterate(n, seed, dim):
    """r_B compares iterate B (exact) with iterate B-1 at the final boundary and beyond: it is exactly the
    error iterate B-1 had; the recorded residuals are the max boundary changes of the textbook iterates."""
    grid, alphas = _grid(n)
    gmm, x, U = _iterates(n, seed, dim, 64)
    blocks = len(U) - 1
    res = srds_sample(gmm, x, grid, alphas, tol=0.0)
    assert res.iterations == blocks
    before_last = srds_sample(gmm, x, grid, alphas, tol=0.0, max_iters=blocks - 1).sample
    assert res.residuals[-1] == pytest.approx(max_abs(before_last, res.sample), abs=1e-12)
    expected = [max(max_abs(U[p][b], U[p - 1][b]) for b in range(p, blocks + 1)) for p in range(1, blocks + 1)]
    assert res.residuals == pytest.approx(expected, abs=1e-10)
    assert res.residuals[-1] < 1e-2 * max(res.residuals)  # converged: the last change is tiny


def test_zero_residual_stops_at_once_and_is_exact():
    """B = N makes the coarse solver the fine solver: iteration 1 changes nothing (bit for bit with an
    elementwise model), the estimate is 0, and tol = 0 stops after one iteration with the serial sample."""
    n = 6
    grid, alphas = _grid(n)

    def model(x, t):
        return torch.sin(x * 1.3 + t.to(x.dtype).view(-1, 1) / 500.0)

    counting = CountingModel(model)
    x = _images(0, 3, 4)
    res = srds_sample(counting, x, grid, alphas, tol=0.0, num_blocks=n)
    assert res.residuals[0] == 0.0 and res.error_estimates == [0.0]
    assert res.iterations == 1 and res.converged
    assert max_abs(res.sample, serial_sample(model, x, grid, alphas)) <= 1e-12


def _history(*finals, interior=None):
    """Per-boundary change vectors for iterations 1..p of a B=6 run: boundary p exact-ish, the final given."""
    blocks = 6
    hist = []
    for p, c in enumerate(finals, start=1):
        inner = c if interior is None else interior[p - 1]
        hist.append([0.0] * (p - 1) + [inner] * (blocks - p) + [c])
    return hist


def test_error_estimate_rule_properties():
    """What the estimate must do, formula-agnostic where it can be (a stricter rule still passes)."""
    import math

    assert error_estimate([]) == math.inf
    assert error_estimate(_history(0.5)) == math.inf  # one change says nothing about contraction
    assert error_estimate(_history(0.0)) == 0.0  # nothing moved: the fixed point (exact)
    assert error_estimate(_history(0.3, 0.0)) == 0.0
    assert error_estimate(_history(0.1, 0.2)) == math.inf  # growing change: no estimate
    assert error_estimate(_history(0.0, 0.3)) == math.inf
    # fast contraction everywhere gives a finite estimate, slower contraction never a lower one
    assert math.isfinite(error_estimate(_history(1.0, 0.1, 0.01)))
    assert error_estimate(_history(0.2, 0.1, 0.09)) > error_estimate(_history(0.2, 0.1, 0.01))
    assert error_estimate(_history(0.2, 0.1, 0.09)) > 0.09 * 2  # rho = 0.9: well above the last change
    # a final sample that settles while the interior still moves is the false stop of the old rules: no estimate
    assert error_estimate(_history(0.5, 1e-4, interior=[0.5, 0.45])) == math.inf
    assert math.isfinite(error_estimate(_history(0.5, 1e-4, interior=[0.5, 0.1])))
    # the estimate covers the previous iterate's error (~ the last final change) and the current one's tail
    assert error_estimate(_history(1.0, 0.5)) >= 0.5 * 0.5 / (1 - 0.5)
    assert 0.01 * 0.01 / 0.99 <= error_estimate(_history(1.0, 0.01)) <= 0.0102  # final boundary, not interior max
    # ... but never below what the interior still moves (INTERIOR_WEIGHT = 1): it reaches the final sample later
    assert 0.2 <= error_estimate(_history(1.0, 0.01, interior=[1.0, 0.2])) <= 0.21
    assert error_estimate(_history(1.0, 0.01, interior=[1.0, 0.3])) == math.inf  # interior above 1/4 of before


def test_tol_stops_earlier_than_tol_zero_and_reports_what_it_compared():
    grid, alphas = _grid(100)
    gmm = gaussian_mixture(alphas, 2, 0)
    x = _images(7, 2, 16)
    exact = srds_sample(gmm, x, grid, alphas, tol=0.0)
    loose = srds_sample(gmm, x, grid, alphas, tol=0.5)
    # tol = 0 runs to B, or stops earlier only when an iteration changed nothing at all (float64 fixed point)
    assert loose.iterations < exact.iterations and (exact.iterations == exact.num_blocks or exact.residuals[-1] == 0.0)
    assert loose.converged and loose.error_estimates[-1] <= 0.5
    assert all(e > 0.5 for e in loose.error_estimates[:-1])
    assert loose.sequential_calls < exact.sequential_calls and loose.model_evals < exact.model_evals


# ------------------------------------------------------------------ the stress suite's hard rows (benchmarks/stopping.py)

from benchmarks.stopping import Case, iterates, replay  # noqa: E402

HARD_ROWS = [("gmm-d3-m8-s0.02-seed0", 25), ("gmm-d4-m8-s0.02-seed1", 25), ("gmm-d3-m8-s0.02-seed0", 100),
             ("gmm-d4-m8-s0.02-seed3", 100)]


def _judge(tols=(1e-2, 1e-3)):
    """(false stops, lateness per row) of the current rule over the hard rows, every image its own run.
    Lateness counts from the iterate after which the true error stays within tol (and from iteration 1)."""
    false, lates = [], []
    for name, n in HARD_ROWS:
        its = iterates(Case(name, n, 32, True, iters=12))
        blocks = len(its.bounds) - 1
        for tol in tols:
            for r in range(len(its.errors[0])):
                errs = [e[r] for e in its.errors]
                settled = next(k for k in range(len(errs)) if all(e <= tol for e in errs[k:]))
                k = replay([c[r] for c in its.changes], tol, blocks) or blocks
                if errs[k] > tol:
                    false.append((name, n, tol, r, k, errs[k]))
                lates.append(k - max(1, settled))
    return false, lates


def _on_time(false, lates) -> bool:
    # Measured (the rows below, 256 runs): 139 at settled+1, 102 at +2, 7 at +3, 7 at +4, 1 at +5. Without the
    # INTERIOR_WEIGHT term (the interior must have come within tol, which costs these rows an iteration where the
    # final sample settles before the interior) it was 236 at +1, 12 at +2, 1 at +3, 6 at +4, 1 at +5, and no
    # false stop here either; but a batch judged as one run did stop falsely (the test below). The mutants of
    # test_mutants_of_the_rule_fail_the_hard_rows stop at +1 on none of the 256 runs.
    n = len(lates)
    return (not false and sum(late <= 1 for late in lates) >= 0.5 * n and sum(late <= 2 for late in lates) >= 0.9 * n
            and max(lates) <= 5)


@pytest.mark.slow
def test_rule_on_hard_rows_never_false_stops_and_is_on_time():
    false, lates = _judge()
    assert not false, f"false stops (case, N, tol, row, iteration, true error): {false[:5]}"
    assert _on_time(false, lates), sorted(lates)[-10:]


@pytest.mark.slow
def test_mutants_of_the_rule_fail_the_hard_rows(monkeypatch):
    """The checks above bite: the old rule (global residual, held two iterations) is late, and an off-by-one
    estimator (judging the previous iteration's final change) stops falsely or late."""
    import math

    import srds_trt.samplers.stopping as stopping

    def old_rule(history):
        residuals = [max(c) for c in history]
        if not residuals:
            return math.inf
        if residuals[-1] == 0.0:
            return 0.0

        def bound(res):
            if len(res) < 2 or res[-2] == 0.0 or res[-1] >= res[-2]:
                return math.inf
            rho = res[-1] / res[-2]
            return res[-1] * max(1.0, rho / (1.0 - rho))

        return max(bound(residuals), bound(residuals[:-1]))

    def off_by_one(history):
        return stopping.error_estimate.__wrapped__(history[:-1]) if len(history) > 1 else math.inf

    original = stopping.error_estimate
    off_by_one.__wrapped__ = original
    for mutant in (old_rule, off_by_one):
        monkeypatch.setattr(stopping, "error_estimate", mutant)
        assert not _on_time(*_judge()), mutant.__name__
    monkeypatch.setattr(stopping, "error_estimate", original)


@pytest.mark.parametrize("pipelined", [False, True])
def test_benchmark_replay_is_what_srds_sample_does(pipelined):
    """benchmarks/stopping.py replays the rule on textbook iterates: srds_sample must stop at the same iteration
    with the same per-boundary changes, or the table measures something else."""
    n = 100
    grid, alphas = _grid(n)
    case = Case("gmm-d3-m8-s0.02-seed0", n, 8, False, iters=12)
    its = iterates(case)
    from benchmarks.stopping import _gmm

    gmm, x, *_ = _gmm(case)
    for tol in (1e-2, 1e-3):
        res = srds_sample(gmm, x, grid, alphas, tol=tol, pipelined=pipelined)
        assert res.iterations == replay([c[0] for c in its.changes], tol, res.num_blocks)
        for mine, theirs in zip(res.boundary_changes, its.changes):
            assert mine == pytest.approx(theirs[0], abs=1e-12)
        assert max_abs(res.sample, serial_sample(gmm, x, grid, alphas)) <= tol


# ------------------------------------------------------------------ a batch judged as one run (the pipeline's setting)

# benchmarks/cases.py "gmm" (hard_mixture, 2-D, 8 modes std 0.05), N = 1024 (B = 54), 256 images of seed 0 judged
# as ONE batch: the per-boundary changes (max over the batch) of iterations 1..8, boundaries b >= p (those below
# are exactly 0), 3 significant digits, from `python -m benchmarks.stopping --variants` (case batch-gmm), and the
# true error max|U[p][B] - serial| of iterates p = 0..8.
GMM1024_BLOCKS = 54
GMM1024_CHANGES = [
    [0.00694, 0.0135, 0.0192, 0.0243, 0.029, 0.033, 0.0362, 0.0388, 0.0412, 0.0438, 0.0461, 0.0481, 0.0497, 0.0512,
     0.0528, 0.0557, 0.0589, 0.0617, 0.0639, 0.0656, 0.0705, 0.0762, 0.0814, 0.086, 0.09, 0.0932, 0.0989, 0.11,
     0.128, 0.146, 0.161, 0.191, 0.245, 0.323, 0.428, 0.559, 0.704, 0.853, 1, 1.15, 1.3, 1.44, 1.59, 1.73, 1.87,
     2.01, 2.15, 2.28, 2.42, 2.54, 2.67, 2.78, 2.89, 2.99],
    [1.34e-05, 3.4e-05, 6.01e-05, 8.56e-05, 0.000114, 0.000152, 0.00019, 0.000247, 0.000319, 0.000418, 0.000519,
     0.000624, 0.000759, 0.00088, 0.000966, 0.0011, 0.00123, 0.00148, 0.00179, 0.00219, 0.00268, 0.00328, 0.00396,
     0.00506, 0.00665, 0.00915, 0.0128, 0.0182, 0.0264, 0.0386, 0.0567, 0.0812, 0.109, 0.13, 0.149, 0.226, 0.342,
     0.496, 0.662, 0.826, 0.986, 1.14, 1.29, 1.43, 1.61, 1.8, 2, 2.19, 2.37, 2.55, 2.72, 2.87, 3.01],
    [2.47e-08, 8.39e-08, 1.83e-07, 3.5e-07, 6.05e-07, 1.1e-06, 1.84e-06, 2.83e-06, 4.01e-06, 5.7e-06, 7.67e-06,
     9.57e-06, 1.2e-05, 1.52e-05, 1.74e-05, 1.94e-05, 2.46e-05, 3.18e-05, 4.19e-05, 5.56e-05, 8.05e-05, 0.000116,
     0.000182, 0.00029, 0.000469, 0.000771, 0.00128, 0.0021, 0.00333, 0.00471, 0.00871, 0.0176, 0.0358, 0.0684, 0.11,
     0.138, 0.14, 0.131, 0.125, 0.117, 0.108, 0.0986, 0.0893, 0.0799, 0.0703, 0.0606, 0.0506, 0.0402, 0.0578, 0.0445,
     0.0333, 0.0565],
    [4.48e-11, 2.24e-10, 6.63e-10, 1.85e-09, 4.34e-09, 8.83e-09, 1.59e-08, 2.71e-08, 4.4e-08, 6.49e-08, 9.53e-08,
     1.41e-07, 1.86e-07, 2.18e-07, 2.33e-07, 3.18e-07, 4.2e-07, 6.01e-07, 8.95e-07, 1.41e-06, 2.36e-06, 4.28e-06,
     7.94e-06, 1.5e-05, 2.88e-05, 5.51e-05, 0.000102, 0.000204, 0.000469, 0.0011, 0.00255, 0.00513, 0.00638, 0.00311,
     0.00605, 0.00819, 0.00801, 0.0075, 0.00696, 0.00642, 0.00587, 0.00532, 0.00476, 0.0042, 0.00363, 0.0105, 0.0425,
     0.11, 0.277, 0.426, 0.574],
    [1.11e-13, 7.66e-13, 3.34e-12, 1.07e-11, 2.78e-11, 6.12e-11, 1.29e-10, 2.41e-10, 4.2e-10, 7.6e-10, 1.23e-09,
     1.72e-09, 2.07e-09, 2.59e-09, 3.75e-09, 5.2e-09, 7.16e-09, 1.15e-08, 1.92e-08, 3.48e-08, 7.22e-08, 1.54e-07,
     3.38e-07, 7.53e-07, 1.81e-06, 4.62e-06, 1.23e-05, 3.37e-05, 9.42e-05, 0.000249, 0.000497, 0.000364, 0.000159,
     0.000121, 0.000255, 0.000571, 0.00037, 8.43e-05, 6.92e-05, 6.41e-05, 5.9e-05, 5.41e-05, 4.95e-05, 7.28e-05,
     0.00122, 0.0266, 0.0992, 0.0763, 0.0411, 0.0321],
    [2.66e-15, 3.55e-15, 1.63e-14, 5.8e-14, 1.69e-13, 4.36e-13, 9.57e-13, 2.22e-12, 4.57e-12, 8.16e-12, 1.23e-11,
     1.53e-11, 2.27e-11, 3.5e-11, 5.15e-11, 7.52e-11, 1.17e-10, 2.13e-10, 3.97e-10, 9.33e-10, 2.46e-09, 6.73e-09,
     1.9e-08, 5.56e-08, 1.69e-07, 5.36e-07, 1.76e-06, 5.86e-06, 1.82e-05, 3.88e-05, 2.08e-05, 7.41e-06, 4.63e-06,
     1.84e-05, 5e-05, 1.18e-05, 2.04e-05, 2.04e-05, 1.88e-05, 1.7e-05, 1.53e-05, 1.36e-05, 1.18e-05, 7.21e-05,
     0.00107, 0.0198, 0.0177, 0.0109, 0.000806],
    [1.33e-15, 2.22e-15, 3.55e-15, 5.33e-15, 5.77e-15, 7.55e-15, 8.44e-15, 2.02e-14, 4.09e-14, 6.75e-14, 8.62e-14,
     1.58e-13, 2.63e-13, 4.13e-13, 6.43e-13, 1.03e-12, 1.92e-12, 3.8e-12, 1.11e-11, 3.48e-11, 1.12e-10, 3.75e-10,
     1.3e-09, 4.68e-09, 1.77e-08, 6.92e-08, 2.75e-07, 1e-06, 2.37e-06, 8.26e-07, 8.74e-07, 7.77e-07, 9.57e-07,
     3.07e-06, 7.59e-07, 1.9e-06, 1.51e-06, 1.37e-06, 1.25e-06, 1.12e-06, 9.99e-07, 8.79e-07, 2.55e-06, 5.07e-05,
     0.000355, 0.000465, 0.000816, 0.00213],
    [4.44e-16, 1.33e-15, 3.11e-15, 3.55e-15, 4.44e-15, 5.33e-15, 5.33e-15, 5.77e-15, 4.88e-15, 5.33e-15, 6.22e-15,
     4.44e-15, 5.33e-15, 5.33e-15, 7.11e-15, 1.42e-14, 3.02e-14, 9.81e-14, 3.79e-13, 1.46e-12, 5.75e-12, 2.36e-11,
     1.01e-10, 4.52e-10, 2.11e-09, 9.97e-09, 4.3e-08, 1.13e-07, 1.85e-08, 6.2e-08, 4.33e-08, 3.87e-08, 1.42e-07,
     1.12e-07, 5.4e-08, 2.91e-08, 2.67e-08, 2.43e-08, 2.19e-08, 1.96e-08, 1.73e-08, 5.64e-08, 1.7e-06, 1.71e-05,
     1.64e-05, 2.45e-05, 0.000137],
]
GMM1024_ERRORS = [3.01, 2.96, 0.564, 0.539, 0.0352, 0.00308, 0.00228, 0.000141, 4.37e-06]


def test_batch_whose_final_sample_stalls_while_the_interior_moves_is_not_accepted():
    """The measured miss of the previous rule (no INTERIOR_WEIGHT term): at p = 6 the final sample moved 8.1e-4
    (contracting from 3.2e-2) and the interior's max change fell by 0.2 (under INTERIOR_CONTRACTION) to 2e-2,
    20x tol: it stopped there with a true error of 2.3e-3 > tol = 1e-3. The rule must return an iterate within
    tol: it stops at 8 (p = 7's final change grew back to 2.1e-3: no estimate there), error 4.4e-6."""
    from srds_trt.samplers.stopping import StoppingRule

    def stop(tol):
        rule = StoppingRule(tol, GMM1024_BLOCKS)
        for p, tail in enumerate(GMM1024_CHANGES, start=1):
            if rule.observe(p, [0.0] * (p - 1) + tail):
                return p
        return None

    for tol in (1e-3, 2e-3, 1e-2):
        p = stop(tol)
        assert p is not None and GMM1024_ERRORS[p] <= tol and p <= 8, (tol, p)
