"""python -m benchmarks.matched [--quick] [--out DIR]: eps-Picard vs ParaDiGMS at matched error.

The issue-13 goal: at most 0.6x ParaDiGMS's sequential model calls at matched max-abs error vs the serial DDIM
sample (targets 1e-2 and 1e-3), at equal parallel width (<= 2 round(sqrt N) trajectory points per image in any
call). Matching is by MEASURED error, as in run.py: for each sampler and target, the cheapest run (sequential
calls, then evaluations) over that sampler's tolerance grid whose max-abs error vs serial is <= the target.

Fairness to ParaDiGMS: both windows, round(sqrt N) and 2 round(sqrt N), each over a dense tolerance grid
(PARADIGMS_TOLS, ~3 per decade); the better window is quoted. eps-Picard runs at 2 round(sqrt N) only, over
EPS_PICARD_TOLS. Every grid is walked from loose to tight and stops two runs after the tightest target was first
met (tighter tolerances only add calls; the second run guards against a non-monotone error curve).

Ablations (what each eps-Picard mechanism buys): "eps-picard" is the default; "-frozen" replaces the
extrapolated warm start with the frozen last output, "-no-inherit" drops the slope inherited by a point's first
evaluation, "-no-broyden" the rank-1 term of the quasi-Newton model, "-no-prior" the first sweep's prior slope
(the default until 2026-11-27b), "-base" all four (the sampler as it was before 2026-11-27, except that the
frozen output is the secant-corrected one). Mixtures run every ablation, digits only the default and
"-no-prior" (CPU time; digits' "-base" is in matched-2026-11-27b).

Cases: the analytic mixtures of cases.MIXTURES (exact models, float64) at N = 196 and 1024 and the embedded digits
UNet with classifier-free guidance (cases.py "digits", fp32) at N = 100, 196, 1024 (N = 1024 with few images
and a coarser grid: minutes per run on 2 CPU cores). Results: results.json + results.md under --out (default
benchmarks/results/matched/, the latest run). On two cores, run parts in two processes and join them:
`python -m benchmarks.matched --digits-steps --out A & python -m benchmarks.matched --mixtures --out B;
python -m benchmarks.matched --merge A B`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from srds_trt.samplers.eps_picard import eps_picard_experiment, eps_picard_sample
from srds_trt.samplers.paradigms import paradigms_sample
from srds_trt.samplers import serial_sample

from .cases import MIXTURES, CaseUnavailable, build_case, mixture_case
from .run import RESULTS_DIR, machine_info

PARADIGMS_TOLS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01, 7e-3, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4, 2e-4,
                  1e-4, 5e-5, 2e-5, 1e-5)
EPS_PICARD_TOLS = (1e-1, 5e-2, 3e-2, 2e-2, 1e-2, 7e-3, 5e-3, 3e-3, 2e-3, 1e-3, 7e-4, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5,
                   2e-5, 1e-5, 5e-6, 2e-6, 1e-6)
# digits N = 1024: every other tolerance (time box); "odd" runs the other half, so two processes (or two sessions)
# can cover the dense grid and --merge joins them
LARGE_GRIDS = {"even": slice(None, None, 2), "odd": slice(1, None, 2), "all": slice(None)}
TARGETS = (1e-2, 1e-3)
ABLATIONS = {
    "eps-picard": {},
    "eps-picard-frozen": {"extrapolate": 0},
    "eps-picard-no-inherit": {"inherit_slope": False},
    "eps-picard-no-broyden": {"broyden": False},
    "eps-picard-no-prior": {"prior_slope": False},
    "eps-picard-base": {"extrapolate": 0, "inherit_slope": False, "broyden": False, "prior_slope": False},
}
DIGITS_ABLATIONS = ("eps-picard", "eps-picard-no-prior")


@dataclass(frozen=True)
class Config:
    mixtures: tuple[str, ...] = tuple(MIXTURES)
    mixture_steps: tuple[int, ...] = (196, 1024)
    mixture_samples: int = 64
    digits_steps: tuple[int, ...] = (100, 196, 1024)
    digits_images: int = 10
    digits_images_large: int = 4  # N >= 1000
    quick: bool = False
    large_grid: str = "even"  # LARGE_GRIDS key: the tolerances run for digits at N >= 1000


QUICK = dict(mixtures=("hard2", "mix16"), mixture_steps=(196,), mixture_samples=16, digits_steps=(100,),
             digits_images=4, quick=True)


@dataclass
class Run:
    case: str
    steps: int
    sampler: str  # "paradigms" or an ABLATIONS key
    window: int
    tol: float
    sequential_calls: int
    evals_per_image: float
    err_max: float
    wall_s: float
    max_points_per_call: int
    # share of the N points evaluated 1, 2, 3, >= 4 times (evaluations_per_point; None in results before 2026-11-27b)
    evals_share: tuple[float, float, float, float] | None = None


def evaluations_per_point(steps: int, window: int, slides: list[int]) -> list[int]:
    """How often each point 0..N-1 was evaluated by a sliding-window sampler, from its slides: every sweep
    evaluates the points begin .. min(begin + window, N) - 1, then begin moves by the slide.

    Why it matters (the goal's arithmetic): a point whose first evaluation is not already at (within tol of) its
    final state is evaluated again there, so it costs >= 2 rows, and a call holds <= window rows per image; the
    sequential calls are >= sum(evaluations) / window."""
    counts, begin = [0] * steps, 0
    for slide in slides:
        for j in range(begin, min(begin + window, steps)):
            counts[j] += 1
        begin += slide
    return counts


def evals_share(counts: list[int]) -> tuple[float, float, float, float]:
    n = max(len(counts), 1)
    return tuple(sum(1 for c in counts if (c >= 4 if k == 4 else c == k)) / n for k in (1, 2, 3, 4))


class _Width:
    """Model wrapper recording the most trajectory points per image in any call (the equal-width check)."""

    def __init__(self, model, images: int):
        self.model, self.images, self.widest = model, images, 0

    def __call__(self, x, t):
        self.widest = max(self.widest, x.shape[0] // self.images)
        return self.model(x, t)


def _sweep(run_one, tols, log_run) -> list[Run]:
    """Runs tols loose to tight; stops two runs after the tightest target was first reached."""
    runs, met = [], 0
    for tol in tols:
        runs.append(run_one(tol))
        log_run(runs[-1])
        if runs[-1].err_max <= min(TARGETS) or met:
            met += 1
        if met >= 3:
            break
    return runs


def measure(case, model: _Width, timesteps, alphas, reference, sampler: str, fn, window: int, tol: float,
            **kw) -> Run:
    """One run of sampler function `fn` on `case` (through the width-recording `model`) at (window, tol): its
    sequential calls, evaluations per image, max-abs error vs `reference`, wall time, widest call, evaluation
    shares."""
    images, steps = case.x.shape[0], len(timesteps) - 1
    model.widest = 0
    start = time.perf_counter()
    with torch.inference_mode():
        result = fn(model, case.x, timesteps, alphas, tol=tol, window=window, prediction_type=case.prediction_type,
                    **kw)
    err = float((result.sample.double() - reference.double()).abs().max())
    share = evals_share(evaluations_per_point(steps, result.window, result.slides))
    return Run(case.name, steps, sampler, result.window, tol, result.sequential_calls, result.model_evals / images,
               err, time.perf_counter() - start, model.widest, share)


def bench(case, steps_list, ablations, *, coarse_from: int | None, bar, log, large_grid: str = "even") -> list[Run]:
    images = case.x.shape[0]
    runs: list[Run] = []
    for requested in steps_list:
        timesteps, alphas, steps = case.grid(requested)
        model = _Width(case.model, images)
        common = dict(prediction_type=case.prediction_type)
        with torch.inference_mode():
            reference = serial_sample(model, case.x, timesteps, alphas, **common)
        coarse = coarse_from is not None and steps >= coarse_from

        def one(sampler, fn, window, tol, **kw):
            return measure(case, model, timesteps, alphas, reference, sampler, fn, window, tol, **kw)

        def log_run(r: Run):
            bar.update(1)
            log(f"  {r.case} N={r.steps} {r.sampler:<22} w={r.window:<3} tol={r.tol:<7g} seq={r.sequential_calls:<4} "
                f"evals/img={r.evals_per_image:<6.0f} err {r.err_max:.2e} ({r.wall_s:.1f}s)")

        width = max(1, round(math.sqrt(steps)))
        grid = LARGE_GRIDS[large_grid] if coarse else slice(None)
        pd_tols, ep_tols = PARADIGMS_TOLS[grid], EPS_PICARD_TOLS[grid]
        for window in (width, 2 * width):
            runs += _sweep(lambda tol: one("paradigms", paradigms_sample, window, tol), pd_tols, log_run)
        for name in ablations:
            runs += _sweep(lambda tol: one(name, eps_picard_experiment, min(2 * width, steps), tol, **ABLATIONS[name]),
                           ep_tols, log_run)
    return runs


def matched(runs: list[Run]) -> list[dict]:
    """Per (case, N, target): each sampler's cheapest run with err_max <= target, and eps-Picard / ParaDiGMS."""
    rows = []
    for case, steps in dict.fromkeys((r.case, r.steps) for r in runs):
        mine = [r for r in runs if (r.case, r.steps) == (case, steps)]
        for target in TARGETS:
            row = {"case": case, "steps": steps, "target": target}
            for sampler in dict.fromkeys(r.sampler for r in mine):
                ok = [r for r in mine if r.sampler == sampler and r.err_max <= target]
                best = min(ok, key=lambda r: (r.sequential_calls, r.evals_per_image), default=None)
                row[sampler] = None if best is None else {
                    "sequential_calls": best.sequential_calls, "evals_per_image": best.evals_per_image,
                    "window": best.window, "tol": best.tol, "err_max": best.err_max, "evals_share": best.evals_share}
            pd, ep = row.get("paradigms"), row.get("eps-picard")
            row["ratio"] = ep["sequential_calls"] / pd["sequential_calls"] if pd and ep else None
            rows.append(row)
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    samplers = [s for s in ("eps-picard", *ABLATIONS) if any(s in row for row in results["matched"])]
    samplers = list(dict.fromkeys(samplers))
    lines = [f"# eps-Picard vs ParaDiGMS at matched error ({m['date']})", "",
             f"{m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} thread), "
             f"{m['platform']}. " + (f"Wall time of the parts (run as concurrent processes): "
                                     f"{', '.join(f'{s:.0f} s' for s in results['parts_wall_s'])}. "
                                     if "parts_wall_s" in results else
                                     f"Total wall time {results['total_wall_s']:.0f} s. ") +
             "Counts are sequential model calls (hardware-free latency), measured on this CPU.", ""]
    for name, case in results["cases"].items():
        lines.append(f"- **{name}**: {case}")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"- **{name}: skipped** — {why}")
    lines += ["", "Matched: the cheapest run (sequential calls) over each sampler's tolerance grid whose measured "
              "max-abs error vs the serial DDIM sample is <= the target. ParaDiGMS: the better of windows "
              "round(sqrt N) and 2 round(sqrt N); eps-Picard: window 2 round(sqrt N). Goal: ratio <= 0.6.", "",
              "| case | N | target | ParaDiGMS calls (w, tol) | eps-Picard calls (tol) | ratio | evals/img PD | "
              "evals/img eps-P | " + " | ".join(samplers[1:]) + " |",
              "|---|---|---|---|---|---|---|---|" + "---|" * (len(samplers) - 1)]

    def calls(cell, with_window=False):
        if cell is None:
            return "not reached"
        return f"{cell['sequential_calls']} ({cell['window']}, {cell['tol']:g})" if with_window else \
            f"{cell['sequential_calls']} ({cell['tol']:g})"

    for row in results["matched"]:
        pd, ep = row.get("paradigms"), row.get("eps-picard")
        if row["ratio"] is None:
            ratio = "–"
        else:
            ratio = f"**{row['ratio']:.2f}**" if row["ratio"] <= 0.6 else f"{row['ratio']:.2f}"
        per_image = [("–" if cell is None else f"{cell['evals_per_image']:.0f}") for cell in (pd, ep)]
        extra = [("–" if s not in row else "not reached" if row[s] is None else str(row[s]["sequential_calls"]))
                 for s in samplers[1:]]
        cells = [row["case"], str(row["steps"]), f"{row['target']:g}", calls(pd, True), calls(ep), ratio,
                 *per_image, *extra]
        lines.append("| " + " | ".join(cells) + " |")
    met = [r for r in results["matched"] if r["ratio"] is not None]
    lines += ["", f"Goal (ratio <= 0.6) met in {sum(r['ratio'] <= 0.6 for r in met)} of {len(met)} rows "
              f"(rows where both samplers reached the target).", ""]
    return "\n".join(lines + budget_table(results["matched"])) + "\n"


