"""PROJECTED (not measured) wall clock of SD3-medium- and FLUX.1-dev-shaped sampling, N = 28, on 1/4/8 GPUs.

Every number is `--sampler auto`'s own prediction (srds_trt.autotune.pricing.choose, every candidate it prices),
with the multi-GPU layout of benchmarks/multigpu_projection.py (a tick of R engine rows on K GPUs costs
latency(ceil(R / K)) + all-gather). NO SD3 or Flux timing exists in this workplace (no GPU was lent to this task),
so the per-row latency curve is itself a projection, stated here so it can be replaced by a measured one:

- per-row cost = the transformer's FLOPs (2 x parameters x tokens + 4 x layers x tokens^2 x width for attention;
  tokens = image tokens (1024 px: 64 x 64 latents / 2 x 2 patches = 4096) + text tokens),
- at the throughput xDiT MEASURED for FLUX.1-dev on one H100 with torch.compile (1024 px, 28 steps, 4.30 s;
  xdit-project/xDiT docs/performance/flux.md): one Flux row = 4.30 s / 28 = 154 ms,
- linear in rows from one row up: at 4096+ tokens a row is already compute-bound (DESIGN.md's SD2-base curve at
  64x64 latents is already near-linear from 8 rows), so batching rows buys nothing on one GPU.

Sequential calls come from auto's expectations at --tol (SRDS: autotune.SRDS_ITERATIONS; windows:
autotune.WINDOW_SWEEPS), measured on the CPU benchmark models (DDIM mixtures and digits), not on SD3 / Flux;
benchmarks/flow_matched.py measures them for flow Euler on the flow mixture and digits-flow. Published figures
quoted beside: xDiT (sequence parallel, Flux-dev 28 steps 1024 px, H100: 4.30 s on 1, 1.63 s on 4 = 2.63x) and
ParaFlow (ICLR 2026 submission, openreview 4yk41o1EIc: "up to 4x fewer sequential steps, 2-4x wall clock" on SD3
and Flux; GPU counts not restated here).

    python -m benchmarks.flow_projection [--tol 1e-2 1e-3] [--out benchmarks/results/flow-projection/results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

from srds_trt.autotune.pricing import GPU_SWEEP_OVERHEAD_MS, choose
from srds_trt.samplers.stopping import DEFAULT_TOL

from .multigpu_projection import ALLGATHER_MS, _name

STEPS = 28
WORLDS = (1, 4, 8)
XDIT_FLUX_H100_S = {1: 4.30, 4: 1.63}  # torch.compile, Ulysses-4 (xDiT docs/performance/flux.md)
MODELS = {  # params, layers (double + single), width, text tokens, guidance rows per state
    "sd3-medium": {"params": 2.03e9, "layers": 24, "width": 1536, "text_tokens": 333, "guided": True},
    "flux-dev": {"params": 11.9e9, "layers": 57, "width": 3072, "text_tokens": 512, "guided": False},
}
IMAGE_TOKENS = 4096  # 1024 px


def row_tflop(model: dict) -> float:
    tokens = IMAGE_TOKENS + model["text_tokens"]
    return (2 * model["params"] * tokens + 4 * model["layers"] * tokens**2 * model["width"]) / 1e12


def row_ms(model: dict) -> float:
    flux_ms = 1e3 * XDIT_FLUX_H100_S[1] / STEPS
    return flux_ms * row_tflop(model) / row_tflop(MODELS["flux-dev"])


def project(tol: float, allgather_ms: float = ALLGATHER_MS) -> dict:
    rows = []
    curves = {}
    for name, model in MODELS.items():
        per_row = row_ms(model)
        curve = {r: round(per_row * r, 2) for r in (1, 2, 4, 8, 16, 32, 64, 128)}
        curves[name] = curve
        base = choose(steps=STEPS, guided=model["guided"], latency_ms=curve, samplers=("serial",)).serial_ms
        for world in WORLDS:
            choice = choose(steps=STEPS, guided=model["guided"], latency_ms=curve, world_size=world,
                            allgather_ms=allgather_ms, sweep_overhead_ms=GPU_SWEEP_OVERHEAD_MS, tol=tol)
            for c in choice.candidates:
                rows.append({"model": name, "steps": STEPS, "gpus": world, "sampler": _name(c),
                             "sequential_calls": c.sequential_calls, "projected_ms": round(c.predicted_ms, 1),
                             "speedup_vs_serial_1gpu": round(base / c.predicted_ms, 2),
                             "auto_picks": c.sampler == choice.sampler and c.options == choice.options})
    return {"kind": "PROJECTED", "date": datetime.date.today().isoformat(), "tol": tol, "allgather_ms": allgather_ms,
            "latency_curves_ms": curves, "row_tflop": {n: round(row_tflop(m), 2) for n, m in MODELS.items()},
            "latency_source": "FLOP model calibrated on xDiT's measured FLUX.1-dev 1x H100 torch.compile time "
                              "(4.30 s / 28 steps); linear in rows (compute-bound)",
            "published": {"xDiT Flux-dev 28 steps 1024px H100 (s)": XDIT_FLUX_H100_S,
                          "xDiT speedup 4 GPUs": round(XDIT_FLUX_H100_S[1] / XDIT_FLUX_H100_S[4], 2),
                          "ParaFlow (SD3, Flux)": "up to 4x fewer sequential steps, 2-4x wall clock (abstract)"},
            "rows": rows}


def markdown(result: dict) -> str:
    out = [f"PROJECTED, N = {STEPS}, 1024 px, 1 image, tol {result['tol']:g}; speedup vs serial on 1 GPU; "
           "* = what auto picks at that GPU count", "",
           "| model | sampler | calls | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in WORLDS) + " |",
           "|---|---|---|" + "---|" * len(WORLDS)]
    for model in MODELS:
        for name in dict.fromkeys(r["sampler"] for r in result["rows"] if r["model"] == model):
            cells = {r["gpus"]: r for r in result["rows"] if r["model"] == model and r["sampler"] == name}
            out.append(f"| {model} | {name} | {cells[1]['sequential_calls']} | " + " | ".join(
                f"{cells[w]['speedup_vs_serial_1gpu']:.2f}x ({cells[w]['projected_ms'] / 1e3:.2f} s)"
                f"{'*' if cells[w]['auto_picks'] else ''}" for w in WORLDS) + " |")
    x = result["published"]
    out += ["", f"Published: xDiT Flux-dev (sequence parallel, measured, H100): 1 GPU {XDIT_FLUX_H100_S[1]} s, 4 GPUs "
            f"{XDIT_FLUX_H100_S[4]} s ({x['xDiT speedup 4 GPUs']}x). ParaFlow: {x['ParaFlow (SD3, Flux)']}."]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tol", type=float, nargs="+", default=[1e-2, DEFAULT_TOL])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/flow-projection/results.json"))
    args = p.parse_args(argv)
    results = [project(tol) for tol in args.tol]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = "\n\n".join(markdown(result) for result in results)
    for path, text in ((args.out, json.dumps(results, indent=2) + "\n"), (args.out.with_suffix(".md"), table + "\n")):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    print(table)


if __name__ == "__main__":
    main()
