"""The SRDS work plan (schedule.py) as pure data: partition, tick invariants by simulation, cost formulas."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srds_trt.samplers.plan import (EXPECTED_ITERATIONS, CoarseRow, FineRow, block_bounds, build_tick_plan, default_num_blocks,
                               pipelined_calls)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), data=st.data())
def test_block_bounds_partition(n, data):
    blocks = data.draw(st.integers(1, n))
    bounds = block_bounds(n, blocks)
    assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == blocks + 1
    sizes = [bounds[b + 1] - bounds[b] for b in range(blocks)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # longer blocks first
    # contiguous cover of range(n), each step in exactly one block
    covered = [s for b in range(blocks) for s in range(bounds[b], bounds[b + 1])]
    assert covered == list(range(n))


@pytest.mark.parametrize("n", list(range(1, 41)) + [64, 100, 196, 1024])
def test_default_blocks_minimise_the_pipelined_critical_path(n):
    """default_num_blocks is the B with the fewest sequential calls until the expected iteration completes,
    measured on the plan itself (not on the formula it was derived from), and never worse than round(sqrt(N))."""
    k = EXPECTED_ITERATIONS
    chosen = default_num_blocks(n)
    assert len(block_bounds(n)) - 1 == chosen and build_tick_plan(n).num_blocks == chosen

    def calls(b):
        plan = build_tick_plan(n, b, k, pipelined=True)
        return plan.ticks_until(plan.max_iters)

    sqrt_rule = min(n, max(1, round(math.sqrt(n))))
    assert calls(chosen) <= calls(sqrt_rule)
    if n <= 40:  # the exhaustive check costs O(N) plans
        assert calls(chosen) == min(calls(b) for b in range(1, n + 1))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 120), data=st.data())
def test_pipelined_calls_formula_matches_the_plan(n, data):
    b = data.draw(st.integers(1, n))
    k = data.draw(st.integers(1, b))
    plan = build_tick_plan(n, b, k, pipelined=True)
    assert plan.ticks_until(k) == pipelined_calls(n, b, k)


def test_block_bounds_rejects_bad_counts():
    for n, b in [(5, 0), (5, 6), (1, 2), (3, -1)]:
        with pytest.raises(ValueError, match="num_blocks"):
            block_bounds(n, b)
    with pytest.raises(ValueError, match="num_steps"):
        default_num_blocks(0)
    with pytest.raises(ValueError, match="max_iters"):
        build_tick_plan(9, 3, -1)


def simulate(plan) -> dict:
    """Walk the plan like an executor would; assert every row's input exists before its tick and every
    boundary's inputs exist when it is declared ready. Returns per-segment tick lists and completion ticks."""
    bounds, blocks, iters = plan.bounds, plan.num_blocks, plan.max_iters
    sizes = [bounds[b + 1] - bounds[b] for b in range(blocks)]
    ready = {(p, 0): -1 for p in range(iters + 1)}  # boundary -> tick after which it exists
    fine_steps: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (p, b) -> [(tick, step)]
    coarse_at: dict[tuple[int, int], list[int]] = {}
    completes: dict[int, int] = {}
    for i, tick in enumerate(plan.ticks):
        assert tick.rows >= 1, f"tick {i} is an empty model call"
        assert tick.rows == len(tick.fine) + len(tick.coarse)
        assert len(set(tick.fine)) == len(tick.fine) and len(set(tick.coarse)) == len(tick.coarse)
        for r in tick.fine:
            assert isinstance(r, FineRow)
            assert 0 <= r.iteration < iters and r.iteration <= r.block < blocks and 0 <= r.step < sizes[r.block], r
            done = fine_steps.setdefault((r.iteration, r.block), [])
            if r.step == 0:
                assert not done
                assert ready.get((r.iteration, r.block), math.inf) < i, f"F{r} starts before its input exists"
            else:
                assert done and done[-1] == (i - 1, r.step - 1), f"F{r} is not the next step in the next tick"
            done.append((i, r.step))
        for r in tick.coarse:
            assert isinstance(r, CoarseRow)
            assert 0 <= r.iteration <= iters and r.iteration <= r.block < blocks, r
            assert ready.get((r.iteration, r.block), math.inf) < i, f"G{r} runs before its input exists"
            coarse_at.setdefault((r.iteration, r.block), []).append(i)

        def fine_finished(p, b):
            steps = fine_steps.get((p, b), [])
            return len(steps) == sizes[b] and steps[-1][0] <= i

        for p, b in tick.ready:
            assert (p, b) not in ready, f"U[{p}][{b}] declared ready twice"
            assert 0 <= p <= iters and max(p, 1) <= b <= blocks
            if p == 0:
                assert (0, b - 1) in coarse_at
            elif b == p:
                assert fine_finished(p - 1, p - 1)
            else:
                assert (p, b - 1) in coarse_at and (p - 1, b - 1) in coarse_at and fine_finished(p - 1, b - 1)
            ready[(p, b)] = i
        for p in tick.completes:
            assert p not in completes
            assert ready.get((p, blocks)) == i, "an iteration completes where its last boundary becomes ready"
            completes[p] = i
    return dict(ready=ready, fine=fine_steps, coarse=coarse_at, completes=completes, sizes=sizes)


