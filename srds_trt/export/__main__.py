"""`python -m srds_trt.export`: a thin shell over `export_model`. User errors: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEFAULT_OPSET, DTYPES, EXPORTERS, ExportConfig, ExportConfigError

EXIT_USAGE = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m srds_trt.export", description=__doc__)
    p.add_argument("--model", required=True, help="registry name (digits, sd2, sd2.1, sd1.5) or a local folder")
    p.add_argument("--out", type=Path, default=Path("engines"), help="artifact root (default: engines/)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--min-batch", type=int, default=1, help="profile minimum rows (CFG doubling included)")
    p.add_argument("--opt-batch", type=int, default=None, help="profile optimum rows (default: mid-range power of 2)")
    p.add_argument("--max-batch", type=int, default=32, help="profile maximum rows")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                   help="torch.onnx exporter: legacy (TorchScript, fast) or dynamo (torch.export)")
    p.add_argument("--profiles", type=int, default=1, help="identical optimization profiles (one per concurrent context)")
    p.add_argument("--parity-tol", type=float, default=None, help="max relative ONNX-vs-PyTorch error")
    p.add_argument("--random-weights", action="store_true", help="random weights (architecture only, for timing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no staged log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = ExportConfig(
            model=args.model, out=args.out, dtype=args.dtype, min_batch=args.min_batch, opt_batch=args.opt_batch,
            max_batch=args.max_batch, height=args.height, width=args.width, opset=args.opset,
            exporter=args.exporter, profiles=args.profiles, random_weights=args.random_weights, seed=args.seed,
            parity_tol=args.parity_tol,
        )
    except ExportConfigError as exc:
        return _fail(exc)
    # Imported after argument checks: the pipeline pulls in torch, diffusers and onnx.
    from . import registry
    from .artifacts import ArtifactError
    from .parity import ParityError
    from .pipeline import ExportError, export_model
    from .trt_build import BuildError
    from .trt_import import TensorRTUnavailableError

    expected = (ExportError, ArtifactError, ParityError, BuildError, TensorRTUnavailableError, *registry.registry_errors())
    try:
        result = export_model(config, quiet=args.quiet)
    except expected as exc:
        return _fail(exc)
    print(result.folder)
    return 0


def _fail(exc: BaseException) -> int:
    message = " ".join(str(exc).split())  # one line, whatever the exception's formatting
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
