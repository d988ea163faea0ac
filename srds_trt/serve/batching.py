"""Dynamic batching: one worker thread owns the pipeline; requests with equal Settings that arrive within
`window_s` of the first one run as one sampling job (the images dimension), each with its own noise.

The pipeline is not thread-safe, so exactly one thread calls it; the event loop only enqueues and awaits futures.
A request that times out or whose client goes away is abandoned: a queued one never runs, and a running job whose
requests are all abandoned stops at the next iteration / sweep / step boundary (the pipeline's cancel hook). A job
with some live requests runs on (its rows are not dropped) and the abandoned requests' results are discarded.
Each request's noise is drawn from its own seed exactly as `generate --seed` draws it (pipeline.noise, CPU
generator) and the job's noise is their concatenation: the samplers are row-independent, so a request's images
equal its solo run up to float rounding across batch sizes (equal pixels after uint8 quantisation; tested).

Sampler "auto" is load-adaptive: it is resolved per job, priced on the engine's latency-per-rows curve at the
job's actual image count (the pipeline's autotune). Under load the batcher pulls every compatible waiting request
into the job, so the job grows and batched serial wins where the parallel samplers' rows would saturate the engine;
idle, a one-image job gets the parallel sampler. With one engine running jobs one after another, the expected
completion time summed over the job's requests and every request waiting behind it is (their count) x (the job's
time), so the job's own predicted time is the objective that also serves the waiting requests.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .protocol import InferRequest, Settings
from .memory import CacheBudget, resident_bytes
from .report import convergence_report


class QueueFull(RuntimeError):
    """The bounded queue is full: HTTP 503, the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server drains and takes no new work: HTTP 503."""


@dataclass(frozen=True)
class BatchConfig:
    window_s: float = 0.005  # how long the first request of a job waits for compatible company
    max_batch_images: int = 32  # images (not model rows) per sampling job
    max_queue: int = 64  # waiting requests; more get 503
    timeout_s: float = 60.0  # per request, queue + sampling

    def __post_init__(self):
        if not (self.window_s >= 0 and self.max_batch_images >= 1 and self.max_queue >= 1 and self.timeout_s > 0):
            raise ValueError(f"bad batching config {self}")


@dataclass
class _Pending:
    request: InferRequest
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)
    abandoned: str | None = None  # why nobody waits for the result any more ("timeout", "disconnect")

    def abandon(self, reason: str) -> None:
        self.abandoned = reason  # read by the worker thread (one attribute store: atomic under the GIL)
        self.future.cancel()  # still queued: the worker skips it; already running: the cancel hook sees .abandoned


class Batcher:
    def __init__(self, pipe, config: BatchConfig, metrics, model_name: str, *, cache_bytes: int | None = None):
        self.pipe, self.config, self.metrics, self.model = pipe, config, metrics, model_name
        self.cache_bytes = cache_bytes
        self.budget = CacheBudget(pipe, cache_bytes)
        if cache_bytes is not None:
            metrics.cache_budget.labels(model_name).set(cache_bytes)
        # a pipeline without a `latents` argument cannot take per-request noise: run one request per job then
        # SRDSPipeline.__call__(prompt, **kwargs) takes iter_chunks' keywords; a stand-in may list them itself
        parameters = inspect.signature(getattr(pipe, "iter_chunks", pipe.__call__)).parameters
        self.takes_latents = "latents" in parameters
        self.takes_cancel = "cancel" in parameters
        self._queue: deque[_Pending] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._abort = False  # close() ran past its grace: every running job stops at its next boundary
        self._thread = threading.Thread(target=self._loop, name="srds-sampler", daemon=True)

    def start(self, warmup: InferRequest | None = None) -> Future:
        """Start the worker; the returned future completes once warm-up ran (engine build, graph capture)."""
        ready: Future = Future()
        self._warmup, self._ready = warmup, ready
        self._thread.start()
        return ready

    async def infer(self, request: InferRequest) -> tuple[np.ndarray, dict]:
        """(uint8 images [n, H, W, C], stats with "report") for one request. Raises QueueFull / ShuttingDown at
        once, asyncio.TimeoutError after config.timeout_s, and the pipeline's errors. Cancelling the awaiting task
        (the client went away) abandons the request."""
        pending = _Pending(request)
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
            self._queue.append(pending)
            self.metrics.queue_depth.labels(self.model).set(len(self._queue))
            self._cv.notify()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(pending.future), self.config.timeout_s)
        except asyncio.TimeoutError:
            pending.abandon("timeout")
            self.metrics.abandoned.labels(self.model, "timeout").inc()
            raise
        except asyncio.CancelledError:
            pending.abandon("disconnect")
            self.metrics.abandoned.labels(self.model, "disconnect").inc()
            raise

    def close(self, grace: float | None = None) -> None:
        """Finish what is queued and running, then stop the worker. After `grace` seconds every job still running
        stops at its next iteration boundary (its requests fail) and queued requests are dropped."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(grace)
        if self._thread.is_alive():
            self._abort = True
            with self._cv:
                for item in self._queue:
                    item.abandon("shutdown")
                self._queue.clear()
                self._cv.notify()
            self._thread.join()

    # --- the worker thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self._warmup is not None:
                warm = _Pending(self._warmup)
                self._run([warm])
                warm.future.result()  # a warm-up failure fails start(): the server never says ready
            self._ready.set_result(True)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller of start()
            self._ready.set_exception(exc)
            return
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                self._after_job()

    def _after_job(self) -> None:
        evicted = self.budget.evictions
        held = self.budget.after_job()
        self.metrics.cache_bytes.labels(self.model).set(held)
        self.metrics.cache_evictions.labels(self.model).inc(self.budget.evictions - evicted)
        rss = resident_bytes()
        if rss is not None:
            self.metrics.rss.labels(self.model).set(rss)

    def _next_job(self) -> list[_Pending] | None:
        with self._cv:
            while not self._queue:
                if self._closing:
                    return None
                self._cv.wait()
            first = self._queue[0]
            deadline = first.arrived + self.config.window_s
            while not self._closing and time.perf_counter() < deadline and self._images_like(first) < self.config.max_batch_images:
                self._cv.wait(max(0.0, deadline - time.perf_counter()))
            job, images, keep = [], 0, deque()
            while self._queue:
                item = self._queue.popleft()
                if item.future.cancelled():  # timed out while waiting
                    continue
                n = len(item.request.prompts)
                fits = (item.request.settings == first.request.settings and images + n <= self.config.max_batch_images
                        and (self.takes_latents or not job))
                if not fits:
                    keep.append(item)  # back to the queue, ahead of later arrivals
                elif item.future.set_running_or_notify_cancel():
                    job.append(item)
                    images += n
            self._queue.extend(keep)
            self.metrics.queue_depth.labels(self.model).set(len(self._queue))
            return job

    def _images_like(self, first: _Pending) -> int:
        if not self.takes_latents:
            return self.config.max_batch_images  # one request per job: no reason to wait
        return sum(len(p.request.prompts) for p in self._queue if p.request.settings == first.request.settings)

    def _run(self, job: list[_Pending]) -> None:
        if not job:
            return
        settings: Settings = job[0].request.settings
        prompts = [p for item in job for p in item.request.prompts]
        waiting = len(self._queue)  # requests behind this job (stats: what the adaptive choice saw)
        kwargs = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                      sampler=settings.sampler, tol=settings.tol, progress_bar=False)
        if self.takes_cancel:
            kwargs["cancel"] = lambda: self._abort or all(item.abandoned for item in job)
        try:
            with torch.inference_mode():
                if self.takes_latents:
                    noise = torch.cat([request_noise(self.pipe, item.request) for item in job])
                    output = self.pipe(prompts, latents=noise, **kwargs)
                else:
                    output = self.pipe(prompts, generator=job[0].request.seed, **kwargs)
            images = pil_to_array(output.images)
        except BaseException as exc:  # noqa: BLE001 - every request of the job gets the error; the worker lives on
            if type(exc).__name__ == "Cancelled":
                self.metrics.cancelled_jobs.labels(self.model).inc()
            for item in job:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.metrics.batch_requests.labels(self.model).observe(len(job))
        self.metrics.batch_images.labels(self.model).observe(len(prompts))
        if output.stats.get("iterations") is not None:
            self.metrics.iterations.labels(self.model).observe(output.stats["iterations"])
        report = convergence_report(output, settings.tol)
        self.metrics.sampler_choice.labels(self.model, str(output.stats.get("sampler"))).inc()
        start = 0
        for item in job:
            n = len(item.request.prompts)
            stats = {**output.stats, "prompts": list(item.request.prompts), "images": n, "seed": item.request.seed,
                     "batch_requests": len(job), "batch_images": len(prompts), "queue_waiting": waiting,
                     "report": report}
            if not item.future.done():
                item.future.set_result((images[start:start + n], stats))
            start += n


def request_noise(pipe, request: InferRequest) -> torch.Tensor:
    """The noise `generate --seed S` draws for this request's prompts (pipeline.__call__: one CPU generator)."""
    generator = torch.Generator().manual_seed(request.seed)
    return torch.randn((len(request.prompts), *pipe.loaded.sample_shape), generator=generator)


def pil_to_array(images) -> np.ndarray:
    """PIL images (what generate saves as PNG) -> uint8 [n, H, W, C]."""
    arrays = [np.asarray(image) for image in images]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays]).astype(np.uint8, copy=False)
