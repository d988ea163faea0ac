"""srds_sample against serial_sample: exactness at tol=0, iterate-by-iterate agreement with a textbook
Parareal, plain vs pipelined, dtypes, and the cost counters against what the model actually saw."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers_core import SD_CONFIG, CountingModel, RowwiseMLP, gaussian_mixture, max_abs, parareal_ref, serial_ref
from helpers_core import single_thread  # noqa: F401  (fixture)
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers import serial_sample, srds_sample
from srds_trt.samplers.plan import block_bounds, build_tick_plan

NS = [1, 2, 3, 7, 10, 25, 36, 50, 100]  # squares and non-squares
SHAPE = (3, 2, 3)  # [images, ...]: 3 images of 6 features

_GRIDS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

pytestmark = pytest.mark.usefixtures("single_thread")


def grid_for(n: int):
    if n not in _GRIDS:
        _GRIDS[n] = ddim_grid(SD_CONFIG, n)
    return _GRIDS[n]


def _block_choices(n: int) -> list:
    choices = [None, 1]
    if n >= 2:
        choices.append(2)
    other = math.isqrt(n) + 1
    if other <= n:
        choices.append(other)
    if n <= 25:
        choices.append(n)  # one step per block: the coarse solver IS the fine solver
    return sorted(set(choices), key=lambda c: -1 if c is None else c)


CASES = [(n, b) for n in NS for b in _block_choices(n)]


@pytest.mark.parametrize("n, num_blocks", CASES, ids=[f"N{n}-B{b}" for n, b in CASES])
def test_srds_at_tol_zero_is_the_serial_sample_mlp(n, num_blocks):
    grid, alphas = grid_for(n)
    model = RowwiseMLP(features=6, seed=n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    serial = serial_sample(model, x, grid, alphas)
    assert max_abs(serial, serial_ref(model, x, grid.tolist(), alphas)) <= 1e-10
    blocks = len(block_bounds(n, num_blocks)) - 1
    for pipelined in (False, True):
        res = srds_sample(model, x, grid, alphas, tol=0.0, num_blocks=num_blocks, pipelined=pipelined)
        assert res.num_blocks == blocks
        assert 1 <= res.iterations <= blocks
        assert res.converged
        assert res.sample.shape == x.shape and res.sample.dtype == x.dtype
        assert max_abs(res.sample, serial) <= 1e-9, (pipelined, res.iterations)
        assert len(res.residuals) == len(res.error_estimates) == res.iterations


@pytest.mark.parametrize("n", [1, 7, 25, 100])
def test_srds_at_tol_zero_is_the_serial_sample_gmm(n):
    grid, alphas = grid_for(n)
    gmm = gaussian_mixture(alphas, dim=3, seed=0)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    serial = serial_sample(gmm, x, grid, alphas)
    for pipelined in (False, True):
        res = srds_sample(gmm, x, grid, alphas, tol=0.0, pipelined=pipelined)
        assert res.iterations <= res.num_blocks
        assert max_abs(res.sample, serial) <= 1e-9


@pytest.mark.parametrize("n, num_blocks", [(7, 3), (10, None), (25, None), (26, 4)])
def test_every_iteration_equals_textbook_parareal_and_pipelined_equals_plain(n, num_blocks):
    """max_iters=k returns exactly the k-th Parareal iterate, in plain and pipelined mode alike."""
    grid, alphas = ddim_grid(SD_CONFIG, n)
    model = RowwiseMLP(features=6, seed=7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bounds = list(block_bounds(n, num_blocks))
    blocks = len(bounds) - 1
    ref = parareal_ref(model, x, grid.tolist(), alphas, bounds, blocks)
    finals = []
    for k in range(blocks + 1):
        plain = srds_sample(model, x, grid, alphas, tol=0.0, num_blocks=num_blocks, max_iters=k, pipelined=False)
        piped = srds_sample(model, x, grid, alphas, tol=0.0, num_blocks=num_blocks, max_iters=k, pipelined=True)
        assert plain.iterations == piped.iterations == k
        assert plain.converged == piped.converged == (k == blocks)
        assert max_abs(plain.sample, piped.sample) <= 1e-12
        assert max_abs(plain.sample, ref[k][blocks]) <= 1e-10
        assert plain.residuals == pytest.approx(piped.residuals, abs=1e-12)
        if blocks >= 3 and k >= 2:
            assert piped.sequential_calls < plain.sequential_calls
        assert piped.sequential_calls <= plain.sequential_calls
        finals.append(plain.sample)
    # the iterates really differ before convergence: the equalities above are not vacuous
    assert max_abs(finals[0], finals[-1]) > 1e-3
    # and after p iterations boundary p is exact (the textbook property the sampler relies on)
    for p in range(blocks + 1):
        assert max_abs(ref[p][p], ref[blocks][p]) <= 1e-12


@pytest.mark.parametrize("n", [4, 9, 16, 100])
def test_residuals_recorded_are_the_boundary_changes(n):
    grid, alphas = grid_for(n)
    model = RowwiseMLP(features=6, seed=3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    blocks = max(1, round(n ** 0.5))  # explicit: the default block count is schedule.py's business
    bounds = list(block_bounds(n, blocks))
    ref = parareal_ref(model, x, grid.tolist(), alphas, bounds, blocks)
    seen = []
    res = srds_sample(model, x, grid, alphas, tol=0.0, num_blocks=blocks, progress=lambda p, r: seen.append((p, r)))
    expected = [max(max_abs(ref[p][b], ref[p - 1][b]) for b in range(p, blocks + 1)) for p in range(1, blocks + 1)]
    assert res.residuals == pytest.approx(expected, abs=1e-10)
    assert [p for p, _ in seen] == list(range(1, res.iterations + 1))
    assert [r for _, r in seen] == res.residuals


def test_max_iters_beyond_blocks_never_runs_more_iterations_than_blocks():
    grid, alphas = grid_for(10)
    model = CountingModel(RowwiseMLP(features=6))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for pipelined in (False, True):
        res = srds_sample(model, x, grid, alphas, tol=0.0, num_blocks=3, max_iters=50, pipelined=pipelined)
        assert res.num_blocks == 3 and res.iterations == 3 and res.converged
        assert res.sequential_calls == len(build_tick_plan(10, 3, pipelined=pipelined).ticks)


def test_max_iters_zero_is_the_coarse_sample():
    grid, alphas = grid_for(9)
    model = RowwiseMLP(features=6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coarse_grid = grid[list(block_bounds(9, 3))]  # every block boundary: a B-step DDIM sample
    res = srds_sample(model, x, grid, alphas, num_blocks=3, max_iters=0)
    assert res.iterations == 0 and not res.converged and res.sequential_calls == 3 and res.model_evals == 9
    assert max_abs(res.sample, serial_sample(model, x, coarse_grid, alphas)) <= 1e-12


@pytest.mark.parametrize("pipelined", [False, True])
def test_float32_works_and_result_follows_x(pipelined):
    grid, alphas = grid_for(25)
    model = RowwiseMLP(features=6, seed=2)
    x64 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x64.float()
    serial32 = serial_sample(model, x, grid, alphas)
    res = srds_sample(model, x, grid, alphas, tol=0.0, pipelined=pipelined)
    assert serial32.dtype == res.sample.dtype == torch.float32
    assert res.sample.device == x.device
    scale = max(1.0, float(serial32.abs().max()))
    assert max_abs(res.sample, serial32) <= 1e-5 * scale
    assert max_abs(res.sample, serial_sample(model, x64, grid, alphas)) <= 1e-4 * scale


def test_half_input_keeps_float32_states_and_returns_half():
    grid, alphas = grid_for(9)
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return RowwiseMLP(features=6)(x, t)

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).half()
    res = srds_sample(model, x, grid, alphas, tol=0.0)
    assert res.sample.dtype == torch.float16 and serial_sample(model, x, grid, alphas).dtype == torch.float16
    assert set(seen) == {torch.float32}


def test_batch_rows_are_independent():
    """Image i's SRDS sample does not depend on the other images in its batch (row-wise model, tol=0)."""
    grid, alphas = grid_for(16)
    model = RowwiseMLP(features=6, seed=4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full = srds_sample(model, x, grid, alphas, tol=0.0, pipelined=True).sample
    for i in range(x.shape[0]):
        alone = srds_sample(model, x[i: i + 1], grid, alphas, tol=0.0, pipelined=True).sample
        assert max_abs(alone, full[i: i + 1]) <= 1e-12


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    blocks=st.integers(1, 30),
    batch=st.integers(1, 3),
    pipelined=st.booleans(),
    tol=st.sampled_from([0.0, 1e-3, 0.05, 1.0]),
    max_iters=st.one_of(st.none(), st.integers(0, 8)),
)
def test_counters_equal_what_the_model_saw(n, blocks, batch, pipelined, tol, max_iters):
    blocks = min(blocks, n)
    grid, alphas = grid_for(n)
    model = CountingModel(RowwiseMLP(features=2, seed=1))
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    res = srds_sample(model, x, grid, alphas, tol=tol, num_blocks=blocks, max_iters=max_iters, pipelined=pipelined)
    plan = build_tick_plan(n, blocks, max_iters, pipelined)
    assert res.model_evals == sum(model.rows)
    assert res.sequential_calls == len(model.rows)
    assert all(r % batch == 0 and r > 0 for r in model.rows)
    # the calls are exactly the plan's ticks, in order, until the stop
    assert model.rows == [tick.rows * batch for tick in plan.ticks[: len(model.rows)]]
    assert res.sequential_calls == plan.ticks_until(res.iterations)
    assert res.iterations <= min(plan.max_iters, blocks)
    if res.converged:
        assert res.iterations == blocks or res.error_estimates[-1] <= tol
    else:
        assert res.iterations == plan.max_iters
    # every row's timestep is on the grid, and rows are segment-major: each segment's images share t
    on_grid = set(grid[:-1].tolist())
    for t in model.timesteps:
        assert set(t.tolist()) <= on_grid
        assert torch.equal(t.view(-1, batch), t.view(-1, batch)[:, :1].expand(-1, batch))


