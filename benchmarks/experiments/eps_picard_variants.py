"""Experiment: eps-Picard warm-start variants (wide-baseline extrapolation) at matched error, reusing
benchmarks.matched's Run/_sweep/matched. Results and conclusions: docs/experiments/eps-picard-warm-start.md.

Usage: python benchmarks/experiments/eps_picard_variants.py OUT.json CASE STEPS IMAGES [variants...]
The coarse warm-start variants (coarse_steps) lost everywhere and left the sampler; they run at commit d68db7c."""
import json, math, sys
from dataclasses import asdict
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks import matched as M
from benchmarks.cases import build_case, mixture_case
from srds_trt.eps_picard import eps_picard_sample
from srds_trt.paradigms import paradigms_sample
from srds_trt.sampling import serial_sample

def variants(steps):
    w = min(2 * round(math.sqrt(steps)), steps)
    q = max(1, w // 4)
    return {
        "eps-picard": {},
        "span8": {"extrapolate_span": 8},
        f"span-w/4": {"extrapolate_span": q},
        f"lsq-w/4": {"extrapolate_fit": "lsq", "extrapolate_span": q},
    }

def main():
    out, case_name, steps_req, images = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    names = sys.argv[5:]
    torch.set_num_threads(1)
    if case_name == "digits":
        case = build_case("digits", images=images, device=torch.device("cpu"))
        ep_tols = tuple(t for t in M.EPS_PICARD_TOLS if t <= 3e-2)
    else:
        case = mixture_case(case_name, images=images, device=torch.device("cpu"))
        ep_tols = M.EPS_PICARD_TOLS
    timesteps, alphas, steps = case.grid(steps_req)
    model = M._Width(case.model, images)
    common = dict(prediction_type=case.prediction_type)
    with torch.inference_mode():
        reference = serial_sample(model, case.x, timesteps, alphas, **common)
    runs = []
    try:
        runs = [M.Run(**r) for r in json.load(open(out))["runs"]]
    except FileNotFoundError:
        pass
    done = {r.sampler for r in runs}

    def one(sampler, fn, window, tol, **kw):
        return M.measure(case, model, timesteps, alphas, reference, sampler, fn, window, tol, **kw)

    def log_run(r):
        print(f"  {r.case} N={r.steps} {r.sampler:<16} w={r.window:<3} tol={r.tol:<7g} seq={r.sequential_calls:<4} "
              f"evals/img={r.evals_per_image:<6.0f} err {r.err_max:.2e} widest {r.max_points_per_call} ({r.wall_s:.1f}s)", flush=True)

    def save():
        json.dump({"case": case.name, "description": case.description, "steps": steps, "images": images,
                   "variants": variants(steps), "runs": [asdict(r) for r in runs], "matched": M.matched(runs)},
                  open(out, "w"), indent=1)

    width = max(1, round(math.sqrt(steps)))
    V = variants(steps)
    for name in names:
        if name in done:
            continue
        if name == "paradigms":
            for window in (width, 2 * width):
                runs += M._sweep(lambda tol: one("paradigms", paradigms_sample, window, tol), M.PARADIGMS_TOLS, log_run)
        else:
            runs += M._sweep(lambda tol: one(name, eps_picard_sample, min(2 * width, steps), tol, **V[name]), ep_tols, log_run)
        save()

if __name__ == "__main__":
    main()
