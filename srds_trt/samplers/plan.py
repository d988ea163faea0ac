"""The SRDS work plan: block partition and the ticks of batched model calls, as pure data.

Notation (DESIGN.md): N solver steps are cut into B blocks; block b covers steps [bounds[b], bounds[b+1]).
U[p][b] is the state at block boundary b after Parareal iteration p (U[p][0] = x_T for every p).

    G(p, b)   coarse: one solver step from U[p][b] over the whole block b
    F(p, b)   fine segment: the block's own steps from U[p][b]; one model row per tick
    U[0][b+1] = G(0, b)
    U[p][p]   = F(p-1, p-1)                         (exact: the first p boundaries never change again)
    U[p][b+1] = G(p, b) + F(p-1, b) - G(p-1, b)      for b >= p

Everything except convergence is known before the first model call, so the whole plan is computed up front
for `max_iters` iterations and executors (the pure-torch reference in sampling.py, the CUDA-stream runtime)
only walk it; they stop early when an iteration's residual says so.

A tick is ONE batched model call. The plain schedule runs iteration by iteration (coarse sweep, then all fine
segments together). The pipelined schedule starts every segment and every coarse step at the first tick after
its input exists, so segments of several iterations share a call: continuous batching over segments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


# Parareal iterations the stopping rule typically accepts at tol 1e-2..1e-3 (benchmarks/stopping.py table).
EXPECTED_ITERATIONS = 3


def pipelined_calls(num_steps: int, num_blocks: int, iterations: int) -> int:
    """Sequential calls until iteration k completes in the pipelined plan: (B - k) + k * N / B, exactly

    (B - k) + the sum of the k LONGEST blocks: the critical path to U[k][B] takes k fine segments and B - k coarse
    steps, and any k blocks can carry the segments. So equal blocks are optimal: shorter later blocks never pay.
    (tests/test_schedule.py checks this against build_tick_plan.)
    """
    k = min(iterations, num_blocks)
    bounds = block_bounds(num_steps, num_blocks)
    longest = sorted((bounds[b + 1] - bounds[b] for b in range(num_blocks)), reverse=True)
    return num_blocks - k + sum(longest[:k])


def default_num_blocks(num_steps: int, iterations: int = EXPECTED_ITERATIONS) -> int:
    """The B minimising the pipelined critical path for `iterations` Parareal iterations: ~ sqrt(k * N).

    round(sqrt(N)) is optimal for k = 1 only; at the k = 3 the rule typically needs, N = 1024: B = 55 completes
    iteration 3 after 109 calls where B = 32 needs 125 (and iteration 2 after 91 vs 94).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    guess = max(1, min(num_steps, round(math.sqrt(iterations * num_steps))))
    # The cost is flat near its minimum and jagged (integer block sizes): search around the continuous optimum.
    candidates = range(max(1, guess // 2), min(num_steps, 2 * guess) + 1)
    return min(candidates, key=lambda b: (pipelined_calls(num_steps, b, iterations), b))


def block_bounds(num_steps: int, num_blocks: int | None = None) -> tuple[int, ...]:
    """Step indices 0 = s_0 < s_1 < ... < s_B = N; block sizes differ by at most one (longer blocks first)."""
    blocks = default_num_blocks(num_steps) if num_blocks is None else num_blocks
    if not 1 <= blocks <= num_steps:
        raise ValueError(f"num_blocks must be in [1, num_steps={num_steps}], got {blocks}")
    base, extra = divmod(num_steps, blocks)
    bounds = [0]
    for b in range(blocks):
        bounds.append(bounds[-1] + base + (1 if b < extra else 0))
    return tuple(bounds)


@dataclass(frozen=True)
class FineRow:
    """Step `step` (0-based, within the block) of fine segment F(iteration, block)."""

    iteration: int
    block: int
    step: int


@dataclass(frozen=True)
class CoarseRow:
    """Coarse step G(iteration, block)."""

    iteration: int
    block: int


@dataclass(frozen=True)
class Tick:
    """One batched model call and what becomes available after it.

    ready: boundaries (p, b) whose state U[p][b] can be formed after this call.
    completes: iterations whose last boundary U[p][B] becomes ready here (residual check points).
    """

    fine: tuple[FineRow, ...]
    coarse: tuple[CoarseRow, ...]
    ready: tuple[tuple[int, int], ...]
    completes: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.fine) + len(self.coarse)


@dataclass(frozen=True)
class Plan:
    bounds: tuple[int, ...]
    max_iters: int
    pipelined: bool
    ticks: tuple[Tick, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.bounds) - 1

    def block_size(self, b: int) -> int:
        return self.bounds[b + 1] - self.bounds[b]

    def ticks_until(self, iteration: int) -> int:
        """Number of ticks (sequential model calls) until `iteration` completes."""
        for i, tick in enumerate(self.ticks):
            if iteration in tick.completes:
                return i + 1
        raise ValueError(f"iteration {iteration} is not in this plan (max_iters={self.max_iters})")


def build_tick_plan(num_steps: int, num_blocks: int | None = None, max_iters: int | None = None, pipelined: bool = False) -> Plan:
    bounds = block_bounds(num_steps, num_blocks)
    blocks = len(bounds) - 1
    iters = blocks if max_iters is None else max_iters
    if iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    # After B iterations every boundary is exact: more would recompute the serial sample.
    iters = min(iters, blocks)
    sizes = [bounds[b + 1] - bounds[b] for b in range(blocks)]
    build = _pipelined_ticks if pipelined else _plain_ticks
    return Plan(bounds=bounds, max_iters=iters, pipelined=pipelined, ticks=tuple(build(sizes, iters)))


def _plain_ticks(sizes: list[int], iters: int) -> list[Tick]:
    blocks = len(sizes)
    ticks: list[Tick] = []
    # Iteration 0: the coarse sweep, one boundary per call.
    for b in range(blocks):
        ticks.append(Tick(fine=(), coarse=(CoarseRow(0, b),), ready=((0, b + 1),), completes=(0,) if b == blocks - 1 else ()))
    for p in range(iters):  # builds iteration p + 1
        segments = range(p, blocks)
        longest = max(sizes[b] for b in segments)
        for j in range(longest):
            fine = tuple(FineRow(p, b, j) for b in segments if j < sizes[b])
            last = j == longest - 1
            # U[p+1][p+1] = F(p, p) exactly; the rest waits for the coarse sweep below.
            ready = ((p + 1, p + 1),) if last else ()
            completes = (p + 1,) if last and p + 1 == blocks else ()
            ticks.append(Tick(fine=fine, coarse=(), ready=ready, completes=completes))
        for b in range(p + 1, blocks):
            ticks.append(
                Tick(fine=(), coarse=(CoarseRow(p + 1, b),), ready=((p + 1, b + 1),), completes=(p + 1,) if b == blocks - 1 else ())
            )
    return ticks


def _pipelined_ticks(sizes: list[int], iters: int) -> list[Tick]:
    """As-soon-as-possible list schedule. ready_at[(p, b)] = index of the tick after which U[p][b] exists (-1: before any)."""
    blocks = len(sizes)
    ready_at: dict[tuple[int, int], int] = {(p, 0): -1 for p in range(iters + 1)}
    fine_done: dict[tuple[int, int], int] = {}
    rows: dict[int, tuple[list[FineRow], list[CoarseRow], list[tuple[int, int]]]] = {}

    def at(tick: int) -> tuple[list[FineRow], list[CoarseRow], list[tuple[int, int]]]:
        return rows.setdefault(tick, ([], [], []))

    # Boundaries of iteration p depend only on iterations p and p - 1, so iterate p outer, b inner.
    for p in range(iters + 1):
        if p >= 1:
            ready_at[(p, p)] = fine_done[(p - 1, p - 1)]
            at(ready_at[(p, p)])[2].append((p, p))
        for b in range(p, blocks):
            start = ready_at[(p, b)] + 1
            at(start)[1].append(CoarseRow(p, b))
            if p < iters:  # the last iteration's segments would only feed an iteration we never build
                for j in range(sizes[b]):
                    at(start + j)[0].append(FineRow(p, b, j))
                fine_done[(p, b)] = start + sizes[b] - 1
            # U[p][b+1] needs G(p, b) and, from iteration 1 on, F(p-1, b).
            done = start if p == 0 else max(start, fine_done[(p - 1, b)])
            ready_at[(p, b + 1)] = done
            at(done)[2].append((p, b + 1))
    last = max(rows) + 1
    completes_at: dict[int, list[int]] = {}
    for p in range(iters + 1):
        completes_at.setdefault(ready_at[(p, blocks)], []).append(p)
    ticks = []
    for i in range(last):
        fine, coarse, ready = rows.get(i, ([], [], []))
        ticks.append(
            Tick(
                fine=tuple(sorted(fine, key=lambda r: (r.iteration, r.block))),
                coarse=tuple(coarse),
                ready=tuple(ready),
                completes=tuple(completes_at.get(i, ())),
            )
        )
    return ticks
