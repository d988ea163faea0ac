"""python -m benchmarks.serve_load: throughput and p50/p99 latency of `srds_trt.serve` against concurrency,
dynamic batching on (--batch-window-ms) vs off (window 0, one request per job), on the digits model.

--open-loop: p50/p99 latency against offered load (Poisson arrivals at --rates requests/s, one image each) for the
sampler policies fixed serial, fixed parallel (srds, eps-picard) and load-adaptive (auto: chosen per job), through
the server's own batching queue (srds_trt.serve.batching.Batcher, in process, no HTTP). Two engines:
  --engine cpu       the digits pipeline on this CPU, as it is;
  --engine sim-h200 (or sim-h200-sd2: the SD2-base UNet's curve, 9.2 ms at 1 row ... 86.3 ms at 32)
                     SIMULATED: a stand-in pipeline that sleeps what each job would cost on an H200 per the
                     committed CUDA-graph latency curve of the digits-size UNet (shared/DESIGN.md: 0.87 ms at 1 row
                     ... 1.74 ms at 128), priced by srds_trt.autotune (expected iterations / sweeps from its tables,
                     chunks of at most 512 rows). No GPU ran; the queueing, batching and policy code are the real ones.
Writes benchmarks/results/serve-load/open_loop_<engine>.json and .png.

Loopback only (127.0.0.1, a free port); the server runs in this process (uvicorn in a thread, one pipeline load
shared by both configurations, never two at once); each client is a closed loop of tritonclient.http requests.
Bounded: --requests per level (at least the concurrency) and --level-timeout seconds per level. Writes
benchmarks/results/serve-load/serve_load.json and prints a table. CPU wall clock says little about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(pipe, batch, steps: int):
    import uvicorn

    from srds_trt.serve import ServeConfig, build_app

    port = _free_port()
    app = build_app(pipe, ServeConfig(model="digits", batch=batch, default_steps=steps, warmup_steps=steps))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 300
    while not _ready(client):
        if time.monotonic() > deadline:
            raise TimeoutError("server not ready in 300 s")
        time.sleep(0.1)
    client.close()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def _ready(client) -> bool:
    with contextlib.suppress(Exception):
        return client.is_server_ready()
    return False


def load_level(url: str, concurrency: int, requests: int, timeout_s: float, steps: int) -> dict:
    import tritonclient.http as http

    latencies, errors, lock = [], [], threading.Lock()
    issued = iter(range(requests))
    stop_at = time.monotonic() + timeout_s

    def client_loop(worker: int):
        client = http.InferenceServerClient(url, network_timeout=timeout_s + 60)
        prompt = http.InferInput("prompt", [1], "BYTES")
        seed = http.InferInput("seed", [1], "INT64")
        steps_in = http.InferInput("steps", [1], "INT32")
        steps_in.set_data_from_numpy(np.array([steps], dtype=np.int32))
        while time.monotonic() < stop_at:
            with lock:
                i = next(issued, None)
            if i is None:
                break
            prompt.set_data_from_numpy(np.array([str(i % 10).encode()], dtype=object))
            seed.set_data_from_numpy(np.array([i], dtype=np.int64))
            start = time.perf_counter()
            try:
                client.infer("digits", [prompt, seed, steps_in])
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(str(exc)[:200])
        client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "completed": len(latencies), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": round(wall, 3),
            "throughput_rps": round(len(latencies) / wall, 3) if wall > 0 else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None}


# shared/DESIGN.md: H200, digits-size pixel UNet (1.1 M params, 16x16, fp32), CUDA graph ms per call
H200_DIGITS_MS = {1: 0.87, 2: 0.92, 8: 0.91, 16: 0.95, 32: 1.23, 64: 1.39, 128: 1.74}
# shared/DESIGN.md: H200, SD2-base UNet (fp16, 64x64 latents), CUDA graph ms per call: batching is not free
H200_SD2_MS = {1: 9.2, 2: 11.5, 4: 15.8, 8: 25.3, 16: 45.0, 32: 86.3}
SIM_CURVES = {"sim-h200": ("digits-size UNet", H200_DIGITS_MS), "sim-h200-sd2": ("SD2-base UNet", H200_SD2_MS)}
POLICIES = {"fixed serial": "serial", "fixed srds": "srds", "fixed eps-picard": "eps-picard", "adaptive (auto)": "auto"}


class SimulatedPipe:
    """SIMULATION: a pipeline whose __call__ sleeps what the job would cost on the given latency curve (autotune's
    pricing of the sampler at the job's image count) and returns blank images; it honours cancel between calls."""

    def __init__(self, curve: dict, max_rows: int = 512):
        from types import SimpleNamespace

        self.curve, self.max_rows = curve, max_rows
        self.loaded = SimpleNamespace(sample_shape=(1, 16, 16))
        self.text, self.runtime = None, None
        self._prices = {}

    def check_prompts(self, prompts):
        return list(prompts) if prompts else ["0"]

    def price(self, sampler: str, steps: int, images: int, tol: float):
        key = (sampler, steps, images, tol)  # priced once per shape: the Python pricing is not the engine's time
        if key not in self._prices:
            self._prices[key] = self._price(sampler, steps, images, tol)
        return self._prices[key]

    def _price(self, sampler: str, steps: int, images: int, tol: float):
        from srds_trt.autotune import pricing as autotune

        choice = autotune.choose(steps=steps, images=images, guided=True, latency_ms=self.curve, tol=tol,
                                 max_rows=self.max_rows, sweep_overhead_ms=autotune.GPU_SWEEP_OVERHEAD_MS)
        if sampler == "auto":
            return next(c for c in choice.candidates if c.sampler == choice.sampler and c.options == choice.options)
        if sampler == "srds":  # the product's default plan: sqrt(N) blocks, pipelined
            return next(c for c in choice.candidates if c.sampler == "srds")
        return min((c for c in choice.candidates if c.sampler == sampler), key=lambda c: c.predicted_ms)

    def __call__(self, prompts, *, latents=None, num_inference_steps=100, guidance_scale=None, sampler="srds",
                 tol=0.01, progress_bar=False, cancel=None):
        from PIL import Image

        from srds_trt.pipeline import Cancelled, SRDSPipelineOutput

        cand = self.price(sampler, num_inference_steps, len(prompts), tol)
        end = time.perf_counter() + cand.predicted_ms / 1000
        while (left := end - time.perf_counter()) > 0:
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            time.sleep(min(left, 0.005))
        blank = Image.fromarray(np.zeros((16, 16), dtype=np.uint8))
        stats = {"sampler": cand.sampler, "iterations": cand.iterations, "sequential_calls": cand.sequential_calls,
                 "converged": True, "residuals": [], "error_estimates": [], "simulated_ms": cand.predicted_ms}
        return SRDSPipelineOutput(images=[blank] * len(prompts), stats=stats, samples=None)


def open_loop_level(pipe, policy_sampler: str, rate: float, duration_s: float, steps: int, tol: float,
                    batch, seed: int) -> dict:
    """Poisson arrivals at `rate` for `duration_s` into a fresh Batcher; every request one image."""
    import asyncio

    from srds_trt.serve.batching import Batcher, QueueFull
    from srds_trt.serve.metrics import Metrics
    from srds_trt.serve.protocol import InferRequest, Settings

    settings = Settings(steps=steps, guidance_scale=None, sampler=policy_sampler, tol=tol)
    batcher = Batcher(pipe, batch, Metrics(), "digits")
    batcher.start(None).result(timeout=60)
    rng = np.random.default_rng(seed)
    latencies, rejected, timed_out, samplers, job_images = [], 0, 0, {}, []

    async def one(i: int):
        nonlocal rejected, timed_out
        request = InferRequest(id=None, prompts=(str(i % 10),), seed=i, settings=settings, binary_output=False,
                               outputs=("image",))
        start = time.perf_counter()
        try:
            _, stats = await batcher.infer(request)
        except QueueFull:
            rejected += 1
            return
        except asyncio.TimeoutError:
            timed_out += 1
            return
        latencies.append(time.perf_counter() - start)
        samplers[stats["sampler"]] = samplers.get(stats["sampler"], 0) + 1
        job_images.append(stats["batch_images"])

    async def arrivals():
        tasks, t, i = [], 0.0, 0
        begin = time.perf_counter()
        while True:
            t += rng.exponential(1 / rate)
            if t > duration_s:
                break
            await asyncio.sleep(max(0.0, begin + t - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(i)))
            i += 1
        await asyncio.gather(*tasks)
        return i

    offered = asyncio.run(arrivals())
    batcher.close(5)
    lat = np.array(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if len(lat) else (lambda q: None)
    return {"rate_rps": rate, "offered": offered, "completed": len(latencies), "rejected_503": rejected,
            "timed_out_504": timed_out, "p50_ms": pct(50), "p99_ms": pct(99), "mean_ms": pct(None) if False else
            (round(float(lat.mean()), 1) if len(lat) else None), "samplers": samplers,
            "mean_job_images": round(float(np.mean(job_images)), 2) if job_images else None}


def open_loop(args) -> int:
    import torch

    from srds_trt.serve import BatchConfig

    torch.set_num_threads(1)
    if args.engine == "cpu":
        from srds_trt import SRDSPipeline

        pipe = SRDSPipeline.from_pretrained("digits")
        pipe(["1"], num_inference_steps=args.steps, sampler="auto", progress_bar=False)
        # auto on the reference path measures one latency curve per distinct widest call (~1 s each here) on the
        # first job of that size: measure them all before the timed run, as a server's warm-up would
        from srds_trt.autotune import widest_rows

        for images in range(1, args.max_batch_images + 1):
            pipe.auto.latency_curve(widest_rows(steps=args.steps, images=images, guided=True))
        label = "digits pipeline on this CPU (torch reference path), measured"
    else:
        unet, curve = SIM_CURVES[args.engine]
        pipe = SimulatedPipe(curve)
        label = (f"SIMULATION: sleeps the job's cost on the committed H200 CUDA-graph latency curve of the {unet} "
                 "(shared/DESIGN.md), priced by srds_trt.autotune; no GPU ran")
    batch = BatchConfig(window_s=args.batch_window_ms / 1000, max_batch_images=args.max_batch_images,
                        max_queue=args.max_queue, timeout_s=args.request_timeout)
    rows = []
    policies = [(name, sampler) for name, sampler in POLICIES.items() if sampler in args.policies]
    for k, rate in enumerate(args.rates):  # policies interleaved per rate: a busy machine's drift hits all alike
        for name, sampler in policies:
            level = open_loop_level(pipe, sampler, rate, args.duration, args.steps, args.tol, batch, seed=k)
            rows.append({"policy": name, **level})
            print(f"{name:17s} {rate:7.2f} req/s: done {level['completed']:4d}/{level['offered']:4d} "
                  f"503 {level['rejected_503']:3d} 504 {level['timed_out_504']:3d} p50 {level['p50_ms']} ms "
                  f"p99 {level['p99_ms']} ms jobs of {level['mean_job_images']} images, ran {level['samplers']}",
                  flush=True)
    out = args.out or Path("benchmarks/results/serve-load")
    out.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: list(POLICIES).index(r["policy"]))
    record = {"benchmark": "serve_load --open-loop", "engine": args.engine, "label": label, "model": "digits",
              "steps": args.steps, "tol": args.tol, "guided": True, "images_per_request": 1,
              "duration_s_per_level": args.duration, "batch_window_ms": args.batch_window_ms,
              "max_batch_images": args.max_batch_images, "max_queue": args.max_queue,
              "request_timeout_s": args.request_timeout,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                          "note": "2 cores shared with other jobs"},
              "rows": rows}
    if args.engine != "cpu":
        record["latency_curve_ms"] = SIM_CURVES[args.engine][1]
    path = out / f"open_loop_{args.engine}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    plot(record, out / f"open_loop_{args.engine}.png")
    print(f"wrote {path}")
    return 0


