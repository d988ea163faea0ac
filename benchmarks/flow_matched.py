"""python -m benchmarks.flow_matched [--quick] [--out DIR]: sequential model calls at matched error, flow vs DDIM.

For each case and N: serial, SRDS (pipelined, default blocks, the stopping rule), ParaDiGMS and eps-Picard (and
eps-Picard without its prior slope, the flow counterpart of the Gaussian-data slope being new) are run over a tol
grid (the registry's meaning: max-abs distance to the serial sample); for each target error (1e-2, 1e-3) the
cheapest run (sequential calls, then model evaluations) whose MEASURED max-abs error vs the serial sample of the
same solver is <= the target is quoted. Grids are walked loose to tight and stop two runs after the tightest target
was first met.

Cases, each beside its DDIM counterpart on the same starting noise:
- flow-hard2: samplers/flow.hard_flow_mixture (analytic.hard_mixture's data under the flow path; exact velocity,
  float64) on the SD3 grid (shift 3); flux-hard2: the same on FLUX.1-dev's 1024 px grid (FluxPipeline's sigmas,
  dynamic shift); ddim-hard2: analytic.hard_mixture on cases.GMM_SCHEDULER.
- flow-digits: the embedded digits-flow model (CFG 4, fp32); ddim-digits: the embedded digits model.
Results: results.json + results.md under --out (default benchmarks/results/flow-matched/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from srds_trt.samplers import SAMPLERS, run_at_tol, serial_sample
from srds_trt.samplers.eps_picard import eps_picard_experiment

from .run import RESULTS_DIR, machine_info

TOLS = (1e-1, 3e-2, 1e-2, 5e-3, 3e-3, 1e-3, 5e-4, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
TARGETS = (1e-2, 1e-3)
VARIANTS = ("srds", "paradigms", "eps-picard", "eps-picard-no-prior")


def run_variant(variant: str, model, x, grid, schedule, tol: float):
    """A sampler at the caller's tol; the ablation runs at the same per-point threshold as eps-Picard."""
    if variant == "eps-picard-no-prior":
        return run_at_tol("eps-picard", tol, lambda threshold: eps_picard_experiment(
            model, x, grid, schedule, tol=threshold, prior_slope=False))
    return SAMPLERS[variant](model, x, grid, schedule, tol=tol)