def budget_table(rows: list[dict]) -> list[str]:
    """Where the calls go (evaluations_per_point): the rows per point a call count of 0.6x ParaDiGMS allows at
    the sampler's window, beside what the matched runs spent."""
    have = [r for r in rows if r["ratio"] is not None
            and all(r[s].get("evals_share") is not None for s in ("eps-picard", "paradigms"))]
    if not have:
        return []
    lines = ["## Where the calls go", "",
             "Every point is evaluated at (within tol of) its final state before the window leaves it; a point "
             "whose first evaluation was not already there costs a second one. A call holds at most w rows per "
             "image, so calls >= evaluations / w. 'allowed' = floor(0.6 x ParaDiGMS calls) x w / N: the "
             "evaluations per point the goal leaves at full windows; 'use' = evaluations / (calls x w) (the "
             "first window and the tail are narrower or wasted). Shares: points evaluated 1 / 2 / 3 / >= 4 times.",
             "", "| case | N | target | allowed / point | eps-Picard / point | use | eps-Picard shares | "
             "ParaDiGMS / point | ParaDiGMS shares |", "|---|---|---|---|---|---|---|---|---|"]
    for row in have:
        ep, pd, steps = row["eps-picard"], row["paradigms"], row["steps"]
        allowed = math.floor(0.6 * pd["sequential_calls"]) * ep["window"] / steps
        use = ep["evals_per_image"] / (ep["sequential_calls"] * ep["window"])
        shares = lambda cell: " / ".join(f"{100 * x:.0f}" for x in cell["evals_share"]) + " %"  # noqa: E731
        lines.append(f"| {row['case']} | {steps} | {row['target']:g} | {allowed:.2f} | "
                     f"{ep['evals_per_image'] / steps:.2f} | {use:.2f} | {shares(ep)} | "
                     f"{pd['evals_per_image'] / steps:.2f} | {shares(pd)} |")
    return lines + [""]


