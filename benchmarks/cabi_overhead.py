"""Runtime overhead of libsrds_trt (the C ABI) beside the Python reference path, on the same AOTInductor engine.

Overhead = wall time of one generate call / the time spent inside its engine calls (1.0 = no overhead). Both
sides run the same request (digits, SRDS at the default tol, guidance 4; and serial) alternately in one process,
so machine load hits both alike. The C++ side times itself (srds_trt_report.seconds / .engine_seconds); the
Python side (srds_trt.sampling.srds_sample / serial_sample over torch._inductor.aoti_load_package) is timed
around the call and around each engine call.

    python -m benchmarks.cabi_overhead EXPORT_DIR [--reps 5] [--steps 100] [--threads 1] [--out benchmarks/results/cabi]

EXPORT_DIR: `python -m srds_trt.export --model digits --dtype fp32 --aoti` output. Needs build/cpp/libsrds_trt.so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.run import machine_info
from srds_trt.samplers.guidance import classifier_free_guidance
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.runtime import cabi
from srds_trt.samplers import serial_sample, srds_sample


def python_side(export: Path, classes: list[int], scale: float, steps: int, seed: int, sampler: str) -> dict:
    package = torch._inductor.aoti_load_package(str(export / "unet.pt2"))
    engine = {"seconds": 0.0, "calls": 0}

    def cond_model(x, t, c):
        start = time.perf_counter()
        out = package(x, t.to(torch.float32), c)
        engine["seconds"] += time.perf_counter() - start
        engine["calls"] += 1
        return out

    config = json.loads((export / "manifest.json").read_text())["scheduler_config"]
    cond = torch.tensor(classes, dtype=torch.long)
    model = classifier_free_guidance(cond_model, cond, torch.full_like(cond, 10), scale)
    x = torch.randn((len(classes), 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    timesteps, alphas = ddim_grid(config, steps)
    start = time.perf_counter()
    with torch.inference_mode():
        if sampler == "srds":
            srds_sample(model, x, timesteps, alphas)
        else:
            serial_sample(model, x, timesteps, alphas)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "engine_s": engine["seconds"], "engine_calls": engine["calls"],
            "overhead": wall / engine["seconds"]}


def cpp_side(runtime: cabi.Runtime, classes: list[int], scale: float, steps: int, seed: int, sampler: str) -> dict:
    start = time.perf_counter()
    got = runtime.generate(class_ids=classes, sampler=sampler, steps=steps, seed=seed, guidance_scale=scale)
    outside = time.perf_counter() - start
    r = got.report
    return {"wall_s": r.seconds, "wall_outside_s": outside, "engine_s": r.engine_seconds,
            "engine_calls": r.engine_calls, "overhead": r.seconds / r.engine_seconds,
            "overhead_outside": outside / r.engine_seconds, "iterations": r.iterations,
            "sequential_calls": r.sequential_calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cabi"))
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for both sides (one process, one libtorch); on a CPU shared with other busy "
                        "processes more than one lets spinning OpenMP workers inflate every engine call")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    classes, scale, seed = [3, 7], 4.0, 0
    results = {"machine": machine_info("cpu"), "threads": args.threads, "load_average": os.getloadavg(),
               "export": str(args.export), "steps": args.steps, "classes": classes,
               "guidance_scale": scale, "reps": args.reps, "runs": {}}
    with cabi.Runtime(args.export) as runtime:
        for sampler in ("srds", "serial"):
            runs = {"cpp": [], "python": []}
            cpp_side(runtime, classes, scale, 4, seed, sampler)  # warm-up both (first-call allocations)
            python_side(args.export, classes, scale, 4, seed, sampler)
            for _ in range(args.reps):  # alternate, so load spikes hit both
                runs["cpp"].append(cpp_side(runtime, classes, scale, args.steps, seed, sampler))
                runs["python"].append(python_side(args.export, classes, scale, args.steps, seed, sampler))
            summary = {side: {"overhead_median": statistics.median(r["overhead"] for r in rs),
                              "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                              "engine_s_median": statistics.median(r["engine_s"] for r in rs)}
                       for side, rs in runs.items()}
            summary["cpp"]["overhead_outside_median"] = statistics.median(r["overhead_outside"] for r in runs["cpp"])
            results["runs"][sampler] = {"summary": summary, "runs": runs}
            print(f"{sampler}: C++ wall/engine {summary['cpp']['overhead_median']:.4f} "
                  f"(from Python: {summary['cpp']['overhead_outside_median']:.4f}), "
                  f"Python {summary['python']['overhead_median']:.4f}; "
                  f"engine calls C++ {runs['cpp'][0]['engine_calls']}, Python {runs['python'][0]['engine_calls']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "overhead.json"
    with tempfile.NamedTemporaryFile("w", dir=args.out, delete=False, suffix=".tmp") as tmp:
        json.dump(results, tmp, indent=1)
    os.replace(tmp.name, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
