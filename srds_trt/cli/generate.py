"""python -m srds_trt.generate: sample with SRDS (or serial DDIM) and write images, a grid and stats.

With no arguments: the embedded digits model, one image of each digit 0..9 (100 DDIM steps, 10 SRDS blocks,
pipelined), compared against the serial sampler, written to out/ (000.png ... 009.png, grid.png, stats.json),
and a summary table printed. A thin shell over srds_trt.SRDSPipeline.

Every failure is one line on stderr, `srds_trt.generate: error: ...`, naming the flag, with these exit codes:
0 done; 2 refused (bad input, bad or missing export, engine refusal; before the model loads where the check
allows); 3 numerical failure (NaN/Inf reached the sample: nothing written); 4 the machine could not hold or write
the outputs (disk full, memory); 130 interrupted (Ctrl-C: nothing written); 143 terminated (SIGTERM, e.g. torchrun
ending the job after another rank died: nothing written). Outputs are atomic: a run writes into
a temporary folder beside --out and renames it into place; a non-empty --out is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .common import EXIT_INTERRUPTED, EXIT_TERMINATED, HelpFormatter, Parser, UsageError, check_resolution, exit_on_signals
from .output import OutputWriter, auto_line, summary_table

EXIT_OK, EXIT_USAGE, EXIT_NONFINITE, EXIT_RESOURCES = 0, 2, 3, 4
PROG = "srds_trt.generate"
EXPORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}  # --dtype -> export's

EXAMPLES = """examples:
  python -m srds_trt.generate                                   # digits 0..9, SRDS vs serial, into out/
  python -m srds_trt.generate --prompt 3 7 --num-images 4 --steps 1024 --out runs/a
  python -m srds_trt.generate --sampler serial --quiet --out runs/serial --overwrite
  python -m srds_trt.generate --backend onnxruntime --engine-dir engines --out runs/onnx   # after python -m srds_trt.export
  python -m srds_trt.generate --model sd2 --random-weights --prompt "a red cat" --steps 25 --device cuda --dtype float16
  python -m srds_trt.generate --list-models

exit codes: 0 done, 2 refused (bad input or export), 3 NaN/Inf in the sample, 4 out of disk or memory,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Nothing is written unless the whole run succeeds."""


class Terminated(Exception):
    """SIGTERM arrived while the run was writing: unwind so the temporary output folder is removed."""


def raise_on_signals() -> None:
    """From the first output on: SIGINT / SIGTERM raise, so the output writer's cleanup runs before the one line."""
    import signal

    def terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminated)


