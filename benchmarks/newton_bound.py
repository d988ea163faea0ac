"""python -m benchmarks.newton_bound [--steps N ...] [--mixture NAME] [--out DIR]: what an EXACT Jacobian would buy
eps-Picard at matched error (the digits rows). A bound, not a sampler.

eps-Picard moves each stale model output to the state of this sweep along a quasi-Newton model of d out / d x (a
scalar secant, a rank-1 Broyden term, the neighbour's slope for a point's first correction). Given `jvp=` it uses
the exact derivative instead, Newton's correction. That is not a parallel sampler: the correction at point j needs
the derivative along x_j(this sweep) - x_j(evaluated), known only after step j - 1 of the recurrence, so a sweep's
w corrections are w SEQUENTIAL derivative calls, which the sampler's sequential_calls does not count (they are
reported here as jvp_calls). What it measures: the fewest sequential model calls ANY Jacobian model could give this
sliding window (same window, warm start and acceptance rule) at equal width. Where even Newton misses 0.6x
ParaDiGMS, no cheaper correction reaches the goal; where Newton reaches it, the gap is the Jacobian model's.

The derivative is a central finite difference, (f(x + h d) - f(x - h d)) / 2h with max|h d| = 1e-2 (both sides in
one batched call; exact for a model linear in x, tested). ParaDiGMS's counts are read from the committed matched
results (--paradigms, default matched: sequential calls are deterministic and hardware-free); the
quasi-Newton eps-Picard is re-run here beside the bound, over the same tolerance grid (matched.EPS_PICARD_TOLS).
Results: results.json + results.md under --out (default benchmarks/results/newton-bound/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from srds_trt.samplers.eps_picard import eps_picard_experiment, eps_picard_sample
from srds_trt.samplers.window import default_window
from srds_trt.samplers import serial_sample

from .cases import MIXTURES, build_case, mixture_case
from .matched import EPS_PICARD_TOLS, TARGETS, _sweep, _Width, matched, measure
from .run import RESULTS_DIR, machine_info

PARADIGMS_RESULTS = RESULTS_DIR / "matched" / "results.json"
GOAL = 0.6  # the goal: at most 0.6x ParaDiGMS's sequential calls


class FiniteDifferenceJVP:
    """jvp(x, t, d) ~ d model(x, t) / dx . d by a central difference whose perturbation has max-abs `step`;
    `calls` counts the (sequential) derivative calls. A zero direction costs no call and returns zeros."""

    def __init__(self, model, step: float = 1e-2):
        self.model, self.step, self.calls = model, step, 0

    def __call__(self, x: Tensor, t: Tensor, direction: Tensor) -> Tensor:
        size = float(direction.abs().max())
        if size == 0:
            return torch.zeros_like(direction)
        h = self.step / size
        self.calls += 1
        both = self.model(torch.cat([x + h * direction, x - h * direction]), torch.cat([t, t]))
        plus, minus = both.to(direction.dtype).chunk(2)
        return (plus - minus) / (2 * h)


def paradigms_counts(path: Path) -> dict[tuple[str, int, float], int]:
    """(case, N, target) -> ParaDiGMS's sequential calls (better window) from a matched results.json."""
    rows = json.loads(path.read_text())["matched"]
    return {(r["case"], r["steps"], r["target"]): r["paradigms"]["sequential_calls"]
            for r in rows if r.get("paradigms")}


def bench(case, steps_list, log) -> tuple[list, dict[tuple[str, int, float], int]]:
    """eps-Picard and its Newton bound over the tol grid at each N; returns the runs and the derivative calls of
    each Newton run by (case, N, tol)."""
    images, runs, jvp_calls = case.x.shape[0], [], {}
    for requested in steps_list:
        timesteps, alphas, steps = case.grid(requested)
        model = _Width(case.model, images)
        with torch.inference_mode():
            reference = serial_sample(model, case.x, timesteps, alphas, prediction_type=case.prediction_type)
        window = default_window("eps-picard", steps)

        def quasi_newton(tol):
            return measure(case, model, timesteps, alphas, reference, "eps-picard", eps_picard_sample, window, tol)

        def newton(tol):
            jvp = FiniteDifferenceJVP(case.model)
            run = measure(case, model, timesteps, alphas, reference, "eps-picard-newton", eps_picard_experiment, window,
                          tol, jvp=jvp)
            jvp_calls[run.case, run.steps, run.tol] = jvp.calls
            return run

        def log_run(r):
            log(f"  {r.case} N={r.steps} {r.sampler:<18} tol={r.tol:<7g} seq={r.sequential_calls:<4} "
                f"err {r.err_max:.2e} ({r.wall_s:.1f}s)")

        runs += _sweep(quasi_newton, EPS_PICARD_TOLS, log_run)
        runs += _sweep(newton, EPS_PICARD_TOLS, log_run)
    return runs, jvp_calls


