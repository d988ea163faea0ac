"""--sampler auto on the server is load-adaptive: resolved per job at the job's image count. On an engine that
costs what the committed H200 curve of the digits-size UNet says (a simulation: benchmarks.serve_load.SimulatedPipe
sleeps the priced time), an idle server runs one request with a parallel sampler, and a burst that batches into a
32-image job runs batched serial."""

from __future__ import annotations

import asyncio
import json

from benchmarks.serve_load import H200_DIGITS_MS, SimulatedPipe
from srds_trt.serve.batching import Batcher, BatchConfig
from srds_trt.serve.metrics import Metrics
from srds_trt.serve.protocol import InferRequest, Settings


def _run(batcher, count: int):
    settings = Settings(steps=100, guidance_scale=None, sampler="auto", tol=0.01)

    async def burst():
        requests = [InferRequest(id=None, prompts=(str(i % 10),), seed=i, settings=settings, binary_output=False,
                                 outputs=("image",)) for i in range(count)]
        return await asyncio.gather(*(batcher.infer(r) for r in requests))

    return [stats for _, stats in asyncio.run(burst())]


def test_auto_runs_parallel_when_idle_and_batched_serial_under_a_burst():
    pipe = SimulatedPipe(H200_DIGITS_MS)
    batcher = Batcher(pipe, BatchConfig(window_s=0.2, max_batch_images=32, max_queue=64, timeout_s=60), Metrics(),
                      "digits")
    batcher.start(None).result(timeout=30)
    try:
        (alone,) = _run(batcher, 1)
        assert alone["batch_images"] == 1 and alone["sampler"] != "serial", alone
        burst = _run(batcher, 32)
        assert {s["batch_images"] for s in burst} == {32}, [s["batch_images"] for s in burst]
        assert {s["sampler"] for s in burst} == {"serial"}
        # and the pricing agrees: at 32 images serial is predicted no slower than the parallel samplers
        assert pipe.price("auto", 100, 32, 0.01).sampler == "serial"
        assert pipe.price("auto", 100, 1, 0.01).predicted_ms < pipe.price("serial", 100, 1, 0.01).predicted_ms
    finally:
        batcher.close(10)


def test_open_loop_benchmark_writes_results_and_plot(tmp_path):
    from benchmarks.serve_load import main

    assert main(["--open-loop", "--engine", "sim-h200", "--rates", "40", "--duration", "0.5", "--policies", "serial",
                 "auto", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "open_loop_sim-h200.json").read_text())
    assert "SIMULATION" in record["label"] and record["latency_curve_ms"] == {str(k): v for k, v in H200_DIGITS_MS.items()}
    assert [r["policy"] for r in record["rows"]] == ["fixed serial", "adaptive (auto)"]
    assert all(r["completed"] == r["offered"] and r["p99_ms"] is not None for r in record["rows"])
    assert (tmp_path / "open_loop_sim-h200.png").stat().st_size > 10_000
