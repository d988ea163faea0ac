"""`--sampler auto`: pick the sampler and its width with the lowest expected latency on THIS engine and device.

A pure function of (N, images, guidance, the engine's latency-per-rows curve, world size): no model, no device.

The full design note (what was measured, why these choices): docs/autotune.md, section "Module notes: srds_trt/autotune/pricing.py".
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..samplers.plan import build_tick_plan, default_num_blocks
from ..samplers.stopping import DEFAULT_TOL, check_tol

LatencyCurve = Callable[[int], float] | Mapping[int, float]

CANDIDATES = ("serial", "srds", "paradigms", "eps-picard")  # every sampler auto prices (sampling.SAMPLERS' names)
# The options a candidate of each sampler carries: keyword arguments of that sampler in sampling.SAMPLERS and of
# SRDSPipeline.__call__ (tests/test_autotune.py checks both signatures), so a Choice's options apply as they are.
OPTIONS = {"serial": (), "srds": ("num_blocks", "pipelined"), "paradigms": ("window",), "eps-picard": ("window",)}

# Expected work per sampler (module doc). Sliding windows: sweeps = a * N / w + b at the tol the registry runs them at,
# the upper-quartile fits of benchmarks/results/expected-sweeps/tol1e-*.json (registry samplers at tol 1e-2,
# 1e-3 (the default), 1e-4; e.g. eps-Picard w = 2 round(sqrt N) at 1e-3: digits N = 100, 196, 1024 -> 19, 23, 40
# sweeps, mixtures at N = 1024 -> 25-30 (with its prior slope and its own acceptance calibration; 19, 24, 43 and
# 28-32 before, -27*.json); ParaDiGMS w = 2 round(sqrt N): digits 23, 31, 58, mixtures at N = 1024 52-65).
# tol -> (a, b); expected_sweeps interpolates in log10(tol).
WINDOW_SWEEPS = {
    "paradigms": {1e-2: (2.3, 15.2), 1e-3: (2.65, 17.2), 1e-4: (3.0, 18.0)},
    "eps-picard": {1e-2: (0.95, 11.3), 1e-3: (1.11, 13.5), 1e-4: (1.39, 14.1)},
}
# SRDS: Parareal iterations its stopping rule runs (pipelined), tol -> upper quartile over the 150 pipelined runs of
# benchmarks/results/stopping (full.json + batched.json: mixtures and digits with and without CFG,
# N = 25..1024, 8..54 blocks, 1..256 images; 75 runs per tol): 5 at 1e-2 (median 4, max 9), 6 at 1e-3 (median 5,
# max 10). They barely depend on N or the block count (N = 1024, 54 blocks: median 3-4), so they are counts, not a
# fraction of the blocks: the fraction 0.5 used before priced N = 1024 with 54 blocks at 27 iterations where the rule
# ran 2-9. expected_srds_iterations interpolates in log10(tol), one more per decade tighter than 1e-3 (unmeasured).
SRDS_ITERATIONS = {1e-2: 5, 1e-3: 6}
# A sweep's update program besides the engine call on a GPU, ms = fixed + per_point * w: measured on an H100
# (benchmarks/results/gpu-samplers/h100-sd2.json and h100.json, digits, CUDA graphs, the one host read
# per sweep included): ParaDiGMS 0.21-0.39 ms whatever w; eps-Picard with its chains fused (runtime/fused.py, the
# default where Triton imports) 0.5-0.6 ms whatever w; with the torch loops 0.83 (w = 20), 0.84 (28), 1.36 ms (64).
# Applied where the engine runs on a GPU (SRDSPipeline passes it); on a CPU the reference path's own overhead is in
# its measured wall clock.
GPU_SWEEP_OVERHEAD_MS = {"paradigms": (0.25, 0.0), "eps-picard": (0.55, 0.0)}
OBSERVED_RUNS = 8  # chunks of past runs a pipeline remembers per candidate and settings (module doc)


def observed_iterations(history: list[int]) -> int:
    """What a candidate's past runs say it needs: the upper quartile of its last OBSERVED_RUNS chunks (the slow
    side, as the tables are fitted), their maximum while fewer than 4."""
    recent = sorted(history[-OBSERVED_RUNS:])
    if not recent:
        raise ValueError("no observed runs")
    return recent[-1] if len(recent) < 4 else recent[math.ceil(0.75 * len(recent)) - 1]


def expected_srds_iterations(blocks: int, tol: float = DEFAULT_TOL) -> int:
    """Parareal iterations pipelined SRDS is expected to run at `tol` (SRDS_ITERATIONS), at most its block count
    (exact there). Looser than 1e-2 held at 1e-2's count; tighter than 1e-3 one more per decade; tol = 0 runs to
    the exact sample: `blocks` iterations."""
    if check_tol(tol) == 0:
        return blocks
    (lo, n_lo), (hi, n_hi) = sorted(SRDS_ITERATIONS.items())  # 1e-3, 1e-2
    slope = (n_lo - n_hi) / (math.log10(hi) - math.log10(lo))  # iterations per decade tighter
    iters = n_hi + slope * (math.log10(hi) - math.log10(min(tol, hi)))
    return max(1, min(blocks, math.ceil(iters - 1e-9)))


def expected_sweeps(sampler: str, steps: int, window: int, tol: float = DEFAULT_TOL) -> int:
    """Sweeps a sliding-window sampler is expected to need at `tol` (WINDOW_SWEEPS' affine fits), at most N (one
    point per sweep). Between the measured tols (a, b) is linear in log10(tol); tighter than the tightest it is
    extrapolated along the last segment (sweeps keep growing per decade); looser than the loosest it is held: the
    registry runs every tol >= 1e-2 at the same capped per-point threshold (stopping.window_accept_tol; eps-Picard's
    cap binds from 1.5e-2: between 1e-2 and 1.5e-2 it is priced slightly high), so their sweeps are the same.
    tol = 0 slides only past unchanged points: priced as N sweeps."""
    if check_tol(tol) == 0:
        return steps
    table = WINDOW_SWEEPS[sampler]
    tols = sorted(table)
    if tol >= tols[-1]:
        a, b = table[tols[-1]]
    else:
        lo = max([t for t in tols[:-1] if t <= tol], default=tols[0])
        hi = tols[tols.index(lo) + 1]
        u = (math.log10(tol) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        a, b = (x + u * (y - x) for x, y in zip(table[lo], table[hi]))
    return max(1, min(steps, math.ceil(a * steps / window + b)))


@dataclass(frozen=True)
class Candidate:
    sampler: str
    options: dict = field(default_factory=dict)
    sequential_calls: int = 0
    rows_per_call: int = 0  # the widest call's rows (before splitting over ranks)
    predicted_ms: float = 0.0
    iterations: int | None = None  # SRDS: Parareal iterations; windows: sweeps per chunk (None: serial)
    iterations_from: str = "expected"  # "expected" (the benchmark tables) or "observed" (this pipeline's runs)


def candidate_key(sampler: str, options: Mapping) -> tuple:
    """A candidate's identity in `observed` (choose): its sampler and options."""
    return (sampler, tuple(sorted(options.items())))


