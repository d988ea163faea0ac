"""`sampler="auto"` in the pipeline and the CLI: where the latency curve comes from (reference model, engine
warm-up, export manifest), that the choice's options are the ones the run used, the fallback when the chosen
sampler cannot run on the path, and what stats.json and the CLI say."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from srds_trt import SRDSPipeline
from srds_trt.autotune import pricing as autotune

FLAT = {1: 1.0, 64: 1.0}  # a GPU left idle by a small model: wide calls cost what narrow ones do
LINEAR = {1: 1.0, 64: 64.0}  # throughput-bound


@pytest.fixture()
def digits():
    return SRDSPipeline.from_pretrained("digits")


def inject(pipe, monkeypatch, curve):
    """Replace the pipeline's measurement of its reference model (the only thing faked: choice and run are real)."""
    seen = []

    def measured(widest):
        seen.append(widest)
        return dict(curve)

    monkeypatch.setattr(pipe.auto, "measure_reference_curve", measured)
    return seen


def check_record(auto: dict, steps: int) -> None:
    """stats["auto"]: every candidate priced, the choice is the cheapest (or a named fallback), with a reason."""
    flat = autotune.choose(steps=steps, latency_ms=FLAT)
    assert [(c["sampler"], c["options"]) for c in auto["candidates"]] == [(c.sampler, c.options) for c in flat.candidates]
    assert {c["sampler"] for c in auto["candidates"]} == set(autotune.CANDIDATES)
    assert all(c["predicted_ms"] > 0 for c in auto["candidates"])
    assert auto["predicted_ms"] <= auto["serial_ms"]
    if auto["fallback"] is None:
        assert auto["predicted_ms"] == min(c["predicted_ms"] for c in auto["candidates"])
    assert auto["sampler"] in auto["reason"] and "predicted" in auto["reason"]


def test_throughput_bound_curve_gives_serial(digits, monkeypatch):
    inject(digits, monkeypatch, LINEAR)
    out = digits("3", num_inference_steps=12, sampler="auto", progress_bar=False)
    auto = out.stats["auto"]
    check_record(auto, 12)
    assert auto["sampler"] == out.stats["sampler"] == "serial" and auto["options"] == {}
    assert auto["curve_source"] == "reference model" and auto["latency_per_rows_ms"] == LINEAR
    assert out.stats["sequential_calls"] == 12


def test_measured_reference_curve_is_used_and_cached(digits):
    out = digits("3", num_inference_steps=12, sampler="auto", progress_bar=False)
    auto = out.stats["auto"]
    check_record(auto, 12)
    assert auto["curve_source"] == "reference model" and auto["world_size"] == 1 and auto["allgather_ms"] == 0.0
    widest = autotune.widest_rows(steps=12, images=1, guided=True)
    assert max(auto["latency_per_rows_ms"]) == widest and min(auto["latency_per_rows_ms"]) == 1
    assert out.stats["sampler"] == auto["sampler"]
    digits.auto.measure_reference_curve = lambda widest: pytest.fail("measured twice: the curve is cached per pipeline")
    again = digits("7", num_inference_steps=12, sampler="auto", progress_bar=False)
    assert again.stats["auto"]["latency_per_rows_ms"] == auto["latency_per_rows_ms"]
    # a narrower call (fewer steps) is priced from the wider curve already measured: no new measurement per width
    narrower = digits("7", num_inference_steps=6, sampler="auto", progress_bar=False)
    assert narrower.stats["auto"]["latency_per_rows_ms"] == auto["latency_per_rows_ms"]


def test_flat_curve_picks_a_parallel_sampler_and_the_run_uses_its_window(digits, monkeypatch):
    inject(digits, monkeypatch, FLAT)
    # N = 100: below ~N = 30 the sweep model (b ~ 14-17 start-up sweeps) prices every window sampler at >= N
    out = digits("3", num_inference_steps=100, sampler="auto", progress_bar=False, window=3)
    auto = out.stats["auto"]
    check_record(auto, 100)
    assert auto["sampler"] in ("paradigms", "eps-picard") and auto["fallback"] is None
    assert out.stats["sampler"] == auto["sampler"]
    assert out.stats["window"] == auto["options"]["window"] != 3  # the choice replaced the caller's window


