"""python -m srds_trt.generate: sample with SRDS (or serial DDIM) and write images, a grid and stats.

With no arguments: the embedded digits model, one image of each digit 0..9 (100 DDIM steps, 10 SRDS blocks),
compared against the serial sampler, written to out/ (000.png ... 009.png, grid.png, stats.json), and a
summary table printed. A thin shell over srds_trt.SRDSPipeline; every bad input is refused with one line on
stderr and exit code 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_STEPS, SAMPLERS
    from .sampling import DEFAULT_TOL

    p = _Parser(prog="python -m srds_trt.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits", help="registry name (digits, sd2, sd2.1, sd1.5), local folder or hub id")
    p.add_argument("--prompt", nargs="+", default=None,
                   help='digits: one or more of "0".."9" (default: all ten); SD: the text (default: "")')
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    p.add_argument("--sampler", choices=SAMPLERS, default="srds")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="SRDS stopping tolerance (est. max-abs distance to serial)")
    p.add_argument("--blocks", type=int, default=None, help="SRDS blocks (default: round(sqrt(steps)))")
    p.add_argument("--pipelined", action="store_true", help="pipelined SRDS (fewer sequential model calls)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (digits 4, SD 7.5)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), default="float32")
    p.add_argument("--compare-serial", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the serial sampler and report the difference (default: on for digits, off for SD)")
    p.add_argument("--random-weights", action="store_true", help="real architecture, seeded random weights (timing)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (SD; default: the model's)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="torch (PyTorch UNet; CUDA graphs on a GPU), onnxruntime (exported ONNX, CPU), tensorrt (exported plan, GPU)")
    p.add_argument("--engine-dir", type=Path, default=Path("engines"),
                   help="python -m srds_trt.export output (a model's export folder, or the folder above it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    return p


def check_args(args: argparse.Namespace):
    """Everything that can be refused without loading a model; returns the resolved ModelSpec."""
    from .models import UnknownModelError, resolve_model
    from .pipeline import DIGIT_PROMPTS, check_run_args

    try:
        spec = resolve_model(args.model)
    except UnknownModelError as exc:
        raise UsageError(str(exc)) from None
    if spec.family == "digits" and args.prompt is not None:
        bad = [p for p in args.prompt if p.strip() not in DIGIT_PROMPTS]
        if bad:
            raise UsageError(f"--prompt for the digits model must be digits 0..9, got {bad[0]!r}")
    try:
        check_run_args(args.steps, args.tol, args.blocks, args.sampler, args.num_images)
    except ValueError as exc:
        raise UsageError(str(exc).replace("num-images", "--num-images")) from None
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UsageError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    check_writable(args.out)
    check_backend(args, spec)
    return spec


def check_backend(args: argparse.Namespace, spec) -> None:
    """Exported backends need their artifacts (and TensorRT a GPU): refuse before loading anything."""
    if args.backend == "torch":
        return
    if args.backend == "tensorrt":
        import torch

        if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
            raise UsageError("--backend tensorrt needs a CUDA GPU; use --backend onnxruntime or torch on a CPU")
    elif args.device not in (None, "cpu"):
        raise UsageError("--backend onnxruntime runs on the CPU (drop --device or use --device cpu)")
    from .export.artifacts import ArtifactError
    from .export.trt_import import TensorRTUnavailableError
    from .runtime.sampler import artifact_folder

    try:
        artifact_folder(args.engine_dir, spec.name, args.backend)
    except (ArtifactError, TensorRTUnavailableError) as exc:
        raise UsageError(str(exc)) from None


def check_writable(out: Path) -> None:
    """--out must be a writable folder or creatable in one; checked without creating anything."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"--out {out} is not writable: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} is not writable ({probe} denies writing)")


def write_outputs(out_dir: Path, output, extra: dict) -> list[str]:
    from .images import make_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(output.images):
        names.append(f"{i:03d}.png")
        image.save(out_dir / names[-1])
    make_grid(output.images).save(out_dir / "grid.png")
    stats = {**output.stats, **extra, "files": names + ["grid.png"]}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return names


def summary_table(stats: dict) -> str:
    """Serial vs SRDS: iterations, blocks, model evaluations, sequential evaluations, wall time, max difference."""
    images = stats["images"]
    header = ("sampler", "iterations", "blocks", "model evals/image", "sequential evals", "wall time s", "max |diff| vs serial")
    rows = []
    serial = stats.get("serial") if stats["sampler"] == "srds" else stats
    if serial is not None:
        rows.append(("serial", "-", "1", f"{serial['model_evals'] / images:.0f}", str(serial["sequential_calls"]),
                     f"{serial['wall_time_s']:.3f}", "0"))
    if stats["sampler"] == "srds":
        diff = stats.get("max_abs_diff_vs_serial")
        rows.append(("SRDS" + (" pipelined" if stats["pipelined"] else ""), str(stats["iterations"]),
                     str(stats["blocks"]), f"{stats['model_evals'] / images:.0f}", str(stats["sequential_calls"]),
                     f"{stats['wall_time_s']:.3f}", "-" if diff is None else f"{diff:.2e}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    title = (f"{stats['model']}: {images} image(s), {stats['steps']} DDIM steps, guidance {stats['guidance_scale']}, "
             f"{stats['device']} {stats['dtype']}")
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        spec = check_args(args)
    except UsageError as exc:
        print(f"srds_trt.generate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    import torch

    from .pipeline import SRDSPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() and args.backend != "onnxruntime" else "cpu")
    compare = args.compare_serial if args.compare_serial is not None else spec.family == "digits"
    from .runtime.engines.base import EngineError
    from .models import WeightsUnavailableError

    try:
        pipe = SRDSPipeline.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype),
                                            random_weights=args.random_weights, seed=args.seed,
                                            resolution=args.resolution, backend=args.backend,
                                            engine_dir=args.engine_dir)
    except (WeightsUnavailableError, EngineError) as exc:
        print(f"srds_trt.generate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        output = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                      generator=torch.Generator().manual_seed(args.seed), sampler=args.sampler, tol=args.tol,
                      num_blocks=args.blocks, pipelined=args.pipelined, num_images_per_prompt=args.num_images,
                      compare_serial=compare, progress_bar=not args.quiet)
    except EngineError as exc:  # e.g. the export holds fewer rows than this run needs
        print(f"srds_trt.generate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    write_outputs(args.out, output, {"seed": args.seed, "random_weights": args.random_weights})
    if not args.quiet:
        print(summary_table(output.stats))
        print(f"wrote {len(output.images)} image(s), grid.png and stats.json to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