@pytest.mark.parametrize("n, num_blocks, batch", [(10, None, 2), (25, None, 1), (23, 4, 3), (12, 5, 2)])
def test_plain_fine_batch_shrinks_as_blocks_become_exact(n, num_blocks, batch):
    """Plain mode: iteration p's fine ticks hold one row per image for every block b >= p still running."""
    grid, alphas = grid_for(n)
    model = CountingModel(RowwiseMLP(features=2))
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bounds = block_bounds(n, num_blocks)
    blocks = len(bounds) - 1
    sizes = [bounds[b + 1] - bounds[b] for b in range(blocks)]
    srds_sample(model, x, grid, alphas, tol=0.0, num_blocks=num_blocks, pipelined=False)
    expected = [batch] * blocks  # iteration 0: the coarse sweep
    for p in range(blocks):
        for j in range(max(sizes[p:])):
            expected.append(batch * sum(1 for b in range(p, blocks) if j < sizes[b]))
        expected += [batch] * (blocks - p - 1)
    assert model.rows == expected
    # with equal blocks the first fine tick of iteration p has exactly (B - p) * images rows
    if n % blocks == 0:
        firsts, i = [], blocks
        for p in range(blocks):
            firsts.append(model.rows[i])
            i += sizes[0] + blocks - p - 1
        assert firsts == [(blocks - p) * batch for p in range(blocks)]