def test_fallback_to_the_best_runnable_candidate_applies_its_options(digits, monkeypatch):
    inject(digits, monkeypatch, FLAT)
    # paradigms only (and serial): its best window, 2 round(sqrt N) = 16, differs from its default round(sqrt N) = 8
    monkeypatch.setattr(digits, "runnable_samplers", lambda: ("serial", "paradigms"))
    out = digits("3", num_inference_steps=64, sampler="auto", progress_bar=False)
    auto = out.stats["auto"]
    assert auto["sampler"] == out.stats["sampler"] == "paradigms" and "cannot run here" in auto["fallback"]
    assert out.stats["window"] == auto["options"]["window"] == 16
    # srds only: at its expected 6 iterations default_num_blocks(16) = 8 blocks (14 calls) beat round(sqrt 16) = 4
    # (exact after 4 iterations: 16 calls, serial's) on a flat curve; the run uses 8, not the caller's 2
    monkeypatch.setattr(digits, "runnable_samplers", lambda: ("serial", "srds"))
    out = digits("3", num_inference_steps=16, sampler="auto", progress_bar=False, num_blocks=2)
    auto = out.stats["auto"]
    assert auto["sampler"] == out.stats["sampler"] == "srds"  # (the cheapest of all at N=16 anyway: no fallback)
    assert out.stats["blocks"] == auto["options"]["num_blocks"] == 8
    assert out.stats["pipelined"] is True