def run(config: Config, out: Path, log=print) -> dict:
    from tqdm import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core box (run.py says why)
    try:
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        cases, skipped, runs = {}, {}, []
        jobs = [("mixture", name) for name in config.mixtures] + ([("digits", "digits")] if config.digits_steps else [])
        # rough bar total: ~12 runs per window and ablation
        total = 12 * (len(config.mixtures) * len(config.mixture_steps) * (2 + len(ABLATIONS))
                      + len(config.digits_steps) * (2 + len(DIGITS_ABLATIONS)))
        with tqdm(total=total, desc="matched runs", file=sys.stderr, dynamic_ncols=True) as bar:
            quiet = lambda msg: bar.write(msg) if log else None  # noqa: E731
            for kind, name in jobs:
                if kind == "mixture":
                    case = mixture_case(name, images=config.mixture_samples, device=torch.device("cpu"))
                    cases[name] = case.description
                    runs += bench(case, config.mixture_steps, ABLATIONS, coarse_from=None, bar=bar, log=quiet)
                    continue
                try:
                    small = [n for n in config.digits_steps if n < 1000]
                    large = [n for n in config.digits_steps if n >= 1000]
                    for images, steps in ((config.digits_images, small), (config.digits_images_large, large)):
                        if not steps:
                            continue
                        case = build_case("digits", images=images, device=torch.device("cpu"))
                        cases[f"digits (N={','.join(map(str, steps))})"] = case.description
                        runs += bench(case, steps, DIGITS_ABLATIONS, coarse_from=1000, bar=bar, log=quiet,
                                      large_grid=config.large_grid)
                except CaseUnavailable as exc:
                    skipped["digits"] = str(exc)
        results = {"machine": machine_info("cpu"), "config": asdict(config), "cases": cases, "skipped": skipped,
                   "paradigms_tols": PARADIGMS_TOLS, "eps_picard_tols": EPS_PICARD_TOLS, "ablations": ABLATIONS,
                   "runs": [asdict(r) for r in runs], "matched": matched(runs),
                   "total_wall_s": time.perf_counter() - start}
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(markdown(results))
        if log:
            log((out / "results.md").read_text())
        return results
    finally:
        torch.set_num_threads(threads)