@pytest.mark.parametrize("pipelined", [False, True])
def test_v_prediction_srds_is_exact(pipelined):
    grid, alphas = grid_for(25)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for model in (gaussian_mixture(alphas, 3, 0, prediction_type="v_prediction"), RowwiseMLP(features=3, seed=9)):
        serial = serial_sample(model, x, grid, alphas, prediction_type="v_prediction")
        assert max_abs(serial, serial_ref(model, x, grid.tolist(), alphas, "v_prediction")) <= 1e-10
        res = srds_sample(model, x, grid, alphas, prediction_type="v_prediction", tol=0.0, pipelined=pipelined)
        assert max_abs(res.sample, serial) <= 1e-9


# --- bad input ------------------------------------------------------------------------------------------

def _ok():
    grid, alphas = grid_for(9)
    return RowwiseMLP(features=2), torch.zeros(2, 2, dtype=torch.float64), grid, alphas


@pytest.mark.parametrize("sampler", ["serial", "srds"])
@pytest.mark.parametrize(
    "bad_grid",
    [[900, 900, -1], [100, 500, -1], [5, 3, 4, -1], [800], [], [[900, -1]]],
    ids=["repeat", "increasing", "non-monotone", "one-point", "empty", "2-d"],
)
def test_bad_timesteps_raise(sampler, bad_grid):
    model, x, _, alphas = _ok()
    fn = serial_sample if sampler == "serial" else srds_sample
    with pytest.raises(ValueError, match="timesteps"):
        fn(model, x, torch.tensor(bad_grid, dtype=torch.long), alphas)


