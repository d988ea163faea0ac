"""python -m benchmarks.serve_load: throughput and p50/p99 latency of `srds_trt.serve` against concurrency,
dynamic batching on (--batch-window-ms) vs off (window 0, one request per job), on the digits model.

Loopback only (127.0.0.1, a free port); the server runs in this process (uvicorn in a thread, one pipeline load
shared by both configurations, never two at once); each client is a closed loop of tritonclient.http requests.
Bounded: --requests per level (at least the concurrency) and --level-timeout seconds per level. Writes
benchmarks/results/serve-load/serve_load.json and prints a table. CPU wall clock says little about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--max-batch-images", type=int, default=32)
    p.add_argument("--level-timeout", type=float, default=30.0, help="seconds per (configuration, concurrency)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

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
