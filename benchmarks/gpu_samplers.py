"""GPU check of every sampler on the path users run (SRDSPipeline, which `python -m srds_trt.generate` calls): every
sampler's wall clock, first call (capture) apart from steady state, beside serial, and what --sampler auto picks.

    python -m benchmarks.gpu_samplers --out DIR [--smoke] [--sections digits,sd2,sd3,flux] [--budget-s 300]

Per model and N, one pipeline (one process, one engine) runs serial, SRDS (pipelined, the stopping rule),
ParaDiGMS (window round(sqrt N) and 2 round(sqrt N)), eps-Picard and auto: each twice or more on the same noise;
the first call builds/captures its runner (stats first_call, setup_s), the later ones replay (steady state, median).
The error is max |sample - serial sample| of that same pipeline. Results are written after every measurement, so a
run cut short by its budget still returns what it measured. --smoke shrinks everything to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

SAMPLERS = (("serial", {}), ("srds", {}), ("paradigms", {"window": "sqrt"}), ("paradigms", {"window": "2sqrt"}),
            ("eps-picard", {}), ("auto", {}))


def _window(spec, steps):
    root = round(steps ** 0.5)
    return {"sqrt": root, "2sqrt": 2 * root}.get(spec, spec)


def measure(pipe, prompt, steps, sampler, options, *, tol, repeats, reference=None):
    """One sampler at one N: first call, then `repeats` steady calls on the same noise; stats of the last call."""
    kwargs = dict(num_inference_steps=steps, sampler=sampler, tol=tol, generator=0, progress_bar=False)
    if "window" in options:
        kwargs["window"] = _window(options["window"], steps)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = pipe(prompt, **kwargs)
    sync()
    first_s = time.perf_counter() - start
    first_stats = out.stats
    steady = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = pipe(prompt, **kwargs)
        sync()
        steady.append(time.perf_counter() - start)
    s = out.stats
    row = {"sampler": sampler, "chosen": s.get("sampler"), "steps": steps, "tol": tol,
           "window": kwargs.get("window", s.get("window")), "blocks": s.get("blocks"),
           "first_call_s": first_s, "first_call_setup_s": first_stats.get("setup_s"),
           "steady_s_median": statistics.median(steady) if steady else None, "steady_s_all": steady,
           "steady_first_call_flag": s.get("first_call"),
           "sequential_calls": s.get("sequential_calls"), "model_evals": s.get("model_evals"),
           "iterations": s.get("iterations"), "converged": s.get("converged"), "accept_tol": s.get("accept_tol"),
           "tol_used": s.get("tol_used"), "engine_noise_floor": s.get("engine_noise_floor"),
           "host_reads": s.get("host_reads"), "host_read_ms": s.get("host_read_ms"), "slides": s.get("slides")}
    if "auto" in s:
        auto = s["auto"]
        row["auto"] = {k: auto.get(k) for k in ("sampler", "options", "reason", "candidates", "fallback",
                                                "curve_source", "latency_per_rows_ms")}
    if reference is not None:
        row["max_abs_err_vs_serial"] = float((out.samples.double() - reference.double()).abs().max())
    return row, out.samples


def section(model, args, device, record, deadline):
    from srds_trt.pipeline import SRDSPipeline

    smoke = args.smoke
    if model == "digits":
        dtype = torch.float32
        pipe = SRDSPipeline.from_pretrained("digits", device=device, dtype=dtype)
        prompt, tol = "3", args.tol
        steps_list = [16] if smoke else args.digits_steps
        repeats = 1 if smoke else 3
    else:  # sd2 (DDIM UNet) or sd3 / flux (flow-matching transformers): random weights at the real shapes
        dtype = getattr(torch, args.sd_dtype) if device.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        pipe = SRDSPipeline.from_pretrained(model, device=device, dtype=dtype, random_weights=True,
                                            resolution=64 if smoke else None)
        record[f"{model}_load_s_{args.sd_dtype}"] = time.perf_counter() - t0
        prompt, tol = "a photograph of an astronaut riding a horse", args.sd_tol
        steps_list = [4] if smoke else (args.sd_steps if model == "sd2" else args.flow_steps)
        repeats = 1 if smoke else 2
    label = model if model == "digits" else f"{model}-{str(dtype).replace('torch.', '')}"
    record.setdefault(label, {})["dtype"] = str(dtype)
    for steps in steps_list:
        rows = record[label].setdefault(f"N{steps}", [])
        reference = None
        for sampler, options in SAMPLERS:
            if time.perf_counter() > deadline:
                record.setdefault("skipped", []).append(f"{model} N={steps} {sampler} {options}: budget spent")
                continue
            try:
                row, sample = measure(pipe, prompt, steps, sampler, options, tol=tol, repeats=repeats,
                                      reference=reference)
                if sampler == "serial":
                    reference = sample
                    row["max_abs_err_vs_serial"] = 0.0
                if reference is not None and "steady_s_median" in row and rows and rows[0]["sampler"] == "serial":
                    serial_s = rows[0]["steady_s_median"]
                    if serial_s and row["steady_s_median"]:
                        row["speedup_vs_serial_steady"] = serial_s / row["steady_s_median"]
                rows.append(row)
                print(f"{label} N={steps} {sampler:10s} {options} first {row['first_call_s']:.3f}s steady "
                      f"{row['steady_s_median'] or float('nan'):.4f}s calls {row['sequential_calls']} "
                      f"err {row.get('max_abs_err_vs_serial', float('nan')):.2e} chosen {row['chosen']}", flush=True)
            except Exception:  # noqa: BLE001 - one failure must not lose the rest of the run
                record.setdefault("errors", {})[f"{model} N={steps} {sampler} {options}"] = traceback.format_exc()[-3000:]
                print(f"{model} N={steps} {sampler} FAILED: {traceback.format_exc().splitlines()[-1]}", flush=True)
            write(record, args)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    del pipe


def write(record, args):
    path = Path(args.out) / "gpu_samplers.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu-samplers")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sections", default="digits,sd2")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new measurements after this")
    parser.add_argument("--tol", type=float, default=1e-3, help="digits tolerance (fp32)")
    parser.add_argument("--sd-tol", type=float, default=1e-2, help="SD2 / SD3 / Flux tolerance (fp16 latents)")
    parser.add_argument("--digits-steps", type=int, nargs="+", default=[1024, 196, 100])
    parser.add_argument("--sd-steps", type=int, nargs="+", default=[50, 25])
    parser.add_argument("--flow-steps", type=int, nargs="+", default=[28], help="sd3 / flux sections (their default N)")
    parser.add_argument("--sd-dtype", default="float16", choices=["float16", "float32"],
                        help="float32 runs with TF32 off (the runtime's fp32), to separate fp16 noise from the sampler")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    deadline = time.perf_counter() + args.budget_s
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
              "tol": {"digits": args.tol, "sd2, sd3, flux": args.sd_tol}, "section_seconds": {}}
    for name in args.sections.split(","):
        model, _, dtype = name.partition(":")  # e.g. sd2:float32
        if dtype:
            args.sd_dtype = dtype
        start = time.perf_counter()
        try:
            section(model, args, device, record, deadline)
        except Exception:  # noqa: BLE001
            record.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            print(f"{name} FAILED: {traceback.format_exc().splitlines()[-1]}", flush=True)
        record["section_seconds"][name] = time.perf_counter() - start
        write(record, args)
    print(json.dumps(record["section_seconds"]))


if __name__ == "__main__":
    main()