def merge(parts: list[Path], out: Path, log=print) -> dict:
    """One results folder from several partial runs (e.g. mixtures and digits run as two processes on two cores):
    runs, cases and configs concatenated, the matched table recomputed."""
    loaded = [json.loads((part / "results.json").read_text()) for part in parts]
    runs = [Run(**r) for part in loaded for r in part["runs"]]
    results = {"machine": loaded[0]["machine"], "config": [part["config"] for part in loaded],
               "cases": {k: v for part in loaded for k, v in part["cases"].items()},
               "skipped": {k: v for part in loaded for k, v in part["skipped"].items()},
               "paradigms_tols": PARADIGMS_TOLS, "eps_picard_tols": EPS_PICARD_TOLS, "ablations": ABLATIONS,
               "runs": [asdict(r) for r in runs], "matched": matched(runs),
               "parts_wall_s": [part["total_wall_s"] for part in loaded],
               "total_wall_s": sum(part["total_wall_s"] for part in loaded)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    if log:
        log((out / "results.md").read_text())
    return results


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path, list[Path] | None]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.matched", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two mixtures at N=196, digits N=100 with 4 images")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/matched[-quick])")
    parser.add_argument("--mixtures", nargs="*", choices=tuple(MIXTURES), default=None)
    parser.add_argument("--mixture-steps", nargs="*", type=int, default=None)
    parser.add_argument("--digits-steps", nargs="*", type=int, default=None, help="empty: no digits")
    parser.add_argument("--digits-images", type=int, default=None)
    parser.add_argument("--digits-images-large", type=int, default=None, help="images at N >= 1000 (default 4)")
    parser.add_argument("--large-grid", choices=tuple(LARGE_GRIDS), default=None,
                        help="digits at N >= 1000: every other tolerance (even, the default), the other half (odd; "
                             "--merge it with an even run for the dense grid) or all")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="merge these result folders (partial runs) into --out instead of running")
    args = parser.parse_args(argv)
    kwargs = dict(QUICK) if args.quick else {}
    for key in ("mixtures", "mixture_steps", "digits_steps", "digits_images", "digits_images_large", "large_grid"):
        if getattr(args, key) is not None:
            kwargs[key] = tuple(getattr(args, key)) if isinstance(getattr(args, key), list) else getattr(args, key)
    config = Config(**kwargs)
    return config, args.out or RESULTS_DIR / f"matched{'-quick' if config.quick else ''}", args.merge


def main(argv: list[str] | None = None) -> dict:
    config, out, parts = parse_args(argv)
    if parts:
        return merge(parts, out, log=lambda msg: print(msg, flush=True))
    return run(config, out, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
