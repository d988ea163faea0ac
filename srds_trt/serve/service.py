"""What the three protocols share: parse client bytes off the event loop, one batching queue, one mapping of
failures to statuses, one request log line and one set of metrics. The protocol modules (app.py: KServe v2 REST,
openai_api.py: the OpenAI images API, grpc_server.py: KServe v2 gRPC) only translate wire formats."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from .batching import Batcher, BatchConfig, QueueFull, ShuttingDown
from .metrics import Metrics
from .protocol import InferRequest, ProtocolError, parse_infer, split_body

log = logging.getLogger("srds_trt.serve")

SERVER_NAME = "srds_trt"
SERVER_VERSION = "0.2.0"
MiB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    model: str = "digits"
    batch: BatchConfig = BatchConfig()
    default_steps: int | None = None  # None: the pipeline's (100; SD3 / Flux: their pipelines' 28)
    warmup_steps: int | None = None  # steps of the warm-up request (default: default_steps)
    max_body_bytes: int = 1 * MiB  # larger request bodies get 413 before they are read
    grpc_port: int | None = None  # KServe v2 gRPC beside REST (None: REST only)
    grpc_host: str = "127.0.0.1"
    cache_bytes: int | None = None  # the pipeline's caches under this budget (None: unbounded)
    default_sampler: str = "srds"  # when a request names none; "auto": load-adaptive, chosen per job (batching.py)

    def __post_init__(self):
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


class RequestError(Exception):
    """A request that fails: the HTTP status (the gRPC code follows from it) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Service:
    def __init__(self, pipe, config: ServeConfig, metrics: Metrics | None = None):
        self.pipe, self.config = pipe, config
        self.metrics = metrics or Metrics()
        self.batcher = Batcher(pipe, config.batch, self.metrics, config.model, cache_bytes=config.cache_bytes)
        self.ready = False
        self.name = config.model

    # --- model names ---------------------------------------------------------------------------------------
    def check_model(self, model: str, version: str | None = None) -> None:
        if model != self.name:
            raise RequestError(404, f"unknown model {model!r}; this server serves {self.name!r}")
        if version not in (None, "", "1"):
            raise RequestError(404, f"unknown version {version!r} of model {self.name!r}; the version is 1")

    def check_ready(self) -> None:
        if not self.ready:
            raise RequestError(503, f"model {self.name!r} is not ready (warming up)")

    def channels(self) -> int:
        return 3 if self.pipe.text is not None else int(self.pipe.loaded.sample_shape[0])  # SD decodes to RGB

    # --- parsing (in a worker thread: a large or deep body never stalls the event loop) --------------------
    async def parse_v2(self, body: bytes, header_length: str | None) -> InferRequest:
        def parse():
            header, tail = split_body(body, header_length)
            return self.parse_tensors_header(header, tail)

        return await self.off_loop(parse)

    def parse_tensors_header(self, header, tail: bytes) -> InferRequest:
        parsed = parse_infer(header, tail, default_steps=self.config.default_steps,
                             max_images=self.config.batch.max_batch_images,
                             default_sampler=self.config.default_sampler)
        self.check_prompts(parsed.prompts)
        return parsed

    def check_prompts(self, prompts) -> None:
        try:
            self.pipe.check_prompts(list(prompts))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None

    @staticmethod
    async def off_loop(fn):
        try:
            return await asyncio.to_thread(fn)
        except ProtocolError as exc:
            raise RequestError(400, str(exc)) from None
        except RequestError:
            raise
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a shape no check foresaw
            raise RequestError(400, f"malformed request ({type(exc).__name__}: {exc})") from None

    # --- the queue -----------------------------------------------------------------------------------------
    async def infer(self, parsed: InferRequest) -> tuple[np.ndarray, dict]:
        self.check_ready()
        try:
            return await self.batcher.infer(parsed)
        except (QueueFull, ShuttingDown) as exc:
            raise RequestError(503, str(exc)) from None
        except asyncio.TimeoutError:
            raise RequestError(504, f"the request took longer than {self.config.batch.timeout_s:g} s "
                                    "(--request-timeout); its sampling job stops at the next iteration") from None
        except ValueError as exc:  # the pipeline refused the settings (e.g. a sampler this backend cannot run)
            raise RequestError(400, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - NonFiniteError and engine failures: this request fails, we serve on
            raise RequestError(500, f"{type(exc).__name__}: {exc}") from None

    # --- accounting ----------------------------------------------------------------------------------------
    def record(self, protocol: str, status: int, start: float, parsed: InferRequest | None = None,
               stats: dict | None = None, message: str | None = None) -> None:
        elapsed = time.perf_counter() - start
        code = str(status)
        self.metrics.latency.labels(self.name, code).observe(elapsed)
        self.metrics.requests.labels(self.name, code).inc()
        self.metrics.protocol_requests.labels(self.name, protocol, code).inc()
        if not log.isEnabledFor(logging.INFO if status < 500 else logging.WARNING):
            return
        parts = [f"{protocol} {status} {elapsed * 1e3:.0f} ms"]
        if parsed is not None:
            s = parsed.settings
            parts.append(f"images={len(parsed.prompts)} steps={s.steps} sampler={s.sampler} tol={s.tol:g} seed={parsed.seed}")
        if stats is not None:
            report = stats.get("report", {})
            parts.append(f"ran={report.get('sampler')} iterations={report.get('iterations')} "
                         f"calls={report.get('sequential_calls')} batch={stats.get('batch_requests')}")
        if message is not None:
            parts.append(f"error={message[:200]!r}")
        (log.warning if status >= 500 else log.info)(" ".join(parts))
