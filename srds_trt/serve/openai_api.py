"""The OpenAI images API: `POST /v1/images/generations` and `GET /v1/models`, as the official `openai` client
calls them. srds_trt's settings come as extra body fields (the client's `extra_body`): seed, steps, sampler, tol,
guidance_scale. Images come back as base64 PNG (`response_format="b64_json"`; there are no hosted URLs), and the
convergence report as the extra top-level field `convergence`. Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import io
import math
import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .http import read_body, until_disconnected
from .protocol import InferRequest, ProtocolError, Settings, load_json, setting_message
from .service import RequestError, Service

KNOWN = {"model", "prompt", "n", "response_format", "size", "seed", "steps", "sampler", "tol", "guidance_scale",
         "quality", "style", "user", "background", "moderation", "output_format", "output_compression"}


def openai_routes(service: Service) -> list[Route]:
    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": service.name, "object": "model", "created": 0, "owned_by": "srds_trt"}]})

    async def generations(request: Request):
        start, parsed, stats = time.perf_counter(), None, None
        try:
            service.check_ready()
            body = await read_body(request, service.config.max_body_bytes)
            parsed = await service.off_loop(lambda: parse_generation(service, body))
            image, stats = await until_disconnected(request, service.infer(parsed))
            data = await service.off_loop(lambda: [{"b64_json": png_base64(frame)} for frame in image])
            service.record("openai", 200, start, parsed, stats)
            return JSONResponse({"created": int(time.time()), "data": data, "convergence": stats["report"],
                                 "seed": parsed.seed, "model": service.name})
        except RequestError as exc:
            service.record("openai", exc.status, start, parsed, message=exc.message)
            return openai_error(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: still one JSON error, counted
            service.record("openai", 500, start, parsed, message=str(exc))
            return openai_error(500, f"internal error ({type(exc).__name__})")

    return [Route("/v1/models", models), Route("/v1/images/generations", generations, methods=["POST"])]


def parse_generation(service: Service, body: bytes) -> InferRequest:
    from ..settings import check_guidance_scale, check_run_args, check_seed
    from ..samplers import DEFAULT_TOL

    req = load_json(body)
    if not isinstance(req, dict):
        raise ProtocolError("the request body must be a JSON object")
    unknown = sorted(set(req) - KNOWN)
    if unknown:
        raise ProtocolError(f"unknown field {unknown[0]!r}; srds_trt takes seed, steps, sampler, tol, guidance_scale "
                            "beside OpenAI's model, prompt, n, size, response_format")
    model = req.get("model")
    if model is not None:
        service.check_model(str(model) if isinstance(model, str) else repr(model))
    prompt = req.get("prompt")
    if not isinstance(prompt, str):
        raise ProtocolError("'prompt' must be a string")
    n = _integer(req, "n", 1)
    limit = service.config.batch.max_batch_images
    if not 1 <= n <= limit:
        raise ProtocolError(f"'n' must be an integer in [1, {limit}] (--max-batch-images), got {n}")
    response_format = req.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise ProtocolError(f"'response_format' must be 'b64_json' (this server hosts no image URLs), got "
                            f"{response_format!r}")
    size = req.get("size")
    height, width = service.pipe.image_size
    native = f"{width}x{height}"  # the one size this server's model makes (SD: the resolution it was loaded at)
    if size not in (None, "auto") and size != native:
        raise ProtocolError(f"'size' must be {native!r} for model {service.name!r}, got {size!r}")
    steps = _integer(req, "steps", service.config.default_steps)
    seed = _integer(req, "seed", 0)
    sampler = req.get("sampler", service.config.default_sampler)
    if not isinstance(sampler, str):
        raise ProtocolError("'sampler' must be a string")
    tol = _number(req, "tol", DEFAULT_TOL)
    scale = _number(req, "guidance_scale", None)
    try:
        check_run_args(steps, tol, None, sampler, 1)
        check_seed(seed)
        if scale is not None:
            scale = check_guidance_scale(scale)
    except ValueError as exc:
        raise ProtocolError(setting_message(exc, "'{}'")) from None
    prompts = (prompt,) * n
    service.check_prompts(prompts)
    return InferRequest(id=None, prompts=prompts, seed=seed, binary_output=False, outputs=("image", "stats"),
                        settings=Settings(steps=steps, guidance_scale=scale, sampler=sampler, tol=tol))


def _integer(req: dict, name: str, default: int) -> int:
    value = req.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{name}' must be an integer, got {value!r}"[:200])
    return value


def _number(req: dict, name: str, default):
    value = req.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ProtocolError(f"'{name}' must be a finite number, got {value!r}"[:200])
    return float(value)


def png_base64(frame) -> str:
    from PIL import Image

    image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def openai_error(status: int, message: str) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            503: "server_error", 504: "timeout"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)