@dataclass(frozen=True)
class Choice:
    """What auto chose (sampler + options for sampling.SAMPLERS[sampler]) and every candidate's prediction."""

    sampler: str
    options: dict
    predicted_ms: float
    serial_ms: float
    candidates: tuple[Candidate, ...]
    fallback: str | None = None  # why the lowest-predicted candidate did not run (runnable_choice), else None

    @property
    def reason(self) -> str:
        ranked = sorted(self.candidates, key=lambda c: c.predicted_ms)
        text = ", ".join(f"{c.sampler}{_opts(c.options)} {c.predicted_ms:.1f} ms" for c in ranked[:4])
        head = f"{self.fallback}; " if self.fallback else ""
        return f"{head}lowest predicted latency: {text} (serial {self.serial_ms:.1f} ms)"

    def as_dict(self) -> dict:
        """For stats.json."""
        return {"sampler": self.sampler, "options": dict(self.options), "predicted_ms": self.predicted_ms,
                "serial_ms": self.serial_ms, "reason": self.reason, "fallback": self.fallback,
                "candidates": [{"sampler": c.sampler, "options": dict(c.options), "sequential_calls": c.sequential_calls,
                                "rows_per_call": c.rows_per_call, "predicted_ms": c.predicted_ms,
                                "iterations": c.iterations, "iterations_from": c.iterations_from}
                               for c in self.candidates]}


