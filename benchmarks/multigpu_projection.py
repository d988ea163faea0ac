"""PROJECTED (not measured) wall clock of SD2-base sampling on 1/2/4/8 GPUs with srds_trt.distributed's layout.

Every number here is a prediction from srds_trt.autotune.tick_ms: a tick of R engine rows on K GPUs costs
latency(ceil(R / K)) + allgather_ms (K > 1), latency from the H200 CUDA-graph curve of SD2-base (fp16, 64x64
latents, /work/shared/DESIGN.md), one image, classifier-free guidance (2 engine rows per state row). No multi-GPU
machine was available: nothing here was run on more than one GPU.

    python -m benchmarks.multigpu_projection [--allgather-ms 0.1] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

from srds_trt.autotune import tick_ms
from srds_trt.schedule import build_tick_plan, default_num_blocks

# H200, torch 2.11, SD2-base UNet, CUDA graph, ms per call (DESIGN.md "This workplace's facts")
H200_SD2_MS = {1: 9.2, 2: 11.5, 4: 15.8, 8: 25.3, 16: 45.0, 32: 86.3}
# NCCL all-gather of <= 16 rows x 4x64x64 fp16 (<= 0.5 MB) inside a CUDA graph over NVLink: nccl-tests report
# ~10-30 us for such sizes on NVSwitch systems; 0.1 ms leaves room for the graph's launch of the collective.
ALLGATHER_MS = 0.1
STEPS = (25, 50, 100)
WORLDS = (1, 2, 4, 8)
SRDS_ITERATIONS = (1, 2, 3)  # Parareal iterations the stopping rule needs at SD tolerances: assumed, not measured
PARADIGMS_SLIDE = 0.2  # points accepted per sweep / window (the first auto sweep model, measured on CPU benchmark models)
PUBLISHED = {
    "paradigms (Shih et al. 2023, SD-v2 DDPM-1000, A100s)": {1: 0.7, 4: 2.3, 8: 3.2},
    "srds (arXiv 2412.08292)": "SD timings on 4 A100s; see the paper's tables (not restated: not re-checked here)",
}
GUIDED_ROWS = 2


def srds_ms(steps: int, iters: int, pipelined: bool, world: int, allgather_ms: float) -> tuple[float, int]:
    plan = build_tick_plan(steps, default_num_blocks(steps), iters, pipelined)
    calls = [t.rows * GUIDED_ROWS for t in plan.ticks]
    return sum(tick_ms(H200_SD2_MS, r, world, allgather_ms) for r in calls), len(calls)


def paradigms_ms(steps: int, world: int, allgather_ms: float) -> tuple[float, int, int]:
    window = min(steps, max(1, round(math.sqrt(steps))) * 2)  # the widest of autotune.window_widths
    sweeps = math.ceil(steps / max(1.0, PARADIGMS_SLIDE * window))
    return sweeps * tick_ms(H200_SD2_MS, window * GUIDED_ROWS, world, allgather_ms), sweeps, window


def project(allgather_ms: float) -> dict:
    rows = []
    for steps in STEPS:
        base = steps * tick_ms(H200_SD2_MS, GUIDED_ROWS)  # serial on one GPU: the reference
        for world in WORLDS:
            entries = {"serial": (steps * tick_ms(H200_SD2_MS, GUIDED_ROWS, world, allgather_ms), steps)}
            for k in SRDS_ITERATIONS:
                entries[f"srds plain k={k}"] = srds_ms(steps, k, False, world, allgather_ms)
                entries[f"srds pipelined k={k}"] = srds_ms(steps, k, True, world, allgather_ms)
            ms, sweeps, window = paradigms_ms(steps, world, allgather_ms)
            entries["paradigms (w=2*round(sqrt N))"] = (ms, sweeps)
            for name, (ms, calls) in entries.items():
                rows.append({"steps": steps, "gpus": world, "sampler": name, "sequential_calls": calls,
                             "projected_ms": round(ms, 1), "speedup_vs_serial_1gpu": round(base / ms, 2)})
    return {"kind": "PROJECTED", "date": datetime.date.today().isoformat(), "latency_curve_ms": H200_SD2_MS,
            "latency_source": "H200 SD2-base CUDA graph, fp16, /work/shared/DESIGN.md", "allgather_ms": allgather_ms,
            "assumptions": {"srds_iterations": SRDS_ITERATIONS, "blocks": "default_num_blocks(N)",
                            "paradigms_slide": PARADIGMS_SLIDE, "images": 1, "guidance": "2 engine rows per state",
                            "layout": "rows sharded over ranks, one all-gather per tick (srds_trt.distributed)"},
            "published": PUBLISHED, "rows": rows}


def markdown(result: dict) -> str:
    names = sorted({r["sampler"] for r in result["rows"]}, key=lambda n: [r["sampler"] for r in result["rows"]].index(n))
    out = [f"PROJECTED speedup vs serial on 1 GPU (all-gather {result['allgather_ms']} ms per tick), SD2-base, 1 image, CFG",
           "", "| N | sampler | calls | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |", "|---|---|---|---|---|---|---|"]
    for steps in STEPS:
        for name in names:
            cells = {r["gpus"]: r for r in result["rows"] if r["steps"] == steps and r["sampler"] == name}
            out.append(f"| {steps} | {name} | {cells[1]['sequential_calls']} | "
                       + " | ".join(f"{cells[w]['speedup_vs_serial_1gpu']:.2f}x ({cells[w]['projected_ms']:.0f} ms)" for w in WORLDS) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--allgather-ms", type=float, default=ALLGATHER_MS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    result = project(args.allgather_ms)
    out = args.out or Path("benchmarks/results") / f"multigpu-projection-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
