"""GPU benchmark of the runtime: latency per row count, serial vs SRDS, second stream, overhead, noise floor.

    python -m benchmarks.gpu_runtime --out DIR [--smoke]

Every number of one run comes from the same machine and process; speedups are ratios of runs measured side by
side. Each section records its own error instead of aborting the run, so one failure does not lose the rest.
--smoke shrinks everything (CPU-runnable) to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

from srds_trt.runtime import SerialRunner, SRDSRunner
from srds_trt.runtime.engines.factory import torch_engine
from srds_trt.samplers.timesteps import ddim_grid


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3):
    """Median wall seconds of `repeats` runs after one warm-up (which also captures graphs)."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bucket_latency(engine, buckets, device, replay, iters=20):
    iters = iters if device.type == "cuda" else 1
    """ms per engine call, per bucket (graph replay or eager launch)."""
    result = {}
    for b in buckets:
        engine.enqueue(b, replay=replay)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            engine.enqueue(b, replay=replay)
        sync(device)
        result[b] = (time.perf_counter() - start) / iters * 1e3
    return result


def conditioning(loaded, batch, device, dtype):
    if loaded.conditioning == "class":
        cond = torch.arange(batch) % 10
        return cond.to(device), torch.full_like(cond, loaded.null_class).to(device)
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(batch, *loaded.cond_shape, generator=gen).to(device, dtype)
    return cond, torch.zeros_like(cond)


def srds_vs_serial(engine, loaded, device, *, steps, iters, batch, scale, modes, repeats, record):
    ts, ac = ddim_grid(loaded.scheduler_config, steps)
    pred = loaded.spec.prediction_type
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *loaded.sample_shape, generator=gen).to(device)
    cond, uncond = conditioning(loaded, batch, device, engine.spec.dtype)
    serial = SerialRunner(engine, batch=batch, timesteps=ts, alphas_cumprod=ac, prediction_type=pred)
    serial_s, reference = timed(lambda: serial.run(x, cond, uncond, guidance_scale=scale), device, repeats)
    rows = [{"sampler": "serial", "steps": steps, "wall_ms": serial_s * 1e3, "sequential_calls": steps, "model_evals": steps * batch}]
    record(rows[-1])
    for pipelined, coarse in modes:
        for k in iters:
            runner = SRDSRunner(engine, batch=batch, timesteps=ts, alphas_cumprod=ac, prediction_type=pred,
                                max_iters=k, pipelined=pipelined, coarse=coarse)
            wall, res = timed(lambda: runner.run(x, cond, uncond, guidance_scale=scale, tol=0.0), device, repeats)
            row = {
                "sampler": "srds", "pipelined": pipelined, "coarse": coarse, "steps": steps, "blocks": res.num_blocks,
                "iterations": res.iterations, "wall_ms": wall * 1e3, "speedup_vs_serial": serial_s / wall,
                "sequential_calls": res.sequential_calls, "ticks_launched": res.ticks_launched, "model_evals": res.model_evals,
                "max_abs_err_vs_serial": float((res.sample - reference).abs().max()),
                "engine_calls": {str(b): n for b, n in sorted(res.engine_calls.items())},
            }
            rows.append(row)
            record(row)
            del runner
            release(device)
    return rows, serial_s