def expected_plain_ticks(sizes: list[int], iters: int) -> int:
    blocks = len(sizes)
    return blocks + sum(max(sizes[p:]) + blocks - p - 1 for p in range(iters))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 60), data=st.data(), pipelined=st.booleans())
def test_plan_invariants(n, data, pipelined):
    blocks = data.draw(st.integers(1, n), label="blocks")
    max_iters = data.draw(st.one_of(st.none(), st.integers(0, blocks + 3)), label="max_iters")
    plan = build_tick_plan(n, blocks, max_iters, pipelined)
    iters = blocks if max_iters is None else min(max_iters, blocks)
    assert plan.max_iters == iters and plan.num_blocks == blocks and plan.pipelined == pipelined
    sim = simulate(plan)
    sizes = sim["sizes"]
    # every fine segment F(p, b), b >= p, p < iters, runs exactly its block's steps (consecutive ticks checked above)
    assert set(sim["fine"]) == {(p, b) for p in range(iters) for b in range(p, blocks)}
    for (p, b), steps in sim["fine"].items():
        assert [s for _, s in steps] == list(range(sizes[b]))
    # every coarse step G(p, b), b >= p, p <= iters, exactly once
    assert sim["coarse"] == {(p, b): sim["coarse"][(p, b)] for p in range(iters + 1) for b in range(p, blocks)}
    assert all(len(v) == 1 for v in sim["coarse"].values())
    # every boundary U[p][b] needed is ready exactly once (duplicates asserted in simulate)
    needed = {(p, b) for p in range(iters + 1) for b in range(max(p, 1), blocks + 1)} | {(p, 0) for p in range(iters + 1)}
    assert set(sim["ready"]) == needed
    # iterations complete in increasing order; the last tick completes the last iteration
    order = sorted(sim["completes"], key=lambda p: (sim["completes"][p], p))
    assert order == list(range(iters + 1))
    assert [sim["completes"][p] for p in order] == sorted(sim["completes"].values())
    assert sim["completes"][iters] == len(plan.ticks) - 1
    for p in range(iters + 1):
        assert plan.ticks_until(p) == sim["completes"][p] + 1
    with pytest.raises(ValueError):
        plan.ticks_until(iters + 1)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_cost_formulas(n, data):
    blocks = data.draw(st.integers(1, n), label="blocks")
    k = data.draw(st.integers(0, blocks), label="max_iters")
    plain = build_tick_plan(n, blocks, k, pipelined=False)
    piped = build_tick_plan(n, blocks, k, pipelined=True)
    sizes = [plain.block_size(b) for b in range(blocks)]
    # plain: the coarse sweep, then per iteration its longest live segment plus the correction sweep
    assert len(plain.ticks) == expected_plain_ticks(sizes, k)
    # pipelined never worse than plain, at every iteration; never worse than the serial sampler at k = B
    for p in range(k + 1):
        assert piped.ticks_until(p) <= plain.ticks_until(p)
    assert len(piped.ticks) <= len(plain.ticks)
    assert len(build_tick_plan(n, blocks, None, pipelined=True).ticks) <= n
    # fewer rows would be lost work: both schedules evaluate the same rows
    assert sum(t.rows for t in plain.ticks) == sum(t.rows for t in piped.ticks)
    # ASAP: iteration p's completion does not depend on how many later iterations are planned
    for p in range(k + 1):
        assert piped.ticks_until(p) == build_tick_plan(n, blocks, p, pipelined=True).ticks_until(p)


@pytest.mark.parametrize("root", range(1, 11))
def test_design_cost_formulas_for_square_grids(root):
    """N = n^2, B = n: pipelined takes exactly (k+1)n - k calls (= N at k = B), plain at most (2k+1)n."""
    n = root
    for k in range(n + 1):
        piped = build_tick_plan(n * n, n, k, pipelined=True)
        plain = build_tick_plan(n * n, n, k, pipelined=False)
        assert len(piped.ticks) == (k + 1) * n - k
        assert len(plain.ticks) <= (2 * k + 1) * n
        if n >= 3 and k >= 2:
            assert len(piped.ticks) < len(plain.ticks)
    assert len(build_tick_plan(n * n, n, pipelined=True).ticks) == n * n


@pytest.mark.parametrize("n, blocks", [(12, 3), (12, 4), (30, 5), (50, 10), (60, 6)])
def test_pipelined_full_run_takes_exactly_n_calls_when_blocks_divide_n(n, blocks):
    assert len(build_tick_plan(n, blocks, pipelined=True).ticks) == n


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_plain_fine_ticks_shrink(n, data):
    """Plain mode: iteration p's fine ticks hold exactly the segments b >= p with a step left; no coarse rows."""
    blocks = data.draw(st.integers(1, n))
    plan = build_tick_plan(n, blocks)
    sizes = [plan.block_size(b) for b in range(blocks)]
    fine_ticks = [t for t in plan.ticks if t.fine]
    assert all(not t.coarse for t in fine_ticks)
    assert all(len(t.coarse) == 1 and not t.fine for t in plan.ticks if not t.fine)
    i = 0
    for p in range(blocks):
        for j in range(max(sizes[p:])):
            assert fine_ticks[i].fine == tuple(FineRow(p, b, j) for b in range(p, blocks) if j < sizes[b])
            i += 1
    assert i == len(fine_ticks)
