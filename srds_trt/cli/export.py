"""`python -m srds_trt.export`: export a UNet to ONNX, check it against PyTorch, build a TensorRT plan.

Exit codes: 0 done (prints the artifact folder); 2 bad input, bad artifacts, a failed export/parity/build, a full
disk (one `error:` line on stderr, nothing left behind); 130 interrupted (Ctrl-C; nothing left behind).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .common import HelpFormatter
from ..export.config import DEFAULT_OPSET, DTYPES, EXPORTERS, ExportConfig, ExportConfigError

# widest profile when --max-batch is unset: digits as wide as the pipeline's own chunks (pipeline.MAX_ROWS), so
# every run `generate --backend onnxruntime` makes with its defaults fits; SD as a GPU's memory allows
DEFAULT_MAX_BATCH = {"digits": 512, "sd": 32}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXAMPLES = """examples:
  python -m srds_trt.export --model digits                      # fp32, up to 512 rows: fits generate's runs
  python -m srds_trt.export --model sd2 --random-weights --max-batch 16 --out engines
  python -m srds_trt.export --model ./my-unet-folder --height 512 --width 512 --profiles 2

Several exports of one model may share --out (e.g. after re-exporting with a larger --max-batch);
generate picks the one that fits its run.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m srds_trt.export", description=__doc__, epilog=EXAMPLES,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="registry name (digits, digits-flow, sd2, sd2.1, sd1.5, sd3, flux) or a local folder")
    p.add_argument("--out", type=Path, default=Path("engines"), help="artifact root")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="precision of the ONNX and plan (unset: fp32 for digits, whose CPU runs gain nothing from fp16, "
                        "fp16 for SD)")
    p.add_argument("--min-batch", type=int, default=1, help="profile minimum rows (CFG doubling included)")
    p.add_argument("--opt-batch", type=int, default=None, help="profile optimum rows; None = a mid-range power of 2")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"profile maximum rows (unset: {DEFAULT_MAX_BATCH['digits']} for digits, as wide as generate's "
                        f"own calls, so every default run fits; {DEFAULT_MAX_BATCH['sd']} for SD)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels; None = the model's")
    p.add_argument("--width", type=int, default=None, help="image width in pixels; None = the model's")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                   help="torch.onnx exporter: legacy (TorchScript, fast) or dynamo (torch.export)")
    p.add_argument("--profiles", type=int, default=1, help="identical optimization profiles (one per concurrent context)")
    p.add_argument("--parity-tol", type=float, default=None, help="max relative ONNX-vs-PyTorch error; None = 3e-2 for fp16, 1e-3 for fp32")
    p.add_argument("--random-weights", action="store_true", help="random weights (architecture only, for timing)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and parity inputs")
    p.add_argument("--aoti", action="store_true",
                   help="also write the UNet as an AOTInductor package + sampler.json for the C/C++ runtime "
                        "(libsrds_trt, cpp/); compiling takes about 1-5 min on a small CPU (cached per weights, "
                        "shapes and torch version)")
    p.add_argument("--quiet", action="store_true", help="no staged log")
    p.add_argument("--triton-repo", type=Path, default=None,
                   help="also write a Triton model repository here (srds_trt.serve.triton: UNet plan + sampler model)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        return _fail(f"export needs {', '.join(missing)}: pip install \"srds_trt[onnx]\" (in a checkout: "
                     "pip install -e \".[onnx]\"; TensorRT plans: the tensorrt or tensorrt-rtx extra)")
    family = _family(args.model)
    args.dtype = args.dtype or ("fp32" if family == "digits" else "fp16")
    args.max_batch = args.max_batch or DEFAULT_MAX_BATCH.get(family, DEFAULT_MAX_BATCH["sd"])
    try:
        config = ExportConfig(
            model=args.model, out=args.out, dtype=args.dtype, min_batch=args.min_batch, opt_batch=args.opt_batch,
            max_batch=args.max_batch, height=args.height, width=args.width, opset=args.opset,
            exporter=args.exporter, profiles=args.profiles, random_weights=args.random_weights, seed=args.seed,
            parity_tol=args.parity_tol, aoti=args.aoti,
        )
    except ExportConfigError as exc:
        return _fail(exc)
    # Imported after argument checks: the pipeline pulls in torch, diffusers and onnx.
    try:
        from ..export import model_source
        from ..export.aoti import AOTIError
        from ..export.artifacts import ArtifactError, TensorRTUnavailableError
        from ..export.parity import ParityError
        from ..export.build import ExportError, export_model
        from ..export.trt_build import BuildError

        expected = (ExportError, AOTIError, ArtifactError, ParityError, BuildError, TensorRTUnavailableError,
                    *model_source.registry_errors())
        try:
            result = export_model(config, quiet=args.quiet)
        except expected as exc:
            return _fail(exc)
        except OSError as exc:  # a full disk or vanished folder outside the staged write (which says so itself)
            return _fail(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
    except KeyboardInterrupt:  # the pipeline removed its temporary folder on the way out
        return _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    if args.triton_repo is not None:
        from ..serve.triton.repo import TritonRepoError, write_triton_repo

        try:
            write_triton_repo(result.folder, args.triton_repo)
        except (TritonRepoError, ArtifactError, ImportError, OSError) as exc:
            return _fail(f"--triton-repo {args.triton_repo}: {exc}")
    print(result.folder)
    return 0


def _family(model: str) -> str | None:
    """The model's family, cheaply (no weights); None when the name does not resolve (the export says why)."""
    try:
        from ..models import resolve_model

        return resolve_model(model).family
    except Exception:  # noqa: BLE001 - an unknown model is refused by the export itself, in one line
        return None


def _fail(exc: BaseException | str, code: int = EXIT_USAGE) -> int:
    message = " ".join(str(exc).split())  # one line, whatever the exception's formatting
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