def test_out_of_range_timesteps_raise():
    model, x, _, alphas = _ok()
    for bad in ([1000, 500, -1], [500, -2]):
        with pytest.raises(ValueError, match="timesteps"):
            srds_sample(model, x, torch.tensor(bad), alphas)


@pytest.mark.parametrize("num_blocks", [0, -1, 10, 100])
def test_bad_num_blocks_raise(num_blocks):
    model, x, grid, alphas = _ok()  # N = 9
    with pytest.raises(ValueError, match="num_blocks"):
        srds_sample(model, x, grid, alphas, num_blocks=num_blocks)


@pytest.mark.parametrize("tol", [-1e-3, float("nan"), float("inf")])
def test_bad_tol_raises(tol):
    model, x, grid, alphas = _ok()
    with pytest.raises(ValueError, match="tol"):
        srds_sample(model, x, grid, alphas, tol=tol)


def test_bad_max_iters_raises():
    model, x, grid, alphas = _ok()
    with pytest.raises(ValueError, match="max_iters"):
        srds_sample(model, x, grid, alphas, max_iters=-1)


@pytest.mark.parametrize("sampler", ["serial", "srds"])
def test_unknown_solver_or_prediction_type_raise(sampler):
    model, x, grid, alphas = _ok()
    fn = serial_sample if sampler == "serial" else srds_sample
    with pytest.raises(ValueError, match="solver"):
        fn(model, x, grid, alphas, solver="euler")
    with pytest.raises(ValueError, match="prediction_type"):
        fn(model, x, grid, alphas, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        fn(model, x, grid, alphas, prediction_type="eps")


def test_empty_batch_raises():
    model, _, grid, alphas = _ok()
    for sampler in (serial_sample, srds_sample):
        with pytest.raises(ValueError, match="x must be"):
            sampler(model, torch.zeros(0, 2, dtype=torch.float64), grid, alphas)


def test_bad_input_is_rejected_before_any_model_call():
    _, x, grid, alphas = _ok()
    model = CountingModel(RowwiseMLP(features=2))
    for kwargs in (dict(tol=-1.0), dict(num_blocks=0), dict(solver="x"), dict(prediction_type="x")):
        with pytest.raises(ValueError):
            srds_sample(model, x, grid, alphas, **kwargs)
    assert model.rows == []