def _opts(options: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else ""


def interpolate_ms(curve: Mapping[int, float], rows: int) -> float:
    """ms of one call of `rows` rows from a measured {rows: ms} table (module doc: linear, flat below, last slope above)."""
    if not curve:
        raise ValueError("latency curve is empty")
    table = {int(k): float(v) for k, v in curve.items()}
    xs = sorted(table)
    if rows <= xs[0]:
        return table[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if rows <= hi:
            return table[lo] + (table[hi] - table[lo]) * (rows - lo) / (hi - lo)
    if len(xs) == 1:
        return table[xs[0]] * rows / xs[0]  # one point: assume throughput-bound beyond it
    lo, hi = xs[-2], xs[-1]
    return table[hi] + (table[hi] - table[lo]) / (hi - lo) * (rows - hi)


def tick_ms(latency: LatencyCurve, rows: int, world_size: int = 1, allgather_ms: float = 0.0) -> float:
    """One sequential call of `rows` rows split over `world_size` ranks (module doc)."""
    per_rank = math.ceil(rows / world_size)
    ms = latency(per_rank) if callable(latency) else interpolate_ms(latency, per_rank)
    return float(ms) + (allgather_ms if world_size > 1 else 0.0)


def window_widths(steps: int) -> tuple[int, ...]:
    n = max(1, round(math.sqrt(steps)))  # the equal-width rule: round(sqrt N) and 2 round(sqrt N)
    return tuple(sorted({min(n, steps), min(2 * n, steps)}))


def choose(
    *,
    steps: int,
    images: int = 1,
    guided: bool = True,
    latency_ms: LatencyCurve,
    world_size: int = 1,
    allgather_ms: float = 0.0,
    samplers: tuple[str, ...] = CANDIDATES,
    sweep_overhead_ms: Mapping[str, tuple[float, float]] | None = None,
    tol: float = DEFAULT_TOL,
    max_rows: int | None = None,
    rows_per_image: Callable[[str, dict], int] | None = None,
    observed: Mapping[tuple, int] | None = None,
) -> Choice:
    """The candidate with the lowest predicted latency (ties: serial). latency_ms: rows -> ms, or a {rows: ms} table.
    sweep_overhead_ms: sliding-window sampler -> (fixed, per window point) ms each sweep pays besides its engine
    call (GPU_SWEEP_OVERHEAD_MS on a GPU; None: nothing). tol: what the sampler will run at (sampling.py's meaning);
    it sets the sliding-window samplers' expected sweeps (expected_sweeps) and SRDS's expected iterations
    (expected_srds_iterations).
    max_rows: the pipeline runs the images in chunks whose widest call fits max_rows rows, one chunk after the
    other; each candidate is priced as those chunks (None: all images in one chunk). rows_per_image(sampler,
    options): the widest call's rows for ONE image as the pipeline sizes its chunks (default: this plan's own).
    observed: candidate_key(sampler, options) -> iterations (SRDS) or sweeps (windows) per chunk that runs of this
    model at these settings took; replaces the table's expectation for that candidate (SRDSPipeline keeps them)."""
    if steps < 1 or images < 1:
        raise ValueError(f"steps and images must be >= 1, got steps={steps}, images={images}")
    check_tol(tol)
    if world_size < 1 or not (allgather_ms >= 0 and math.isfinite(allgather_ms)):
        raise ValueError(f"world_size must be >= 1 and allgather_ms finite >= 0, got {world_size}, {allgather_ms}")
    unknown = set(samplers) - set(CANDIDATES)
    if unknown:
        raise ValueError(f"auto prices {', '.join(CANDIDATES)}; unknown: {', '.join(sorted(unknown))}")
    if "serial" not in samplers:
        raise ValueError("serial must be a candidate: auto is never slower than serial")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    per_point = 2 if guided else 1  # rows per trajectory point and image

    def iterations(sampler: str, options: dict, expected: int, most: int) -> tuple[int, str]:
        seen = (observed or {}).get(candidate_key(sampler, options))
        return (expected, "expected") if seen is None else (max(1, min(most, int(seen))), "observed")

    def candidate(sampler: str, options: dict, calls: list[int], per_call_ms: float = 0.0,
                  iters: tuple[int | None, str] = (None, "expected")) -> Candidate:
        """calls: trajectory points per sequential call of one chunk; per_call_ms: what each call pays besides the
        engine (a sweep's update program). Chunks run one after the other, each the whole plan."""
        widest = rows_per_image(sampler, options) if rows_per_image else max(calls) * per_point
        chunk = images if max_rows is None else max(1, min(images, max_rows // widest))
        full, rest = divmod(images, chunk)
        sizes = collections.Counter(calls)  # few distinct sizes: price each once

        def one_chunk(k: int) -> float:
            return sum(n * tick_ms(latency_ms, p * k * per_point, world_size, allgather_ms)
                       for p, n in sizes.items()) + len(calls) * per_call_ms

        ms = full * one_chunk(chunk) + (one_chunk(rest) if rest else 0.0)
        return Candidate(sampler, options, len(calls) * (full + (rest > 0)), max(calls) * chunk * per_point, ms, *iters)

    serial = candidate("serial", {}, [1] * steps)  # sharded like every call of a distributed job
    candidates = [serial]
    if "srds" in samplers and steps > 1:
        for blocks in sorted({max(1, round(math.sqrt(steps))), default_num_blocks(steps)}):
            options = {"num_blocks": blocks, "pipelined": True}
            iters = iterations("srds", options, expected_srds_iterations(blocks, tol), blocks)
            candidates.append(candidate("srds", options, list(_srds_points_per_call(steps, blocks, iters[0])),
                                        iters=iters))
    for name in ("paradigms", "eps-picard"):
        if name not in samplers:
            continue
        for w in window_widths(steps):
            sweeps = iterations(name, {"window": w}, expected_sweeps(name, steps, w, tol), steps)
            fixed, per_window_point = (sweep_overhead_ms or {}).get(name, (0.0, 0.0))
            candidates.append(candidate(name, {"window": w}, [w] * sweeps[0], fixed + per_window_point * w,
                                        iters=sweeps))
    best = min(candidates, key=lambda c: (c.predicted_ms, c.sampler != "serial"))
    return Choice(best.sampler, dict(best.options), best.predicted_ms, serial.predicted_ms, tuple(candidates))


@functools.lru_cache(maxsize=64)
def _srds_points_per_call(steps: int, blocks: int, iters: int) -> tuple[int, ...]:
    """Trajectory points in each sequential call of pipelined SRDS (its tick plan). Memoized: simulating the plan
    costs ~0.1 s at N = 1024 and auto prices it on every call (measured on an H100 host: 0.2-0.5 s per auto call
    before the cache, more than the sampling itself)."""
    plan = build_tick_plan(steps, blocks, iters, pipelined=True)
    return tuple(len(t.fine) + len(t.coarse) for t in plan.ticks)


def runnable_choice(choice: Choice, why_not: Callable[[Candidate], str | None]) -> Choice:
    """`choice` restricted to the candidates that can run: why_not(candidate) says why one cannot (None: it can).

    Every candidate keeps its prediction (stats show them all); the choice becomes the lowest-predicted runnable
    one and `fallback` names what was skipped. Serial always runs, so there is always one.
    """
    best = next(c for c in choice.candidates if c.sampler == choice.sampler and c.options == choice.options)
    blocked = why_not(best)
    if blocked is None:
        return choice
    runnable = [c for c in choice.candidates if c.sampler == "serial" or why_not(c) is None]
    pick = min(runnable, key=lambda c: (c.predicted_ms, c.sampler != "serial"))
    note = (f"{best.sampler}{_opts(best.options)} ({best.predicted_ms:.1f} ms) cannot run here: {blocked}; "
            f"ran the best runnable candidate {pick.sampler}{_opts(pick.options)}")
    return Choice(pick.sampler, dict(pick.options), pick.predicted_ms, choice.serial_ms, choice.candidates, note)


def widest_rows(*, steps: int, images: int = 1, guided: bool = True, samplers: tuple[str, ...] = CANDIDATES) -> int:
    """The most rows any candidate puts in one call (before splitting over ranks): what a curve must cover."""
    flat = choose(steps=steps, images=images, guided=guided, latency_ms=lambda rows: 1.0, samplers=samplers)
    return max(c.rows_per_call for c in flat.candidates)