def release(device):
    """Free a runner's graphs now: its programs close over it (a reference cycle), so `del` alone waits for gc."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def overhead(rows, latency_ms):
    """wall clock of a run / sum of the latencies of the engine calls it made (graph replay, per bucket)."""
    for row in rows:
        calls = row.get("engine_calls")
        if calls:
            engine_ms = sum(latency_ms[int(b)] * n for b, n in calls.items())
            row["sum_engine_call_ms"] = engine_ms
            row["overhead_ratio"] = row["wall_ms"] / engine_ms


def section_digits(args, device, out):
    from srds_trt.models import load_unet

    smoke = args.smoke
    loaded = load_unet("digits", device=device, dtype=torch.float32)
    out["digits"] = {"weights_id": loaded.weights_id}
    engine = torch_engine(loaded, device=device, dtype=torch.float32, max_rows=128, lanes=2)
    buckets = [1, 2, 8, 16, 32, 64, 128] if not smoke else [1, 2]
    out["digits"]["latency_ms_graph"] = bucket_latency(engine, buckets, device, True)
    out["digits"]["latency_ms_eager"] = bucket_latency(engine, buckets, device, False)
    out["digits"]["noise_floor_fp32_64rows"] = engine.measure_noise_floor(64 if not smoke else 4)
    # PyTorch's default for cuDNN convolutions: how much batch noise TF32 adds
    tf32 = torch_engine(loaded, device=device, dtype=torch.float32, max_rows=64, lanes=1, tf32=True)
    out["digits"]["noise_floor_fp32_tf32_64rows"] = tf32.measure_noise_floor(64 if not smoke else 4)
    del tf32
    release(device)
    rows: list = []
    steps = 1024 if not smoke else 16
    modes = [(True, "merged"), (True, "overlap"), (True, "separate"), (False, "merged")]
    result, serial_s = srds_vs_serial(engine, loaded, device, steps=steps, iters=[1, 2, 3], batch=1, scale=3.0,
                                      modes=modes, repeats=3 if not smoke else 1, record=rows.append)
    # the stopping rule at work: pipelined, no iteration cap
    ts, ac = ddim_grid(loaded.scheduler_config, steps)
    x = torch.randn(1, *loaded.sample_shape, generator=torch.Generator().manual_seed(0)).to(device)
    cond, uncond = conditioning(loaded, 1, device, torch.float32)
    runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, pipelined=True)
    serial = SerialRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac).run(x, cond, uncond, guidance_scale=3.0)
    for tol in (1e-2, 1e-3):
        wall, res = timed(lambda: runner.run(x, cond, uncond, guidance_scale=3.0, tol=tol), device, 3 if not smoke else 1)
        rows.append({"sampler": "srds", "pipelined": True, "coarse": "merged", "steps": steps, "tol": tol,
                     "blocks": res.num_blocks, "iterations": res.iterations, "wall_ms": wall * 1e3,
                     "speedup_vs_serial": serial_s / wall, "sequential_calls": res.sequential_calls,
                     "ticks_launched": res.ticks_launched, "residuals": res.residuals,
                     "max_abs_err_vs_serial": float((res.sample - serial).abs().max()),
                     "engine_calls": {str(b): n for b, n in sorted(res.engine_calls.items())}})
    del runner
    release(device)
    latency = bucket_latency(engine, engine.buckets, device, True)
    overhead(rows, latency)
    out["digits"]["N1024"] = rows
    out["digits"]["latency_ms_graph_all_buckets"] = latency
    # fp16 engine: SRDS at tol=0 vs the fp16 serial path, and the fp16 noise floor
    half = torch.float16 if device.type == "cuda" else torch.float32  # CPU half convolutions are a slow path
    loaded16 = load_unet("digits", device=device, dtype=half)
    engine16 = torch_engine(loaded16, device=device, dtype=half, max_rows=128, lanes=1)
    out["digits"]["noise_floor_fp16_64rows"] = engine16.measure_noise_floor(64 if not smoke else 4)
    rows16: list = []
    srds_vs_serial(engine16, loaded16, device, steps=100 if not smoke else 9, iters=[10 if not smoke else 3], batch=4,
                   scale=3.0, modes=[(True, "merged")], repeats=1, record=rows16.append)
    out["digits"]["fp16_N100_exact"] = rows16


def section_sd2(args, device, out):
    from srds_trt.models import load_unet

    smoke = args.smoke
    name = "sd2"
    start = time.perf_counter()
    half = torch.float16 if device.type == "cuda" else torch.float32  # CPU half convolutions are a slow path
    loaded = load_unet(name, device=device, dtype=half, random_weights=True, resolution=512 if not smoke else 64)
    out["sd2"] = {"load_s": time.perf_counter() - start, "weights": "random (real SD2-base architecture)",
                  "params": sum(p.numel() for p in loaded.unet.parameters())}
    engine = torch_engine(loaded, device=device, dtype=half, max_rows=32 if not smoke else 8, lanes=2)
    buckets = [1, 2, 4, 8, 16, 32] if not smoke else [1, 2]
    out["sd2"]["latency_ms_graph"] = bucket_latency(engine, buckets, device, True, iters=5)
    out["sd2"]["latency_ms_eager"] = bucket_latency(engine, buckets, device, False, iters=5)
    out["sd2"]["noise_floor_fp16_8rows"] = engine.measure_noise_floor(8 if not smoke else 2)
    rows: list = []
    for steps in ([25, 100] if not smoke else [4]):
        modes = [(False, "merged"), (True, "merged"), (True, "overlap"), (True, "separate")] if not smoke else [(True, "separate")]
        srds_vs_serial(engine, loaded, device, steps=steps, iters=[1, 2, 3] if not smoke else [1], batch=1, scale=7.5,
                       modes=modes, repeats=1, record=rows.append)
    latency = bucket_latency(engine, engine.buckets, device, True, iters=3)
    overhead(rows, latency)
    out["sd2"]["runs"] = rows
    out["sd2"]["latency_ms_graph_all_buckets"] = latency


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sections", default="digits,sd2")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(), "smoke": args.smoke,
        "errors": {},
    }
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"gpu_runtime{'-smoke' if args.smoke else ''}.json"
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            {"digits": section_digits, "sd2": section_sd2}[name](args, device, out)
        except Exception:
            out["errors"][name] = traceback.format_exc()
            print(out["errors"][name], flush=True)
        out.setdefault("section_seconds", {})[name] = time.perf_counter() - start
        target.write_text(json.dumps(out, indent=1, default=str))
        print(f"[{name}] {time.perf_counter() - start:.1f} s -> {target}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in out.items() if k != "errors"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