def plot(record: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for policy in dict.fromkeys(r["policy"] for r in record["rows"]):
        rows = [r for r in record["rows"] if r["policy"] == policy and r["p50_ms"] is not None]
        for ax, key in zip(axes, ("p50_ms", "p99_ms")):
            ax.plot([r["rate_rps"] for r in rows], [r[key] for r in rows], marker="o", label=policy)
    rates = sorted({r["rate_rps"] for r in record["rows"]})
    for ax, key in zip(axes, ("p50", "p99")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("offered load (requests/s, Poisson, 1 image each)")
        ax.set_ylabel(f"{key} latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    unet = SIM_CURVES.get(record["engine"], ("",))[0]
    title = (f"SIMULATED: an H200 running the {unet} (committed CUDA-graph latency curve)"
             if record["engine"] != "cpu" else "digits pipeline on this 2-core CPU, measured")
    fig.suptitle(f"srds_trt.serve open loop, {record['steps']} steps, tol {record['tol']}, guided, 1 image per request: "
                 f"{title}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("--open-loop", action="store_true", help="latency vs offered load per sampler policy (see above)")
    p.add_argument("--engine", choices=("cpu", *SIM_CURVES), default="sim-h200")
    p.add_argument("--rates", type=float, nargs="+", default=[5, 10, 20, 40, 80, 160], help="requests/s")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per (policy, rate)")
    p.add_argument("--policies", nargs="+", default=["serial", "srds", "eps-picard", "auto"])
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    p.add_argument("--steps", type=int, default=None, help="default: 4 (closed loop), 100 (--open-loop)")
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--max-batch-images", type=int, default=32)
    p.add_argument("--level-timeout", type=float, default=30.0, help="seconds per (configuration, concurrency)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.open_loop:
        args.steps = args.steps or 100
        return open_loop(args)
    args.steps = args.steps or 4

    import torch

    from srds_trt import SRDSPipeline
    from srds_trt.serve import BatchConfig

    torch.set_num_threads(1)
    pipe = SRDSPipeline.from_pretrained("digits")
    configs = {
        "batched": BatchConfig(window_s=args.batch_window_ms / 1000, max_batch_images=args.max_batch_images,
                               max_queue=256, timeout_s=600),
        "unbatched": BatchConfig(window_s=0.0, max_batch_images=1, max_queue=256, timeout_s=600),
    }
    rows = []
    for mode, batch in configs.items():
        with serving(pipe, batch, args.steps) as url:
            for c in args.concurrency:
                level = load_level(url, c, max(args.requests, c), args.level_timeout, args.steps)
                rows.append({"mode": mode, **level})
                print(f"{mode:9s} c={c:3d} done={level['completed']:3d} err={level['errors']} "
                      f"rps={level['throughput_rps']} p50={level['p50_ms']} ms p99={level['p99_ms']} ms", flush=True)
    out = args.out or Path("benchmarks/results") / "serve-load"
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "serve_load", "model": "digits", "steps": args.steps, "sampler": "srds",
              "batch_window_ms": args.batch_window_ms, "max_batch_images": args.max_batch_images,
              "requests_per_level": args.requests, "machine": {"platform": platform.platform(),
              "cpus": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu"},
              "per_request_noise": "SRDSPipeline latents=",
              "unbatched_note": "window 0 and max_batch_images 1: one request per sampling job", "rows": rows}
    (out / "serve_load.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out / 'serve_load.json'}")
    return 0


def table(rows) -> str:
    lines = ["| mode | concurrency | completed | errors | throughput req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['completed']} | {r['errors']} | {r['throughput_rps']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