def test_auto_prices_the_image_chunks_the_run_uses(digits, monkeypatch):
    """4 images, max_rows 64: eps-Picard's window of 16 points needs 32 rows per image, so it would run in 2 chunks
    of 2 images, one after the other (2 x 18 sweeps); window 8 fits all 4 in one chunk (23 sweeps) and wins on a
    flat curve. With room for every image in one call, window 16 wins (18 sweeps). Serial fits all 4 in one chunk."""
    inject(digits, monkeypatch, FLAT)
    monkeypatch.setattr(digits, "runnable_samplers", lambda: ("serial", "eps-picard"))
    out = digits("3", num_inference_steps=64, sampler="auto", num_images_per_prompt=4, max_rows=64,
                 progress_bar=False)
    auto, stats = out.stats["auto"], out.stats
    assert (auto["sampler"], auto["options"]) == ("eps-picard", {"window": 8})
    assert (stats["chunks"], stats["images_per_chunk"]) == (1, 4)
    by_window = {c["options"]["window"]: c for c in auto["candidates"] if c["sampler"] == "eps-picard"}
    for w, chunks in ((8, 1), (16, 2)):
        sweeps = autotune.expected_sweeps("eps-picard", 64, w, auto["tol"])
        assert (by_window[w]["sequential_calls"], by_window[w]["rows_per_call"]) == (chunks * sweeps, 2 * w * 4 // chunks)
        assert by_window[w]["predicted_ms"] == pytest.approx(chunks * sweeps * FLAT[64])
    serial = next(c for c in auto["candidates"] if c["sampler"] == "serial")
    assert (serial["sequential_calls"], serial["rows_per_call"]) == (64, 8)
    roomy = digits("3", num_inference_steps=64, sampler="auto", num_images_per_prompt=4, progress_bar=False)
    assert roomy.stats["auto"]["options"] == {"window": 16} and roomy.stats["chunks"] == 1


def test_auto_learns_what_this_model_needed(digits, monkeypatch):
    """A complete run is remembered (per N, tol, guidance): auto then prices that candidate at what it took, not at
    the table; a run cut by max_iters is not; and observations that make a candidate dear move the choice."""
    inject(digits, monkeypatch, FLAT)
    monkeypatch.setattr(digits, "runnable_samplers", lambda: ("serial", "eps-picard"))
    from srds_trt.autotune import pricing as autotune

    ran = digits("3", num_inference_steps=64, sampler="eps-picard", window=8, progress_bar=False).stats
    digits("3", num_inference_steps=64, sampler="eps-picard", window=16, max_iters=3, progress_bar=False)  # cut
    assert [k[3] for k in digits.auto.observed] == [autotune.candidate_key("eps-picard", {"window": 8})]
    out = digits("3", num_inference_steps=64, sampler="auto", progress_bar=False).stats
    auto = out["auto"]
    by_window = {c["options"]["window"]: c for c in auto["candidates"] if c["sampler"] == "eps-picard"}
    assert (by_window[8]["iterations"], by_window[8]["iterations_from"]) == (ran["iterations"], "observed")
    assert by_window[16]["iterations_from"] == "expected"
    assert auto["options"] == {"window": 16}  # 18 expected sweeps vs window 8's observed ones
    window16 = (64, auto["tol"], True, autotune.candidate_key("eps-picard", {"window": 16}))
    assert digits.auto.observed[window16] == [out["iterations"]]  # the auto run itself is remembered
    other_tol = digits("3", num_inference_steps=64, sampler="auto", tol=1e-2, progress_bar=False).stats["auto"]
    assert all(c["iterations_from"] == "expected" for c in other_tol["candidates"])  # kept per tol
    digits.auto.observed[window16] = [60]  # as if this model had needed 60 sweeps there
    moved = digits("3", num_inference_steps=64, sampler="auto", progress_bar=False).stats["auto"]
    assert moved["options"] == {"window": 8}  # the choice moves


def test_world_size_changes_the_prediction(digits, monkeypatch):
    inject(digits, monkeypatch, {1: 1.0, 8: 8.0, 64: 64.0})
    one = digits("3", num_inference_steps=16, sampler="auto", progress_bar=False).stats["auto"]
    monkeypatch.setattr(type(digits), "world_size", property(lambda self: 2))
    monkeypatch.setattr(digits.auto, "allgather_cost", lambda widest, world: (0.01, "constant (test)"))
    two = digits("3", num_inference_steps=16, sampler="auto", progress_bar=False).stats["auto"]
    assert (one["world_size"], two["world_size"], two["allgather_ms"], two["allgather"]) == (1, 2, 0.01, "constant (test)")
    # serial is sharded like every call of a job: its 2 guidance rows, one per rank, plus the all-gather
    assert one["serial_ms"] == 16 * 2.0 and two["serial_ms"] == pytest.approx(16 * (1.0 + 0.01))
    pairs = [(a["predicted_ms"], b["predicted_ms"]) for a, b in zip(one["candidates"], two["candidates"])]
    assert all(b < a for a, b in pairs)  # half the rows per rank on a linear curve


# ---- exported engines (ONNX Runtime on the CPU): engine warm-up and the manifest's latency_per_rows -----------

@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tensorrt_rtx")
    from srds_trt.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("engines")
    export_model(ExportConfig(model="digits", out=out, dtype="fp32", min_batch=1, max_batch=24), quiet=True)
    return next(out.glob("digits/*/manifest.json")).parent


@pytest.fixture()
def export_copy(digits_export, tmp_path):
    return shutil.copytree(digits_export, tmp_path / "export")


def test_engine_warm_up_curve_on_onnxruntime_is_serial_and_not_recorded(export_copy):
    from srds_trt.export.artifacts import read_manifest

    pipe = SRDSPipeline.from_pretrained("digits", backend="onnxruntime", engine_dir=export_copy)
    out = pipe("3", num_inference_steps=16, sampler="auto", progress_bar=False)
    auto = out.stats["auto"]
    check_record(auto, 16)
    assert auto["curve_source"] == "engine warm-up"
    assert sorted(auto["latency_per_rows_ms"]) == list(pipe.runtime.engine.buckets)  # every bucket, measured
    # ONNX Runtime on a CPU is throughput-bound (~3 ms per row here): serial, with a wide margin
    assert auto["sampler"] == out.stats["sampler"] == "serial"
    assert auto["curve_recorded"].startswith("not recorded")
    assert read_manifest(export_copy).get("latency_per_rows") is None


def test_manifest_latency_per_rows_is_used_and_a_choice_wider_than_the_export_falls_back(export_copy, monkeypatch):
    from srds_trt.export.artifacts import record_latency

    record_latency(export_copy, {1: 1.0, 24: 1.0})  # as a GPU warm-up would have stored it
    pipe = SRDSPipeline.from_pretrained("digits", backend="onnxruntime", engine_dir=export_copy)
    pipe.auto.measure_engine_curve = lambda engine: pytest.fail("measured although the manifest has a curve")
    out = pipe("3", num_inference_steps=100, sampler="auto", progress_bar=False, max_iters=3)
    auto = out.stats["auto"]
    assert auto["curve_source"] == "manifest" and auto["latency_per_rows_ms"] == {1: 1.0, 24: 1.0}
    # on a flat curve the widest window wins (2 round(sqrt 100) points x 2 guided rows = 40): the export holds 24
    best = min(auto["candidates"], key=lambda c: c["predicted_ms"])
    assert best["rows_per_call"] == 40 and "the export holds 24" in auto["fallback"]
    picked = next(c for c in auto["candidates"] if (c["sampler"], c["options"]) == (auto["sampler"], auto["options"]))
    assert picked["rows_per_call"] <= 24 and picked["sampler"] in pipe.runnable_samplers()
    assert picked["predicted_ms"] == min(c["predicted_ms"] for c in auto["candidates"]
                                         if c["rows_per_call"] <= 24 and c["sampler"] in pipe.runnable_samplers())
    assert out.stats["sampler"] == auto["sampler"]
    if auto["sampler"] == "srds":
        assert out.stats["blocks"] == auto["options"]["num_blocks"]
    else:
        assert out.stats["window"] == auto["options"]["window"]
    # a later auto call does not re-read an unchanged manifest (a server pays the choice per request)
    import srds_trt.export.artifacts as artifacts

    monkeypatch.setattr(artifacts, "read_manifest", lambda path: pytest.fail("manifest re-read"))
    again = pipe("3", num_inference_steps=100, sampler="auto", progress_bar=False, max_iters=1)
    assert again.stats["auto"]["latency_per_rows_ms"] == {1: 1.0, 24: 1.0}


def test_a_measured_tensorrt_curve_is_recorded_once(export_copy, monkeypatch):
    from srds_trt.export.artifacts import read_manifest, verify_artifacts

    pipe = SRDSPipeline.from_pretrained("digits", backend="onnxruntime", engine_dir=export_copy)
    monkeypatch.setattr(pipe, "backend", "tensorrt")  # the recording policy reads the backend; nothing else runs
    pipe.auto.record_curve({1: 2.5, 2: 2.75})
    assert read_manifest(export_copy)["latency_per_rows"] == {"1": 2.5, "2": 2.75}
    pipe.auto.record_curve({1: 9.0})  # once per export and pipeline
    assert read_manifest(export_copy)["latency_per_rows"] == {"1": 2.5, "2": 2.75}
    assert pipe.auto.cache[("recorded", str(export_copy))].startswith("recorded in")
    trt = read_manifest(export_copy)["tensorrt"]
    verify_artifacts(export_copy, flavour=trt["flavour"], version=trt["version"], target=None)  # still valid


# ---- the CLI --------------------------------------------------------------------------------------------------

def test_generate_auto_prints_the_choice_and_writes_it(tmp_path, capsys):
    from srds_trt.cli.generate import main

    assert main(["--sampler", "auto", "--steps", "9", "--prompt", "3", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    auto = stats["auto"]
    assert stats["sampler"] == auto["sampler"] and auto["curve_source"] == "reference model"
    line = next(l for l in printed.splitlines() if l.startswith("auto: chose"))
    assert auto["sampler"] in line and auto["reason"] in line and "reference model" in line
    assert main(["--sampler", "auto", "--steps", "9", "--prompt", "3", "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert "auto:" not in capsys.readouterr().out
    assert "auto" in json.loads((tmp_path / "b" / "stats.json").read_text())


@pytest.mark.slow
def test_two_gloo_ranks_price_world_size_and_a_measured_all_gather(tmp_path):
    """torchrun, 2 ranks: auto prices world size 2 and an all-gather measured on the group, and the job runs the
    choice on both ranks (every rank takes rank 0's curve; ranks that chose differently would mismatch their
    all-gathers and time out, though this test cannot force timings that would make them choose differently)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "srds_trt.generate", "--steps", "16", "--prompt", "3", "--quiet",
               "--sampler", "auto", "--dist-timeout", "60", "--out", str(tmp_path / "dist")]
    run = subprocess.run(command, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    stats = json.loads((tmp_path / "dist" / "stats.json").read_text())
    auto = stats["auto"]
    assert auto["world_size"] == stats["world_size"] == 2 and auto["allgather_ms"] > 0
    assert auto["allgather"].startswith("measured at warm-up")
    assert stats["sampler"] == auto["sampler"]  # the measurements are no engine calls of the run:
    # (SRDS adds its serial reference's calls; on this CPU's curve auto may pick serial or SRDS)
    assert stats["rank_engine_calls"] == stats["sequential_calls"] + stats.get("serial", {}).get("sequential_calls", 0)
    one_rank = autotune.choose(steps=16, latency_ms={int(r): ms for r, ms in auto["latency_per_rows_ms"].items()})
    assert [c["predicted_ms"] for c in auto["candidates"]] != [c.predicted_ms for c in one_rank.candidates]


def test_bucketed_prices_a_call_at_its_padded_bucket():
    from srds_trt.autotune.latency import bucketed

    latency = bucketed({1: 1.0, 2: 2.0, 4: 4.0}, (1, 2, 4))
    assert [latency(r) for r in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]  # 3 rows run in the 4-row bucket
    assert latency(6) == 6.0  # beyond the largest bucket: autotune's last slope


def test_engine_curve_times_every_bucket_on_the_cpu():
    import torch

    from srds_trt.models import load_unet
    from srds_trt.runtime.engines.factory import torch_engine
    from srds_trt.autotune.latency import measure_engine_curve

    engine = torch_engine(load_unet("digits"), device="cpu", dtype=torch.float32, max_rows=6)
    curve = measure_engine_curve(engine, repeats=1)
    assert list(curve) == list(engine.buckets) and all(ms > 0 for ms in curve.values())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (this machine has none)")
def test_engine_curve_on_a_gpu_is_timed_as_graph_replays():
    import torch

    from srds_trt.models import load_unet
    from srds_trt.runtime.engines.factory import torch_engine
    from srds_trt.autotune.latency import measure_engine_curve

    engine = torch_engine(load_unet("digits", device="cuda"), device="cuda", dtype=torch.float32, max_rows=32,
                          cuda_graphs=False)
    curve = measure_engine_curve(engine)
    assert list(curve) == list(engine.buckets) and all(ms > 0 for ms in curve.values())
    assert curve[1] < 5.0  # graph replay of a 1.1 M-parameter UNet (H200: 0.87 ms); eager is 7-22 ms


def test_auto_prices_the_tol_the_caller_asked_for(digits, monkeypatch):
    inject(digits, monkeypatch, FLAT)
    seen = {}
    for tol in (1e-2, 1e-4):
        auto = digits("3", num_inference_steps=100, sampler="auto", tol=tol, progress_bar=False).stats["auto"]
        expected = autotune.choose(steps=100, latency_ms=FLAT, tol=tol)
        assert auto["tol"] == tol
        assert [c["sequential_calls"] for c in auto["candidates"]] == [c.sequential_calls for c in expected.candidates]
        seen[tol] = [c["sequential_calls"] for c in auto["candidates"] if "window" in c["options"]]
    assert all(a <= b for a, b in zip(seen[1e-2], seen[1e-4])) and seen[1e-2] != seen[1e-4]


def test_curve_timing_survives_a_load_burst(monkeypatch):
    """A burst of load from another process (here: the first 4 calls 10x slower, on a fake clock) must not flatten
    the curve: row counts are timed in interleaved rounds, so the burst costs one round of each, which the minimum
    drops. Timed one row count after the other, 1 row would read 10 ms (every repeat inside the burst)."""
    import torch

    from srds_trt.autotune import latency
    clock, burst = [0.0], [4]

    def call(cost_s):
        def run():
            clock[0] += cost_s * (10 if burst[0] > 0 else 1)
            burst[0] -= 1
        return run

    monkeypatch.setattr(latency, "_now", lambda device: clock[0])
    got = latency.best_ms_interleaved({1: call(1e-3), 8: call(2e-3), 64: call(1e-2)}, torch.device("cpu"), 3)
    assert got == pytest.approx({1: 1.0, 8: 2.0, 64: 10.0})
    burst[0] = 4
    assert latency.best_ms(call(1e-3), torch.device("cpu"), 3) == pytest.approx(10.0)  # what the old way read
