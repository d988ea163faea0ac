"""The sweeps the sliding-window samplers need at the tol users pass, and auto's affine fit to them.

    python -m benchmarks.expected_sweeps [--tol T] [--out FILE] [--quick]

srds_trt.autotune.pricing predicts a sliding-window sampler's sequential calls as a * N / w + b sweeps at the tol asked
(autotune.WINDOW_SWEEPS: fits at tol 1e-2, 1e-3, 1e-4, i.e. `--tol 1e-2`, the default and `--tol 1e-4`; committed
as benchmarks/results/expected-sweeps/tol1e-{2,3,4}.json). This runs the registry's samplers
(sampling.SAMPLERS: `tol` = max-abs distance to serial, run at the calibrated per-point threshold
stopping.window_accept_tol) at one tol (default: the default tol) on the matched benchmark's cases (the four
mixtures at N = 196 and 1024, the digits model with guidance at N = 100, 196 (10 images) and 1024 (4)), both windows round(sqrt N) and
2 round(sqrt N), and fits (a, b) on the slow side: a by least squares through the measured sweeps, b raised until
three of four runs need no more than predicted. Prints the table and the fit; writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from srds_trt.autotune.pricing import window_widths
from srds_trt.samplers.window import WINDOW_SAMPLERS
from srds_trt.samplers import SAMPLERS, serial_sample
from srds_trt.samplers.stopping import DEFAULT_TOL

from .cases import MIXTURES, build_case, mixture_case

def fit(points: list[tuple[float, int]], quantile: float = 0.75) -> tuple[float, float]:
    """(a, b) of sweeps ~ a * (N / w) + b on the slow side: a by least squares, b the `quantile` of the residuals
    (0.75: three of four measured runs need no more than predicted; 1.0, every run, let the single slowest case,
    digits N = 1024 at w = 32, make every prediction 10-15 sweeps pessimistic)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    a = round(max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0, 0.0), 2)
    residuals = sorted(y - a * x for x, y in zip(xs, ys))
    b = residuals[min(len(residuals), math.ceil(quantile * len(residuals))) - 1]
    return a, math.ceil(b * 10 - 1e-9) / 10


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL)
    parser.add_argument("--quick", action="store_true", help="two mixtures at N=196 (a harness check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    jobs = [(name, steps) for name in MIXTURES for steps in (196, 1024)] + [("digits", n) for n in (100, 196, 1024)]
    if args.quick:
        jobs = [("hard2", 196), ("wide2", 196)]
    rows = []
    start = time.perf_counter()
    with tqdm(total=len(jobs) * 4, desc="runs", file=sys.stderr, dynamic_ncols=True) as bar:
        for name, requested in jobs:
            images = 4 if requested >= 1000 else 10  # as benchmarks.matched: fewer images at N >= 1000
            case = build_case("digits", images=images, device=torch.device("cpu")) if name == "digits" else \
                mixture_case(name, images=64, device=torch.device("cpu"))
            timesteps, alphas, steps = case.grid(requested)
            with torch.inference_mode():
                serial = serial_sample(case.model, case.x, timesteps, alphas, prediction_type=case.prediction_type)
            for sampler in WINDOW_SAMPLERS:
                for w in window_widths(steps):  # round(sqrt N) and 2 round(sqrt N), as auto prices them
                    with torch.inference_mode():
                        result = SAMPLERS[sampler](case.model, case.x, timesteps, alphas, tol=args.tol, window=w,
                                                   prediction_type=case.prediction_type)
                    err = float((result.sample.double() - serial.double()).abs().max())
                    rows.append({"case": name, "steps": steps, "sampler": sampler, "window": w,
                                 "sweeps": result.sequential_calls, "n_over_w": steps / w, "err_max": err,
                                 "within_tol": err <= args.tol})
                    bar.update(1)
                    bar.write(f"{name:6s} N={steps:<5d} {sampler:10s} w={w:<3d} sweeps {result.sequential_calls:<4d} "
                              f"err {err:.1e}")
    fits = {s: fit([(r["n_over_w"], r["sweeps"]) for r in rows if r["sampler"] == s]) for s in WINDOW_SAMPLERS}
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "tol": args.tol,
              "rows": rows, "fit_a_b": fits, "all_within_tol": all(r["within_tol"] for r in rows),
              "wall_s": time.perf_counter() - start}
    print(f"fit (a, b) of sweeps = a N/w + b, slow side: {fits}; every run within tol: {result['all_within_tol']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
