"""The Open Inference Protocol (KServe v2) over HTTP/REST as a Starlette app; uvicorn serves it.

Starlette + uvicorn rather than kserve's ModelServer: kserve pulls a large dependency tree (fastapi, grpcio, ray
extras, its own process model) and batches per process, not into the per-settings sampling jobs SRDS needs; a
small ASGI app keeps the batching in one visible place (batching.py) and speaks the same endpoints and wire
format (JSON tensors and the binary tensor extension), so tritonclient and curl work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batching import Batcher, BatchConfig, QueueFull, ShuttingDown
from .metrics import Metrics
from .protocol import HEADER_LENGTH, INPUTS, InferRequest, Settings, encode_response, parse_infer, split_body

SERVER_NAME = "srds_trt"
SERVER_VERSION = "0.1.0"


@dataclass(frozen=True)
class ServeConfig:
    model: str = "digits"
    batch: BatchConfig = BatchConfig()
    default_steps: int = 100
    warmup_steps: int | None = None  # steps of the warm-up request (default: default_steps)


def build_app(pipe, config: ServeConfig, *, metrics: Metrics | None = None) -> Starlette:
    """The server for one loaded SRDSPipeline. Ready once the worker ran its warm-up request."""
    metrics = metrics or Metrics()
    batcher = Batcher(pipe, config.batch, metrics, config.model)
    state = {"ready": False}
    name = config.model

    @contextlib.asynccontextmanager
    async def lifespan(app):
        warm = InferRequest(id=None, prompts=(pipe.check_prompts(None)[0],), seed=0, binary_output=False,
                            outputs=("image",), settings=Settings(config.warmup_steps or config.default_steps, None,
                                                                  "srds", _default_tol()))
        ready = asyncio.wrap_future(batcher.start(warm))
        ready.add_done_callback(lambda f: state.update(ready=not f.cancelled() and f.exception() is None))
        app.state.warmup = ready
        try:
            yield
        finally:  # uvicorn has stopped accepting and waited for open requests: finish the queue, stop the worker
            await asyncio.get_running_loop().run_in_executor(None, batcher.close)

    def model_or_404(request: Request):
        m = request.path_params["model"]
        if m != name:
            return _error(404, f"unknown model {m!r}; this server serves {name!r}")
        version = request.path_params.get("version")
        if version not in (None, "1"):
            return _error(404, f"unknown version {version!r} of model {name!r}; the version is 1")
        return None

    async def server_metadata(request):
        return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]})

    async def live(request):
        return Response(status_code=200)

    async def ready(request):
        return Response(status_code=200 if state["ready"] else 503)

    async def model_metadata(request):
        if (missing := model_or_404(request)) is not None:
            return missing
        channels = 3 if pipe.text is not None else int(pipe.loaded.sample_shape[0])  # SD decodes to RGB
        return JSONResponse({
            "name": name, "versions": ["1"], "platform": "srds_trt",
            "inputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in INPUTS.items()],
            "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, channels]},
                        {"name": "stats", "datatype": "BYTES", "shape": [1]}],
        })

    async def model_ready(request):
        if (missing := model_or_404(request)) is not None:
            return missing
        return Response(status_code=200 if state["ready"] else 503)

    async def infer(request: Request):
        start = time.perf_counter()
        response = await _infer(request)
        code = str(response.status_code)
        metrics.latency.labels(name, code).observe(time.perf_counter() - start)
        metrics.requests.labels(name, code).inc()
        return response

    async def _infer(request: Request):
        if (missing := model_or_404(request)) is not None:
            return missing
        if not state["ready"]:
            return _error(503, f"model {name!r} is not ready (warming up)")
        try:
            header, tail = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
            parsed = parse_infer(header, tail, default_steps=config.default_steps,
                                 max_images=config.batch.max_batch_images)
            pipe.check_prompts(list(parsed.prompts))
        except ValueError as exc:  # ProtocolError, and the pipeline's own prompt check
            return _error(400, str(exc))
        try:
            image, stats = await batcher.infer(parsed)
        except (QueueFull, ShuttingDown) as exc:
            return _error(503, str(exc))
        except asyncio.TimeoutError:
            return _error(504, f"the request took longer than {config.batch.timeout_s:g} s (--request-timeout)")
        except ValueError as exc:  # the pipeline refused the settings (e.g. a sampler this backend cannot run)
            return _error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - NonFiniteError and engine failures: this request fails, we serve on
            return _error(500, f"{type(exc).__name__}: {exc}")
        body, headers = encode_response(name, parsed, image, stats)
        return Response(body, headers=headers, media_type="application/octet-stream" if headers else "application/json")

    async def prometheus(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_metadata), Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _default_tol() -> float:
    from ..samplers import DEFAULT_TOL

    return DEFAULT_TOL