def mixture_cases(images: int):
    from srds_trt.models.analytic import hard_mixture
    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.samplers.flow import FlowMatchEuler, flow_sigmas, hard_flow_mixture

    from .cases import GMM_SCHEDULER

    x = torch.randn(images, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, alphas = ddim_grid(GMM_SCHEDULER, 1)
    flow = hard_flow_mixture(dim=2)
    yield "flow-hard2", flow, x, lambda n: (flow_sigmas({"num_train_timesteps": 1000, "shift": 3.0}, n), FlowMatchEuler())
    yield "flux-hard2", flow, x, lambda n: (flux_grid(n), FlowMatchEuler())
    yield "ddim-hard2", hard_mixture(alphas), x, lambda n: ddim_grid(GMM_SCHEDULER, n)


def flux_grid(steps: int) -> torch.Tensor:
    """FLUX.1-dev's grid at 1024 px as FluxPipeline builds it: linspace(1, 1/N, N), dynamically shifted for 4096
    image tokens (samplers.solver.solver_grid with family="flux")."""
    from srds_trt.models.transformers import transformer_config
    from srds_trt.samplers.solver import solver_grid

    scheduler = transformer_config("flux")["scheduler"]
    return solver_grid(scheduler, steps, "flow", (16, 128, 128), family="flux")[0]


def digits_cases(images: int):
    from srds_trt.models import load_unet, unet_model_fn
    from srds_trt.samplers.guidance import classifier_free_guidance
    from srds_trt.samplers.solver import solver_grid

    labels = torch.arange(images) % 10
    for name, model_name in (("flow-digits", "digits-flow"), ("ddim-digits", "digits")):
        loaded = load_unet(model_name)
        model = classifier_free_guidance(unet_model_fn(loaded), labels, torch.full_like(labels, loaded.null_class), 4.0)
        x = torch.randn(images, *loaded.sample_shape, generator=torch.Generator().manual_seed(0))
        yield name, model, x, (lambda n, loaded=loaded: solver_grid(loaded.scheduler_config, n, loaded.spec.prediction_type,
                                                                    loaded.sample_shape)[:2])


def run_case(name, model, x, grid_for, steps: int) -> dict:
    grid, schedule = grid_for(steps)
    start = time.perf_counter()
    serial = serial_sample(model, x, grid, schedule)
    row = {"case": name, "N": steps, "serial": {"sequential_calls": steps, "seconds": time.perf_counter() - start},
           "samplers": {}}
    for variant in VARIANTS:
        runs, met_at = [], None
        for i, tol in enumerate(TOLS):
            start = time.perf_counter()
            result = run_variant(variant, model, x, grid, schedule, tol)
            error = float((result.sample.double() - serial.double()).abs().max())
            runs.append({"tol": tol, "error": error, "sequential_calls": result.sequential_calls,
                         "model_evals": result.model_evals, "iterations": result.iterations,
                         "seconds": round(time.perf_counter() - start, 3)})
            if met_at is None and error <= min(TARGETS):
                met_at = i
            if met_at is not None and i >= met_at + 2:
                break
        best = {}
        for target in TARGETS:
            ok = [r for r in runs if r["error"] <= target]
            best[f"{target:g}"] = min(ok, key=lambda r: (r["sequential_calls"], r["model_evals"])) if ok else None
        row["samplers"][variant] = {"best": best, "runs": runs}
        print(f"{name} N={steps} {variant}: " + ", ".join(
            f"{t}: {b['sequential_calls'] if b else '-'}" for t, b in best.items()), flush=True)
    return row


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"# Sequential calls at matched max-abs error vs serial (flow Euler beside DDIM)", "",
             f"{info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}, {info['date']}.", "",
             "| case | N | target | serial | SRDS | ParaDiGMS | eps-Picard | eps-Picard, no prior |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for target in TARGETS:
            cells = []
            for variant in VARIANTS:
                best = row["samplers"][variant]["best"][f"{target:g}"]
                cells.append(str(best["sequential_calls"]) if best else "-")
            lines.append(f"| {row['case']} | {row['N']} | {target:g} | {row['N']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 28 only, fewer images")
    parser.add_argument("--mixtures-only", action="store_true")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="run only these cases; the other cases' rows are kept from OUT/results.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "flow-matched")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    mixture_steps = (28,) if args.quick else (28, 100, 196)
    wanted = (lambda name: args.cases is None or name in args.cases)  # noqa: E731
    for case in mixture_cases(8 if args.quick else 32):
        rows += [run_case(*case, steps) for steps in mixture_steps if wanted(case[0])]
    if not args.mixtures_only and (args.cases is None or any(c.endswith("digits") for c in args.cases)):
        digits_steps = (28,) if args.quick else (28, 100)
        for case in digits_cases(10):
            rows += [run_case(*case, steps) for steps in digits_steps if wanted(case[0])]
    if args.cases is not None and (args.out / "results.json").is_file():  # keep the other cases' committed rows
        kept = [r for r in json.loads((args.out / "results.json").read_text())["rows"] if r["case"] not in args.cases]
        order = ["flow-hard2", "flux-hard2", "ddim-hard2", "flow-digits", "ddim-digits"]
        rows = sorted(kept + rows, key=lambda r: (order.index(r["case"]) if r["case"] in order else 99, r["N"]))
    info = machine_info("cpu")
    if args.cases is not None:
        info["rerun_cases"] = args.cases  # the date is theirs; the other rows come from the previous full run
    args.out.mkdir(parents=True, exist_ok=True)
    for file, text in (("results.json", json.dumps({"machine": info, "targets": TARGETS, "tols": TOLS, "rows": rows},
                                                    indent=1) + "\n"), ("results.md", markdown(rows, info))):
        fd, tmp = tempfile.mkstemp(dir=args.out, prefix=f".{file}")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out / file)
    print(markdown(rows, info))


if __name__ == "__main__":
    sys.exit(main())
