"""python -m srds_trt.serve: serve a model over KServe v2 REST and gRPC and the OpenAI images API, one queue.

All three protocols feed one batching queue (--grpc-port turns gRPC on).

A thin shell: flags, the serve extra's modules and the ports are checked before the model loads (one line on
stderr, exit 2); the model warms up before /v2/health/ready says ready; SIGTERM (or Ctrl-C) stops accepting,
finishes in-flight requests and exits 0 within --request-timeout + 5 s plus one sampler iteration (a request
past its timeout is cancelled at its next iteration, so it cannot hold shutdown longer). Before serving starts
(imports, model loading) SIGINT / SIGTERM is one line and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import socket
import sys

from .common import HelpFormatter, Parser, UsageError, check_resolution, exit_on_signals
from .generate import EXIT_USAGE

EXAMPLES = """examples:
  python -m srds_trt.serve --model digits --port 8000 --grpc-port 8001
  curl -s localhost:8000/v1/images/generations -d '{"prompt": "3", "n": 2, "steps": 50, "seed": 1}'
"""
EXTRA_MODULES = ("starlette", "uvicorn", "prometheus_client", "tritonclient", "grpc")
EXIT_OK = 0
PROG = "srds_trt.serve"
log = logging.getLogger("srds_trt.serve")


def build_parser() -> argparse.ArgumentParser:
    from ..settings import DEFAULT_STEPS, SAMPLERS

    p = Parser(prog="python -m srds_trt.serve", description=__doc__.splitlines()[0], epilog=EXAMPLES,
               formatter_class=lambda prog: HelpFormatter(prog, max_help_position=32))
    p.add_argument("--model", default="digits", help="registry name (digits, sd2, ...), local folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address REST and gRPC listen on")
    p.add_argument("--port", type=int, default=8000, help="REST port: KServe v2 /v2/..., OpenAI /v1/..., /metrics")
    p.add_argument("--grpc-port", type=int, default=None, help="KServe v2 gRPC port (unset: no gRPC)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="torch (the PyTorch UNet), or an export's ONNX / TensorRT engine")
    p.add_argument("--engine-dir", default="engines", help="python -m srds_trt.export output")
    p.add_argument("--device", default=None, help="torch device (unset: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="model precision for --backend torch (unset: float32); exported backends use the export's")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels, the one size served (SD, SD3, Flux; unset: the model's)")
    p.add_argument("--random-weights", action="store_true", help="real architecture, seeded random weights (timing)")
    p.add_argument("--default-steps", type=int, default=None,
                   help=f"steps when a request sends none (unset: {DEFAULT_STEPS}; SD3 and Flux: 28)")
    p.add_argument("--sampler", choices=SAMPLERS, default="srds",
                   help="sampler when a request names none; auto: per job, the one that finishes the waiting "
                        "requests soonest given the queue (load-adaptive)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up request (unset: --default-steps)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a request waits for company (0: no wait)")
    p.add_argument("--max-batch-images", type=int, default=32, help="images per sampling job (and per request)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds per request (queue + sampling) before 504; its job stops at the next iteration")
    p.add_argument("--max-body-mb", type=float, default=1.0,
                   help="request bodies above this get 413 before reading (bounds JSON parse time, which holds the GIL)")
    p.add_argument("--cache-mb", type=float, default=256.0,
                   help="byte budget of the pipeline's runner / curve caches (LRU; 0: keep none between jobs)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="info: address, warm-up, ready, one line per request")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"the server needs the serve extra (missing module {missing[0]}): "
                             "pip install 'srds_trt[serve]'")
        config = _config(args)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
        sock = _listen(args.host, args.port, "--port")  # before the model loads: a busy port is one line, exit 2
        if args.grpc_port is not None:
            _listen(args.host, args.grpc_port, "--grpc-port").close()
    except UsageError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    import torch
    import uvicorn

    from ..pipeline import SRDSPipeline
    from ..serve.app import build_app

    torch.set_grad_enabled(False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log.info("loading model %s (backend %s, device %s)", args.model, args.backend, device)
    pipe = SRDSPipeline.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype or "float32"),
                                        random_weights=args.random_weights, resolution=args.resolution,
                                        backend=args.backend, engine_dir=args.engine_dir)
    app = build_app(pipe, config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("serving %s on http://%s:%d (KServe v2 /v2, OpenAI /v1/images/generations, /metrics)%s", args.model,
             host, sock.getsockname()[1], f", gRPC {host}:{args.grpc_port}" if args.grpc_port is not None else "")
    server = _server_class()(uvicorn.Config(app, log_config=None, access_log=False, log_level=args.log_level,
                                            timeout_graceful_shutdown=config.batch.timeout_s + 5))
    server.run(sockets=[sock])
    log.info("stopped")
    return EXIT_OK


def _listen(host: str, port: int, flag: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({flag}): {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn drains on SIGTERM/SIGINT and then re-raises the signal (exit 143); a drained shutdown is a
            clean one, so handle the signals without re-raising: exit 0."""
            def handle(sig, frame):
                log.info("%s: draining (stop accepting, finish in-flight requests)", signal.Signals(sig).name)
                self.handle_exit(sig, frame)

            previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _config(args):
    from ..models import UnknownModelError, resolve_model
    from ..settings import check_run_args
    from ..samplers import DEFAULT_TOL
    from ..serve.batching import BatchConfig
    from ..serve.service import MiB, ServeConfig

    try:
        spec = resolve_model(args.model)
    except UnknownModelError as exc:
        raise UsageError(str(exc)) from None
    check_resolution(spec, args.resolution)
    for flag, value in (("--default-steps", args.default_steps), ("--warmup-steps", args.warmup_steps)):
        if value is not None:
            try:
                check_run_args(value, DEFAULT_TOL, None, "srds", 1)
            except ValueError as exc:
                from ..serve.protocol import setting_message

                raise UsageError(setting_message(exc, flag)) from None
    for flag, port in (("--port", args.port), ("--grpc-port", args.grpc_port)):
        if port is not None and not 0 <= port <= 65535:
            raise UsageError(f"{flag} must be in [0, 65535], got {port}")
    if args.grpc_port is not None and args.grpc_port == args.port and args.port != 0:
        raise UsageError(f"--grpc-port must differ from --port ({args.port})")
    checks = (("--batch-window-ms", args.batch_window_ms >= 0), ("--max-batch-images", args.max_batch_images >= 1),
              ("--max-queue", args.max_queue >= 1), ("--request-timeout", args.request_timeout > 0),
              ("--max-body-mb", args.max_body_mb >= 0.01), ("--cache-mb", args.cache_mb >= 0))
    for flag, ok in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise UsageError(f"{flag} must be {'>= 0' if flag in ('--batch-window-ms', '--cache-mb') else 'positive'}"
                             f"{' (>= 0.01)' if flag == '--max-body-mb' else ''}, got {value}")
    batch = BatchConfig(window_s=args.batch_window_ms / 1000, max_batch_images=args.max_batch_images,
                        max_queue=args.max_queue, timeout_s=args.request_timeout)
    return ServeConfig(model=args.model, batch=batch, default_steps=args.default_steps,
                       warmup_steps=args.warmup_steps, max_body_bytes=int(args.max_body_mb * MiB),
                       grpc_port=args.grpc_port, grpc_host=args.host, cache_bytes=int(args.cache_mb * MiB),
                       default_sampler=args.sampler)


if __name__ == "__main__":
    exit_on_signals(PROG, "stopped before serving")
    sys.exit(main())
