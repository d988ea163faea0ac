"""python -m srds_trt.serve --model digits [--port 8000]: serve a registry model over the Open Inference Protocol.

A thin shell: flags are checked before the model loads (one line on stderr, exit 2); the model warms up before
/v2/health/ready says ready; SIGTERM (or Ctrl-C) stops accepting, finishes in-flight requests and exits 0.
"""

from __future__ import annotations

import argparse
import sys

from ..cli.generate import EXIT_USAGE, UsageError, _Parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m srds_trt.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits", help="registry name (digits, sd2, ...), local folder or hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch")
    p.add_argument("--engine-dir", default="engines", help="python -m srds_trt.export output")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--default-steps", type=int, default=None, help="steps when a request sends none (default 100)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up request (default: --default-steps)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a request waits for company (0: no batching wait)")
    p.add_argument("--max-batch-images", type=int, default=32, help="images per sampling job (and per request)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (queue + sampling) before 504")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = _config(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import torch
    import uvicorn

    from ..pipeline import SRDSPipeline
    from .app import build_app

    torch.set_grad_enabled(False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = SRDSPipeline.from_pretrained(args.model, device=device, backend=args.backend, engine_dir=args.engine_dir)
    app = build_app(pipe, config)
    _Server = _server_class()
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=config.batch.timeout_s + 5))
    server.run()
    return 0


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn drains on SIGTERM/SIGINT and then re-raises the signal (exit 143); a drained shutdown is a
            clean one, so handle the signals without re-raising: exit 0."""
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _config(args):
    from ..models import UnknownModelError, resolve_model
    from ..pipeline import DEFAULT_STEPS, check_run_args
    from ..samplers import DEFAULT_TOL
    from .app import ServeConfig
    from .batching import BatchConfig

    try:
        resolve_model(args.model)
    except UnknownModelError as exc:
        raise UsageError(str(exc)) from None
    for flag, value in (("--default-steps", args.default_steps), ("--warmup-steps", args.warmup_steps)):
        if value is not None:
            try:
                check_run_args(value, DEFAULT_TOL, None, "srds", 1)
            except ValueError as exc:
                raise UsageError(str(exc).replace("--steps", flag)) from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    checks = (("--batch-window-ms", args.batch_window_ms >= 0), ("--max-batch-images", args.max_batch_images >= 1),
              ("--max-queue", args.max_queue >= 1), ("--request-timeout", args.request_timeout > 0))
    for flag, ok in checks:
        if not ok:
            raise UsageError(f"{flag} must be positive, got {getattr(args, flag[2:].replace('-', '_'))}")
    batch = BatchConfig(window_s=args.batch_window_ms / 1000, max_batch_images=args.max_batch_images,
                        max_queue=args.max_queue, timeout_s=args.request_timeout)
    return ServeConfig(model=args.model, batch=batch, default_steps=args.default_steps or DEFAULT_STEPS,
                       warmup_steps=args.warmup_steps)


if __name__ == "__main__":
    sys.exit(main())
