"""PROJECTED (not measured) wall clock of SD2-base sampling on 1/2/4/8 GPUs with srds_trt.runtime.distributed's layout.

Every number here is `--sampler auto`'s own prediction (srds_trt.autotune.pricing.choose, every candidate it prices): a
tick of R engine rows on K GPUs costs latency(ceil(R / K)) + allgather_ms (K > 1), latency from the H200
CUDA-graph curve of SD2-base (fp16, 64x64 latents, /work/shared/DESIGN.md), one image, classifier-free guidance
(2 engine rows per state row); sequential calls from auto's expectations at --tol (SRDS: the Parareal iterations
its stopping rule ran on the committed stopping benchmark, autotune.SRDS_ITERATIONS; ParaDiGMS and eps-Picard:
autotune.WINDOW_SWEEPS), each sweep of a sliding window paying its H100-measured update program
(autotune.GPU_SWEEP_OVERHEAD_MS). Those counts come from the CPU benchmark models (mixtures, the digits UNet), not
from SD: no SD weights are reachable here. No multi-GPU machine was available: nothing here ran on more than one
GPU. (Before 2026-11-27 this file assumed 1-3 SRDS iterations and a fixed ParaDiGMS slide of 0.2 of its window
per sweep, and had no eps-Picard: SRDS looked 2-3x faster than auto now expects.)

    python -m benchmarks.multigpu_projection [--allgather-ms 0.1] [--tol 1e-3] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from srds_trt.autotune.pricing import GPU_SWEEP_OVERHEAD_MS, SRDS_ITERATIONS, WINDOW_SWEEPS, choose
from srds_trt.samplers.stopping import DEFAULT_TOL

# H200, torch 2.11, SD2-base UNet, CUDA graph, ms per call (DESIGN.md "This workplace's facts")
H200_SD2_MS = {1: 9.2, 2: 11.5, 4: 15.8, 8: 25.3, 16: 45.0, 32: 86.3}
# NCCL all-gather of <= 16 rows x 4x64x64 fp16 (<= 0.5 MB) inside a CUDA graph over NVLink: nccl-tests report
# ~10-30 us for such sizes on NVSwitch systems; 0.1 ms leaves room for the graph's launch of the collective.
ALLGATHER_MS = 0.1
STEPS = (25, 50, 100)
WORLDS = (1, 2, 4, 8)
PUBLISHED = {
    "paradigms (Shih et al. 2023, SD-v2 DDPM-1000, A100s)": {1: 0.7, 4: 2.3, 8: 3.2},
    "srds (arXiv 2412.08292)": "SD timings on 4 A100s; see the paper's tables (not restated: not re-checked here)",
}


def _name(candidate) -> str:
    options = ", ".join(f"{k}={v}" for k, v in candidate.options.items() if k != "pipelined")
    return f"{candidate.sampler} ({options})" if options else candidate.sampler


def project(allgather_ms: float, tol: float = DEFAULT_TOL) -> dict:
    rows = []
    for steps in STEPS:
        base = choose(steps=steps, latency_ms=H200_SD2_MS, samplers=("serial",)).serial_ms  # 1 GPU: the reference
        for world in WORLDS:
            choice = choose(steps=steps, latency_ms=H200_SD2_MS, world_size=world, allgather_ms=allgather_ms,
                            sweep_overhead_ms=GPU_SWEEP_OVERHEAD_MS, tol=tol)
            for c in choice.candidates:
                rows.append({"steps": steps, "gpus": world, "sampler": _name(c), "sequential_calls": c.sequential_calls,
                             "projected_ms": round(c.predicted_ms, 1), "speedup_vs_serial_1gpu": round(base / c.predicted_ms, 2),
                             "auto_picks": c.sampler == choice.sampler and c.options == choice.options})
    return {"kind": "PROJECTED", "date": datetime.date.today().isoformat(), "latency_curve_ms": H200_SD2_MS,
            "latency_source": "H200 SD2-base CUDA graph, fp16, /work/shared/DESIGN.md", "allgather_ms": allgather_ms,
            "tol": tol,
            "assumptions": {"model": "srds_trt.autotune.pricing.choose (what --sampler auto predicts)",
                            "srds_iterations_by_tol": {str(k): v for k, v in SRDS_ITERATIONS.items()},
                            "window_sweeps_by_tol": {n: {str(k): v for k, v in t.items()} for n, t in WINDOW_SWEEPS.items()},
                            "sweep_overhead_ms": GPU_SWEEP_OVERHEAD_MS, "images": 1,
                            "guidance": "2 engine rows per state",
                            "layout": "rows sharded over ranks, one all-gather per tick (srds_trt.runtime.distributed); "
                                      "serial splits only its two guidance rows"},
            "published": PUBLISHED, "rows": rows}


def markdown(result: dict) -> str:
    out = [f"PROJECTED speedup vs serial on 1 GPU (all-gather {result['allgather_ms']} ms per tick, tol {result['tol']:g}), "
           "SD2-base, 1 image, CFG; * = what auto picks at that GPU count", "",
           "| N | sampler | calls | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |", "|---|---|---|---|---|---|---|"]
    for steps in STEPS:
        for name in dict.fromkeys(r["sampler"] for r in result["rows"] if r["steps"] == steps):
            cells = {r["gpus"]: r for r in result["rows"] if r["steps"] == steps and r["sampler"] == name}
            out.append(f"| {steps} | {name} | {cells[1]['sequential_calls']} | " + " | ".join(
                f"{cells[w]['speedup_vs_serial_1gpu']:.2f}x ({cells[w]['projected_ms']:.0f} ms){'*' if cells[w]['auto_picks'] else ''}"
                for w in WORLDS) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--allgather-ms", type=float, default=ALLGATHER_MS)
    p.add_argument("--tol", type=float, default=DEFAULT_TOL)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    result = project(args.allgather_ms, args.tol)
    out = args.out or Path("benchmarks/results") / "multigpu-projection" / "multigpu-projection.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    table = markdown(result)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