def rows(runs, jvp_calls: dict, paradigms: dict) -> list[dict]:
    """Per (case, N, target): ParaDiGMS (committed), the goal's allowance, eps-Picard and the Newton bound."""
    out = []
    for row in matched(runs):
        pd = paradigms.get((row["case"], row["steps"], row["target"]))
        entry = {"case": row["case"], "steps": row["steps"], "target": row["target"], "paradigms_calls": pd,
                 "allowed_calls": None if pd is None else math.floor(GOAL * pd + 1e-9)}
        for name in ("eps-picard", "eps-picard-newton"):
            best = row.get(name)
            entry[name] = best
            entry[f"{name}_ratio"] = None if best is None or pd is None else best["sequential_calls"] / pd
        best = row.get("eps-picard-newton")
        entry["newton_jvp_calls"] = jvp_calls.get((row["case"], row["steps"], best["tol"])) if best else None
        out.append(entry)
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# What an exact Jacobian would buy eps-Picard ({m['date'][:10]}, {m['cpu']}, {m['cpu_count']} cores, "
             f"torch {m['torch']})", "",
             "Sequential model calls at matched max-abs error vs serial (hardware-free). ParaDiGMS: the better window, "
             f"from `{results['paradigms_from']}`. Newton = eps-Picard with the exact derivative (finite differences) "
             "in place of its quasi-Newton model: NOT a parallel sampler (its derivatives are sequential: the last "
             "column), the bound on what any Jacobian model could buy the same window.", "",
             "| case | N | target | ParaDiGMS | allowed (0.6x) | eps-Picard | ratio | Newton bound | ratio "
             "| derivative calls it hides |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(best):
        return "–" if best is None else f"{best['sequential_calls']} (tol {best['tol']:g}, err {best['err_max']:.1e})"

    def ratio(value):
        return "–" if value is None else (f"**{value:.2f}**" if value <= GOAL + 1e-9 else f"{value:.2f}")

    for r in results["rows"]:
        lines.append(f"| {r['case']} | {r['steps']} | {r['target']:g} | {r['paradigms_calls'] or '–'} | "
                     f"{r['allowed_calls'] or '–'} | {cell(r['eps-picard'])} | {ratio(r['eps-picard_ratio'])} | "
                     f"{cell(r['eps-picard-newton'])} | {ratio(r['eps-picard-newton_ratio'])} | "
                     f"{r['newton_jvp_calls'] if r['newton_jvp_calls'] is not None else '–'} |")
    lines += ["", f"Wall time: {results['total_wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.newton_bound", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 196, 1024])
    parser.add_argument("--mixture", choices=tuple(MIXTURES), default=None,
                        help="run this analytic mixture (64 samples, float64) instead of the digits UNet")
    parser.add_argument("--images", type=int, default=10, help="digits images at N < 1000 (matched.py's)")
    parser.add_argument("--images-large", type=int, default=4, help="digits images at N >= 1000 (matched.py's)")
    parser.add_argument("--paradigms", type=Path, default=PARADIGMS_RESULTS,
                        help="a matched results.json with ParaDiGMS's counts")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.paradigms.is_file():
        raise SystemExit(f"error: no ParaDiGMS results at {args.paradigms} (run python -m benchmarks.matched)")
    out = args.out or RESULTS_DIR / "newton-bound"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core box (run.py says why)
    try:
        start, runs, jvp_calls = time.perf_counter(), [], {}
        cpu = torch.device("cpu")
        if args.mixture:
            groups = [(mixture_case(args.mixture, images=64, device=cpu), args.steps)]
        else:
            small, large = [n for n in args.steps if n < 1000], [n for n in args.steps if n >= 1000]
            groups = [(build_case("digits", images=k, device=cpu), steps)
                      for k, steps in ((args.images, small), (args.images_large, large)) if steps]
        for case, steps in groups:
            got_runs, got_calls = bench(case, steps, log)
            runs, jvp_calls = runs + got_runs, {**jvp_calls, **got_calls}
        source = args.paradigms.relative_to(Path.cwd()) if args.paradigms.is_relative_to(Path.cwd()) else args.paradigms
        results = {"machine": machine_info("cpu"), "paradigms_from": str(source), "targets": TARGETS,
                   "tols": EPS_PICARD_TOLS,
                   # jvp_calls: the Newton runs' derivative calls (None: a quasi-Newton run, it makes none)
                   "runs": [{**asdict(r), "jvp_calls": jvp_calls.get((r.case, r.steps, r.tol))
                             if r.sampler == "eps-picard-newton" else None} for r in runs],
                   "rows": rows(runs, jvp_calls, paradigms_counts(args.paradigms)),
                   "total_wall_s": time.perf_counter() - start}
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"), ("results.md", markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    print(markdown(results), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
