"""--sampler auto (srds_trt.autotune.pricing): serial where latency grows with rows, parallel where calls are flat,
never predicted slower than serial, multi-GPU tick cost = latency(ceil(R / K)) + all-gather."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from srds_trt.autotune import pricing as autotune
from srds_trt.samplers import SAMPLERS

H200_DIGITS = {1: 0.87, 2: 0.92, 8: 0.91, 16: 0.95, 32: 1.23, 64: 1.39, 128: 1.74}  # DESIGN.md, CUDA graphs
H200_SD2 = {1: 9.2, 2: 11.5, 4: 15.8, 8: 25.3, 16: 45.0, 32: 86.3}


@pytest.mark.parametrize("steps", [10, 100, 196, 1024])
def test_throughput_bound_device_is_serial(steps):
    choice = autotune.choose(steps=steps, latency_ms=lambda rows: 3.0 * rows)  # CPU: linear in rows
    assert choice.sampler == "serial" and choice.options == {}
    assert choice.predicted_ms == choice.serial_ms == steps * 3.0 * 2


def test_flat_curve_picks_a_parallel_sampler_and_says_why():
    choice = autotune.choose(steps=196, latency_ms=H200_DIGITS)
    assert choice.sampler != "serial" and choice.sampler in SAMPLERS
    assert choice.predicted_ms < 0.5 * choice.serial_ms
    assert {c.sampler for c in choice.candidates} == {"serial", "srds", "paradigms", "eps-picard"}
    assert choice.predicted_ms == min(c.predicted_ms for c in choice.candidates)
    record = choice.as_dict()
    assert record["sampler"] == choice.sampler and len(record["candidates"]) == len(choice.candidates)
    assert choice.sampler in choice.reason
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.sampler = "serial"


def test_sd2_on_one_gpu_follows_the_curve():
    # rows cost nearly linearly above 8 rows: at N=100 every parallel candidate prices above serial
    assert autotune.choose(steps=100, latency_ms=H200_SD2).sampler == "serial"


def test_never_predicted_slower_than_serial_on_random_curves():
    rng = random.Random(0)
    for _ in range(30):
        table, ms = {}, rng.uniform(0.5, 20)
        for rows in (1, 2, 4, 8, 16, 32, 64, 128):
            ms += rng.uniform(0, 10)
            table[rows] = ms
        choice = autotune.choose(steps=rng.choice([20, 50, 196]), images=rng.choice([1, 2]), latency_ms=table,
                                 world_size=rng.choice([1, 2, 4]), allgather_ms=rng.uniform(0, 2))
        assert choice.predicted_ms <= choice.serial_ms


def test_multi_gpu_tick_cost():
    calls = []

    def latency(rows):
        calls.append(rows)
        return 10.0

    assert autotune.tick_ms(latency, 13, world_size=4, allgather_ms=0.5) == 10.5
    assert calls == [4]  # ceil(13 / 4) rows per rank
    assert autotune.tick_ms(latency, 13, world_size=1, allgather_ms=0.5) == 10.0  # one rank: no all-gather
    # more ranks make wide calls cheaper on a throughput-bound curve: parallel samplers become worth it
    linear = {1: 1.0, 128: 128.0}
    assert autotune.choose(steps=196, latency_ms=linear).sampler == "serial"
    assert autotune.choose(steps=196, latency_ms=linear, world_size=64, allgather_ms=0.01).sampler != "serial"


def test_interpolation_and_bad_inputs():
    assert autotune.interpolate_ms({2: 2.0, 4: 6.0}, 3) == 4.0
    assert autotune.interpolate_ms({2: 2.0, 4: 6.0}, 1) == 2.0
    assert autotune.interpolate_ms({2: 2.0, 4: 6.0}, 6) == 10.0
    with pytest.raises(ValueError):
        autotune.choose(steps=0, latency_ms=H200_SD2)
    with pytest.raises(ValueError):
        autotune.choose(steps=10, latency_ms=H200_SD2, world_size=0)
    with pytest.raises(ValueError):
        autotune.choose(steps=10, latency_ms=H200_SD2, samplers=("srds",))


def test_options_are_exactly_what_the_samplers_and_the_pipeline_accept():
    import inspect

    from srds_trt import SRDSPipeline
    from srds_trt.samplers.eps_picard import eps_picard_sample
    from srds_trt.samplers.paradigms import paradigms_sample

    functions = {"serial": SAMPLERS["serial"], "srds": SAMPLERS["srds"], "paradigms": paradigms_sample,
                 "eps-picard": eps_picard_sample}  # SAMPLERS' entries for the last two are lazy-import wrappers
    call = inspect.signature(SRDSPipeline.iter_chunks).parameters  # __call__ passes its keywords on
    choice = autotune.choose(steps=196, latency_ms=H200_DIGITS)
    assert {c.sampler for c in choice.candidates} == set(autotune.CANDIDATES) == set(autotune.OPTIONS)
    for c in choice.candidates:
        assert set(c.options) == set(autotune.OPTIONS[c.sampler]), c
        accepted = inspect.signature(functions[c.sampler]).parameters
        assert set(c.options) <= set(accepted) and set(c.options) <= set(call), c
    with pytest.raises(ValueError, match="unknown"):
        autotune.choose(steps=10, latency_ms=H200_SD2, samplers=("serial", "ddpm"))


def test_runnable_choice_falls_back_to_the_best_runnable_candidate_and_says_why():
    choice = autotune.choose(steps=196, latency_ms=H200_DIGITS)
    assert choice.sampler != "srds"
    kept = autotune.runnable_choice(choice, lambda c: None)
    assert kept is choice and kept.fallback is None and kept.as_dict()["fallback"] is None
    only_srds = autotune.runnable_choice(choice, lambda c: None if c.sampler in ("serial", "srds") else "not here")
    srds = [c for c in choice.candidates if c.sampler == "srds"]
    best = min(srds, key=lambda c: c.predicted_ms)
    assert (only_srds.sampler, only_srds.options, only_srds.predicted_ms) == ("srds", best.options, best.predicted_ms)
    assert only_srds.candidates == choice.candidates  # every prediction is still reported
    assert choice.sampler in only_srds.fallback and "not here" in only_srds.fallback
    assert only_srds.fallback in only_srds.reason and only_srds.as_dict()["fallback"] == only_srds.fallback
    nothing = autotune.runnable_choice(choice, lambda c: "never")  # serial always runs
    assert nothing.sampler == "serial" and nothing.predicted_ms == choice.serial_ms


def test_world_size_changes_the_prediction_of_every_candidate():
    one = autotune.choose(steps=100, latency_ms=H200_SD2)
    two = autotune.choose(steps=100, latency_ms=H200_SD2, world_size=2, allgather_ms=0.3)
    # serial is sharded like every call of a distributed job: its 2 guidance rows, one per rank, plus the all-gather
    assert one.serial_ms == 100 * 11.5 and two.serial_ms == pytest.approx(100 * (9.2 + 0.3))
    for a, b in zip(one.candidates, two.candidates):
        assert (a.sampler, a.options) == (b.sampler, b.options)
        assert b.predicted_ms < a.predicted_ms  # half the rows per rank on a curve that grows with rows
    # where sharded serial wins, auto must see it: SD2 N = 25 on 4 GPUs (a one-device serial would lose to eps-Picard)
    four = autotune.choose(steps=25, latency_ms=H200_SD2, world_size=4, allgather_ms=0.1,
                           sweep_overhead_ms=autotune.GPU_SWEEP_OVERHEAD_MS)
    assert four.sampler == "serial" and four.serial_ms == pytest.approx(25 * 9.3)


def test_widest_rows_covers_every_candidate():
    for steps, images, guided in ((16, 1, True), (196, 2, False), (1024, 1, True)):
        widest = autotune.widest_rows(steps=steps, images=images, guided=guided)
        choice = autotune.choose(steps=steps, images=images, guided=guided, latency_ms=H200_DIGITS)
        assert widest == max(c.rows_per_call for c in choice.candidates)


def test_sweep_overhead_is_priced_per_sweep_and_can_flip_the_choice():
    flat = {1: 1.0, 1024: 1.0}
    plain = autotune.choose(steps=1024, images=1, guided=True, latency_ms=flat)
    costly = autotune.choose(steps=1024, images=1, guided=True, latency_ms=flat,
                             sweep_overhead_ms={"eps-picard": (2.0, 0.01), "paradigms": (0.1, 0.0)})
    for before, after in zip(plain.candidates, costly.candidates):
        assert before.sequential_calls == after.sequential_calls
        fixed, per_point = {"eps-picard": (2.0, 0.01), "paradigms": (0.1, 0.0)}.get(before.sampler, (0.0, 0.0))
        w = before.options.get("window", 0)
        assert after.predicted_ms == pytest.approx(before.predicted_ms + before.sequential_calls * (fixed + per_point * w))
    assert plain.sampler == "eps-picard" and costly.sampler == "paradigms"
    assert set(autotune.GPU_SWEEP_OVERHEAD_MS) == {"eps-picard", "paradigms"}


@pytest.mark.parametrize("sampler", ["paradigms", "eps-picard"])
def test_expected_sweeps_price_the_asked_tol(sampler):
    """Fitted at 1e-2, 1e-3, 1e-4 (WINDOW_SWEEPS): exact there, log-interpolated between, held above 1e-2 (the
    registry caps the per-point threshold), extrapolated below 1e-4, N at tol = 0; tighter never cheaper."""
    for steps in (100, 196, 1024):
        for w in autotune.window_widths(steps):
            for tol, (a, b) in autotune.WINDOW_SWEEPS[sampler].items():
                assert autotune.expected_sweeps(sampler, steps, w, tol) == min(steps, math.ceil(a * steps / w + b))
            assert autotune.expected_sweeps(sampler, steps, w) == autotune.expected_sweeps(sampler, steps, w, 1e-3)
            grid = [1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.1, 1.0]
            sweeps = [autotune.expected_sweeps(sampler, steps, w, tol) for tol in grid]
            assert sweeps == sorted(sweeps, reverse=True), (steps, w, sweeps)
            assert sweeps[-1] == sweeps[-2] == sweeps[-3]  # held above 1e-2
            assert sweeps[0] > sweeps[2] or sweeps[0] == steps  # extrapolated below 1e-4
            assert autotune.expected_sweeps(sampler, steps, w, 0.0) == steps
    assert autotune.expected_sweeps(sampler, 1024, 64, 1e-4) > autotune.expected_sweeps(sampler, 1024, 64, 1e-2)


def test_choose_prices_the_asked_tol():
    flat = {1: 1.0, 1024: 1.0}
    by_tol = {tol: autotune.choose(steps=1024, latency_ms=flat, tol=tol) for tol in (1e-2, 1e-3, 1e-4)}
    assert autotune.choose(steps=1024, latency_ms=flat) == by_tol[1e-3]
    parallel = lambda choice: [c.sequential_calls for c in choice.candidates if c.sampler != "serial"]  # noqa: E731
    loose, default, tight = (parallel(by_tol[t]) for t in (1e-2, 1e-3, 1e-4))
    assert all(a < b < c for a, b, c in zip(loose, default, tight))  # every parallel candidate, SRDS included
    serial = lambda choice: [c for c in choice.candidates if c.sampler == "serial"]  # noqa: E731
    assert serial(by_tol[1e-2]) == serial(by_tol[1e-4])  # serial does not depend on it
    with pytest.raises(ValueError, match="tol"):
        autotune.choose(steps=100, latency_ms=flat, tol=-1.0, samplers=("serial",))  # checked up front


def test_srds_priced_at_the_iterations_its_rule_runs():
    """SRDS's expected iterations are what its stopping rule ran on the committed stopping benchmark (upper
    quartile per tol), a count, not a fraction of the blocks, and the candidate's calls are its tick plan's."""
    import json
    from pathlib import Path

    from srds_trt.samplers.plan import pipelined_calls

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "stopping"
    runs = [r for name in ("full.json", "batched.json") for r in json.loads((root / name).read_text()) if r["pipelined"]]
    for tol, expected in autotune.SRDS_ITERATIONS.items():
        iters = sorted(r["rule_iters"] for r in runs if r["tol"] == tol)
        assert len(iters) == 75 and iters[math.ceil(0.75 * len(iters)) - 1] == expected
        assert autotune.expected_srds_iterations(54, tol) == autotune.expected_srds_iterations(17, tol) == expected
    e = autotune.expected_srds_iterations
    assert e(54, 0.1) == e(54, 1e-2) < e(54, 3e-3) == e(54, 1e-3) < e(54, 1e-4) < e(54, 1e-5)
    assert e(3, 1e-3) == 3 and e(54, 0.0) == 54  # never past exact; tol = 0 runs every iteration
    for tol in (1e-2, 1e-4):
        choice = autotune.choose(steps=1024, latency_ms=H200_DIGITS, tol=tol)
        for c in (c for c in choice.candidates if c.sampler == "srds"):
            blocks = c.options["num_blocks"]
            assert c.sequential_calls == pipelined_calls(1024, blocks, e(blocks, tol))


def test_images_are_priced_in_the_chunks_the_pipeline_runs():
    """max_rows: the pipeline runs images in chunks whose widest call fits, one chunk after the other; each candidate
    is priced as those chunks (a throughput-bound curve makes chunking free, a flat one makes it cost per chunk)."""
    flat = {1: 1.0, 4096: 1.0}
    one = autotune.choose(steps=100, images=1, latency_ms=flat)
    many = autotune.choose(steps=100, images=10, latency_ms=flat, max_rows=100)
    whole = autotune.choose(steps=100, images=10, latency_ms=flat)  # no max_rows: one chunk
    for a, b, c in zip(one.candidates, many.candidates, whole.candidates):
        per_image = a.rows_per_call  # one image's widest call
        chunk = max(1, min(10, 100 // per_image))
        chunks = math.ceil(10 / chunk)
        assert b.sequential_calls == a.sequential_calls * chunks and b.predicted_ms == pytest.approx(a.predicted_ms * chunks)
        assert b.rows_per_call == per_image * chunk <= max(100, per_image)
        assert c.sequential_calls == a.sequential_calls and c.predicted_ms == a.predicted_ms  # flat: 10 images cost 1
    # the pipeline's own sizing wins over the plan's widest call (e.g. SRDS sized for every iteration)
    sized = autotune.choose(steps=100, images=10, latency_ms=flat, max_rows=100, rows_per_image=lambda s, o: 100)
    assert all(c.sequential_calls == a.sequential_calls * 10 for a, c in zip(one.candidates, sized.candidates))
    linear = autotune.choose(steps=100, images=10, latency_ms=lambda rows: float(rows), max_rows=100)
    assert linear.serial_ms == 100 * 20.0  # 10 images x 2 rows in one chunk of 20 rows: chunking changes nothing here
    with pytest.raises(ValueError, match="max_rows"):
        autotune.choose(steps=10, latency_ms=flat, max_rows=0)


def test_observed_iterations_replace_the_expectation_of_that_candidate_only():
    flat = {1: 1.0, 4096: 1.0}
    table = autotune.choose(steps=196, latency_ms=flat)
    key = autotune.candidate_key("eps-picard", {"window": 28})
    learned = autotune.choose(steps=196, latency_ms=flat, observed={key: 40,
                                                                   autotune.candidate_key("srds", {"num_blocks": 14, "pipelined": True}): 99})
    for a, b in zip(table.candidates, learned.candidates):
        if (b.sampler, b.options) == ("eps-picard", {"window": 28}):
            assert (b.iterations, b.iterations_from, b.sequential_calls) == (40, "observed", 40)
        elif (b.sampler, b.options) == ("srds", {"num_blocks": 14, "pipelined": True}):
            assert (b.iterations, b.iterations_from) == (14, "observed")  # clamped to its blocks: exact there
        else:
            assert b == a and b.iterations_from == "expected"
    assert table.options == {"window": 28} and learned.options != {"window": 28}  # a harder model: choice moves
    record = learned.as_dict()["candidates"]
    assert {c["iterations_from"] for c in record} == {"expected", "observed"}
    assert autotune.observed_iterations([5]) == 5 and autotune.observed_iterations([3, 9, 4]) == 9  # few: the max
    assert autotune.observed_iterations([1, 2, 3, 4, 5, 6, 7, 8]) == 6  # upper quartile
    assert autotune.observed_iterations([100] + [1] * 8) == 1  # only the last OBSERVED_RUNS count
