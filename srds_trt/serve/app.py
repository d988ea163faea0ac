"""The server as one Starlette app: the Open Inference Protocol (KServe v2) over REST, the OpenAI images API
(openai_api.py) and, on its own port, KServe v2 over gRPC (grpc_server.py), all in front of one batching queue.

Starlette + uvicorn + grpc.aio rather than kserve's ModelServer or PyTriton: see the README's serving section
(neither lets a request's cancellation reach the sampler between iterations, nor routes an OpenAI request into
the same per-settings sampling jobs; both own the batching).
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import logging
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batching import BatchConfig
from .http import read_body, until_disconnected
from .metrics import Metrics
from .protocol import HEADER_LENGTH, INPUTS, InferRequest, Settings, encode_response
from ..settings import DEFAULT_STEPS
from .service import SERVER_NAME, SERVER_VERSION, RequestError, ServeConfig, Service

log = logging.getLogger("srds_trt.serve")

__all__ = ["BatchConfig", "ServeConfig", "build_app", "read_body", "error_response", "until_disconnected"]


def build_app(pipe, config: ServeConfig, *, metrics: Metrics | None = None) -> Starlette:
    """The server for one loaded SRDSPipeline. Ready once the worker ran its warm-up request."""
    if config.default_steps is None:  # the model's own default (settings.default_steps)
        config = dataclasses.replace(config, default_steps=getattr(pipe, "default_steps", DEFAULT_STEPS))
    service = Service(pipe, config, metrics)
    batcher = service.batcher

    @contextlib.asynccontextmanager
    async def lifespan(app):
        grpc_server = None
        if config.grpc_port is not None:
            from .grpc_server import start_grpc

            grpc_server = await start_grpc(service, config.grpc_host, config.grpc_port)
        steps = config.warmup_steps or config.default_steps
        warm = InferRequest(id=None, prompts=(pipe.check_prompts(None)[0],), seed=0, binary_output=False,
                            outputs=("image",), settings=Settings(steps, None, "srds", _default_tol()))
        log.info("warming up: one %d-step SRDS request (engine build, first call)", steps)
        started = time.perf_counter()
        ready = asyncio.wrap_future(batcher.start(warm))

        def on_ready(f):
            service.ready = not f.cancelled() and f.exception() is None
            if service.ready:
                log.info("ready: model %s warmed up in %.1f s", config.model, time.perf_counter() - started)
            elif not f.cancelled():
                log.error("warm-up failed: %s", f.exception())

        ready.add_done_callback(on_ready)
        app.state.warmup = ready
        try:
            yield
        finally:  # uvicorn has stopped accepting and waited for open requests: finish the queue, stop the worker
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            await asyncio.get_running_loop().run_in_executor(None, batcher.close, config.batch.timeout_s)

    def model_or_404(request: Request):
        service.check_model(request.path_params["model"], request.path_params.get("version"))

    async def server_metadata(request):
        return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]})

    async def live(request):
        return Response(status_code=200)

    async def ready(request):
        return Response(status_code=200 if service.ready else 503)

    async def model_metadata(request):
        try:
            model_or_404(request)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        return JSONResponse(v2_metadata(service))

    async def model_ready(request):
        try:
            model_or_404(request)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        return Response(status_code=200 if service.ready else 503)

    async def infer(request: Request):
        start, parsed, stats = time.perf_counter(), None, None
        try:
            model_or_404(request)
            service.check_ready()
            body = await read_body(request, config.max_body_bytes)
            parsed = await service.parse_v2(body, request.headers.get(HEADER_LENGTH))
            image, stats = await until_disconnected(request, service.infer(parsed))
            body, headers = encode_response(service.name, parsed, image, stats)
            response = Response(body, headers=headers,
                                media_type="application/octet-stream" if headers else "application/json")
            service.record("v2-rest", 200, start, parsed, stats)
            return response
        except RequestError as exc:
            service.record("v2-rest", exc.status, start, parsed, message=exc.message)
            return error_response(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: still one JSON error, counted and logged
            log.exception("v2-rest: unexpected error")
            service.record("v2-rest", 500, start, parsed, message=str(exc))
            return error_response(500, f"internal error ({type(exc).__name__})")

    async def prometheus(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_metadata), Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    from .openai_api import openai_routes

    routes += openai_routes(service)
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.service = service
    return app


def v2_metadata(service: Service) -> dict:
    return {
        "name": service.name, "versions": ["1"], "platform": "srds_trt",
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in INPUTS.items()],
        "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, service.channels()]},
                    {"name": "stats", "datatype": "BYTES", "shape": [1]}],
    }


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _default_tol() -> float:
    from ..samplers import DEFAULT_TOL

    return DEFAULT_TOL