def build_parser() -> argparse.ArgumentParser:
    from ..samplers import DEFAULT_TOL
    from ..settings import DEFAULT_STEPS, FAMILY_STEPS, MAX_STEPS, SAMPLERS

    p = Parser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                formatter_class=lambda prog: HelpFormatter(prog, max_help_position=32))
    p.add_argument("--list-models", action="store_true", help="list the models --model accepts and exit")
    p.add_argument("--model", default="digits", help="registry name (digits, digits-flow, sd2, sd2.1, sd1.5, sd3, flux), local folder or hub id")
    p.add_argument("--prompt", nargs="+", action="extend", default=None,
                   help='digits: one or more of "0".."9" (unset: all ten); SD: the text (unset: ""); may repeat')
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (processed in chunks that fit memory)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"solver steps N (1..{MAX_STEPS}): DDIM, or flow-matching Euler for flow models (unset: "
                        f"{DEFAULT_STEPS}; SD3 and Flux: {FAMILY_STEPS['sd3']}, their pipelines' default)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, 0 <= seed < 2^64")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (must be empty or new, see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, after the run)")
    p.add_argument("--sampler", choices=SAMPLERS, default="srds",
                   help="auto: srds_trt.autotune.pricing picks from the measured latency curve")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="max-abs distance to the serial sample accepted")
    p.add_argument("--blocks", type=int, default=None,
                   help="SRDS blocks (unset: about sqrt(3 x steps), the fewest pipelined calls: 17 at 100 steps)")
    p.add_argument("--window", type=int, default=None,
                   help="points per sweep of --sampler eps-picard / paradigms (unset: 2 round(sqrt(steps)) / round(sqrt(steps)))")
    p.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=True,
                   help="pipelined SRDS: each segment starts as soon as its start state exists")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance, 0..1000 (unset: the model's, digits 4, SD 7.5)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (unset: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), default=None,
                   help="UNet precision for --backend torch (unset: float32); exported backends use the export's")
    p.add_argument("--compare-serial", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the serial sampler and report the difference (unset: on for digits, off for SD)")
    p.add_argument("--random-weights", action="store_true", help="real architecture, seeded random weights (timing)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (SD, SD3, Flux; None: the model's)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="torch (PyTorch UNet; CUDA graphs on a GPU), onnxruntime (exported ONNX, CPU), tensorrt (exported plan, GPU)")
    p.add_argument("--engine-dir", type=Path, default=Path("engines"),
                   help="python -m srds_trt.export output (a model's export folder, or the folder above it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    p.add_argument("--dist-timeout", type=float, default=120.0,
                   help="under torchrun: seconds a rank waits for the others before the job ends")
    return p


def list_models() -> str:
    from ..models.registry import KNOWN_MODELS, RANDOM_WEIGHT_CONFIGS

    width = max(len("model"), *map(len, KNOWN_MODELS))
    lines = [f"{'model':<{width}}  family  resolution  prediction     weights"]
    for name, spec in KNOWN_MODELS.items():
        weights = "embedded" if spec.family == "digits" else \
            f"{spec.source} (hub cache or a local folder{'; --random-weights' if name in RANDOM_WEIGHT_CONFIGS else ''})"
        lines.append(f"{name:<{width}}  {spec.family:<7} {spec.resolution:>10}  {spec.prediction_type:<13}  {weights}")
    lines.append("--model also takes a local diffusers folder or a cached hub id")
    return "\n".join(lines)


def check_args(args: argparse.Namespace):
    """Everything that can be refused without loading a model; returns the resolved ModelSpec."""
    from ..models import UnknownModelError, resolve_model
    from ..pipeline import DIGIT_PROMPTS, WINDOW_SAMPLERS
    from ..settings import SettingError, check_guidance_scale, check_run_args, check_seed, default_steps

    try:
        spec = resolve_model(args.model)
    except UnknownModelError as exc:
        raise UsageError(str(exc)) from None
    if spec.family == "digits" and args.prompt is not None:
        bad = [p for p in args.prompt if p.strip() not in DIGIT_PROMPTS]
        if bad:
            raise UsageError(f"--prompt for the digits model must be digits 0..9, got {bad[0]!r}")
    check_resolution(spec, args.resolution)
    if args.steps is None:
        args.steps = default_steps(spec.family)
    try:
        check_run_args(args.steps, args.tol, args.blocks, args.sampler, args.num_images)
        check_seed(args.seed)
        if args.guidance_scale is not None:
            check_guidance_scale(args.guidance_scale)
    except SettingError as exc:
        raise UsageError(flag_message(exc)) from None
    if not (args.dist_timeout > 0 and args.dist_timeout < float("inf")):
        raise UsageError(f"--dist-timeout must be a finite number of seconds > 0, got {args.dist_timeout:g}")
    if args.window is not None and not 1 <= args.window <= args.steps:
        raise UsageError(f"--window must be in [1, --steps={args.steps}], got {args.window}")
    if args.sampler not in ("srds", "auto") and (args.blocks is not None or not args.pipelined):
        warnings.warn(f"--blocks and --no-pipelined apply to --sampler srds only; ignored for --sampler {args.sampler}")
    if args.sampler == "auto" and (args.blocks is not None or args.window is not None):
        warnings.warn("--sampler auto chooses the block count (or window) itself; --blocks / --window are ignored")
    if args.window is not None and args.sampler not in (*WINDOW_SAMPLERS, "auto"):
        warnings.warn(f"--window applies to --sampler eps-picard / paradigms only; ignored for --sampler {args.sampler}")
    check_device(args)
    check_out(args.out, args.overwrite)
    check_backend(args, spec)
    return spec


def flag_message(exc) -> str:
    """A SettingError ("steps must be ...") worded for the command line ("--steps must be ...")."""
    return "--" + exc.setting.replace("_", "-") + str(exc)[len(exc.setting):]


def check_device(args: argparse.Namespace) -> None:
    """--device names a device this machine has: refused before any model loads."""
    if args.device is None:
        return
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is visible to PyTorch here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")


def check_backend(args: argparse.Namespace, spec) -> None:
    """Exported backends need their artifacts (and TensorRT a GPU): refuse before loading anything."""
    if args.backend == "torch":
        return
    if args.backend == "tensorrt":
        import torch

        if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
            raise UsageError("--backend tensorrt needs a CUDA GPU; use --backend onnxruntime or torch on a CPU")
    elif args.device is not None and args.device.split(":")[0] != "cpu":
        raise UsageError("--backend onnxruntime runs on the CPU (drop --device or use --device cpu)")
    else:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            raise UsageError('--backend onnxruntime needs onnxruntime: pip install "srds_trt[onnx]" (in a checkout: '
                             'pip install -e ".[onnx]")')
    from ..export.artifacts import ArtifactError, read_manifest
    from ..export.artifacts import TensorRTUnavailableError
    from ..runtime.executor import artifact_folder

    try:
        folder = artifact_folder(args.engine_dir, spec.name, args.backend)
        exported = read_manifest(folder).get("request", {}).get("dtype")
    except (ArtifactError, TensorRTUnavailableError) as exc:
        raise UsageError(str(exc)) from None
    if args.dtype is not None and exported is not None and EXPORT_DTYPES.get(args.dtype, args.dtype) != exported:
        raise UsageError(f"--dtype {args.dtype} does not match the export at {folder} ({exported}); drop --dtype "
                         f"or re-export with python -m srds_trt.export --dtype {args.dtype}")


def check_out(out: Path, overwrite: bool) -> None:
    """--out must be new, empty, or replaceable (--overwrite), and its parent writable; nothing is created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not writable: it is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} is not empty; pass --overwrite to replace it, or choose a new folder")
    probe = out.absolute().parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"--out {out} is not writable: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} is not writable ({probe} denies writing)")


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _refusal_types() -> tuple[type, ...]:
    """Errors that mean "refused" (exit 2): bad exports, engine limits, missing weights, ONNX Runtime's own."""
    from ..export.artifacts import ArtifactError
    from ..models import WeightsUnavailableError
    from ..runtime.engines.base import EngineError

    types: list[type] = [ArtifactError, EngineError, WeightsUnavailableError, ValueError]
    try:
        from ..export.artifacts import TensorRTUnavailableError

        types.append(TensorRTUnavailableError)
    except ImportError:
        pass
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, NoSuchFile

        types += [Fail, InvalidArgument, InvalidGraph, NoSuchFile]
    except ImportError:
        pass
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    except Terminated:
        return _fail("terminated (SIGTERM: under torchrun, another rank failed or the job was stopped); nothing was "
                     "written", EXIT_TERMINATED)


def _main(argv: list[str] | None) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"{PROG}: warning: {message}", file=sys.stderr)
        try:
            args = build_parser().parse_args(argv)
            if args.list_models:
                print(list_models())
                return EXIT_OK
            spec = check_args(args)
        except UsageError as exc:
            return _fail(str(exc), EXIT_USAGE)

    import torch

    from ..pipeline import SRDSPipeline
    from ..samplers.stopping import NonFiniteError

    device = args.device or ("cuda" if torch.cuda.is_available() and args.backend != "onnxruntime" else "cpu")
    from ..runtime.distributed import DistributedError, init_from_env, local_device, torchrun_world

    group = None
    try:  # under torchrun (WORLD_SIZE/RANK set): one job across the ranks, gloo on CPU, NCCL on CUDA
        if torchrun_world() is not None:
            device = str(local_device(device))
            group = init_from_env(torch.device(device), args.dist_timeout)
    except (DistributedError, RuntimeError, ValueError) as exc:
        return _fail(f"torchrun (--dist-timeout {args.dist_timeout:g}): {str(exc).splitlines()[0]}", EXIT_USAGE)
    compare = args.compare_serial if args.compare_serial is not None else spec.family == "digits"
    refused = _refusal_types()
    writer = None
    try:
        pipe = SRDSPipeline.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype or "float32"),
                                            random_weights=args.random_weights, seed=args.seed,
                                            resolution=args.resolution, backend=args.backend,
                                            engine_dir=args.engine_dir, process_group=group)
        rank0 = group is None or torch.distributed.get_rank(group) == 0  # every rank holds the same samples
        raise_on_signals()
        writer = OutputWriter(args.out, args.overwrite) if rank0 else None
        chunks = []
        for chunk in pipe.iter_chunks(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                      generator=torch.Generator().manual_seed(args.seed), sampler=args.sampler,
                                      tol=args.tol, num_blocks=args.blocks, pipelined=args.pipelined,
                                      window=args.window, num_images_per_prompt=args.num_images,
                                      compare_serial=compare, progress_bar=not args.quiet):
            if writer is not None:
                writer.add(chunk.images)
            chunk.images = chunk.samples = None  # written: memory stays bounded whatever --num-images
            chunks.append(chunk)
            total_chunks = chunk.stats["chunks"]
            if not args.quiet and total_chunks > 1:
                done = chunk.start + len(chunk.prompts)
                print(f"{PROG}: chunk {len(chunks)}/{total_chunks}: {done}/{chunk.stats['images']} images", file=sys.stderr)
        stats, _ = pipe.summarize(chunks)
        stats.update(seed=args.seed, random_weights=args.random_weights, **_export_fields(pipe))
        for line in stats["warnings"]:
            print(f"{PROG}: warning: {line}", file=sys.stderr)
        if writer is None:
            return EXIT_OK
        writer.finish(stats)
    except DistributedError as exc:  # another rank died, raised or timed out: one line, no hang
        return _fail(str(exc), 1)
    except NonFiniteError as exc:
        return _fail(f"{exc} (nothing written)", EXIT_NONFINITE)
    except refused as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        return _fail(f"out of memory ({exc or 'allocation failed'}); use fewer --num-images or --blocks", EXIT_RESOURCES)
    except OSError as exc:
        return _fail(f"could not write --out {args.out}: {exc}", EXIT_RESOURCES)
    finally:
        if writer is not None:
            writer.abort()  # a no-op after a successful finish (the folder was renamed into place)
    if not args.quiet:
        if "auto" in stats:
            print(auto_line(stats["auto"]))
        print(summary_table(stats))
        print(f"wrote {len(writer.names)} image(s), grid.png and stats.json to {args.out}/")
    return EXIT_OK


def _export_fields(pipe) -> dict:
    """Which export a run used (stats.json): its folder and manifest id; nothing for the PyTorch model."""
    folder = getattr(pipe.runtime, "artifacts", None)
    if folder is None:
        return {}
    from ..export.artifacts import read_manifest

    manifest = read_manifest(folder)
    return {"export_dir": str(folder), "export_id": manifest.get("key")}


def _exit(code: int) -> None:
    """Exit the command. After a failure inside a torch.distributed job, exit without the interpreter's teardown:
    a gloo group whose peer died still has transport threads, and destroying them at shutdown aborts the process
    with a second stderr line ("terminate called without an active exception") after our one error line."""
    import torch.distributed as dist

    if code != EXIT_OK and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_on_signals(PROG, "nothing was written")
    _exit(main())
