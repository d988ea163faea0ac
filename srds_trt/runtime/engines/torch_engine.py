"""PyTorch backend: eager, or one CUDA graph per bucket.

Graphs are captured largest bucket first into one shared memory pool after a warm-up on a side stream (the
recipe of vLLM's CUDA-graph runner and PyTorch's docs): launch-bound small batches then cost one graph launch.

fp32 means fp32: PyTorch lets cuDNN convolutions use TF32 by default, which on an H200 made the same row differ
by 1.2e-3 between batch sizes (digits UNet) and left SRDS stalled on that noise floor. The engine switches TF32
off around its own kernels (and restores the process's flags), unless tf32=True is asked for.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..cuda_graphs import capture_graph
from .base import Engine, EngineError, EngineSpec, default_buckets

CondModel = Callable[[Tensor, Tensor, Tensor], Tensor]


# The TF32 switches are process-wide, so a block that sets them owns them until it restores them: without this
# lock a second engine on another thread (a server's two runners) could flip them while the first one's kernels
# are being launched (cuBLAS/cuDNN read the switches at launch and at graph capture, not at execution, so the
# lock is held for the enqueue only). Re-entrant: a block may call another engine's call inside it.
_TF32_LOCK = threading.RLock()


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Set cuDNN's and cuBLAS's TF32 switches for a block and restore them after, one thread at a time."""
    with _TF32_LOCK:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class TorchEngine(Engine):
    name = "torch"

    def __init__(
        self,
        cond_model: CondModel,
        spec: EngineSpec,
        *,
        device: torch.device | str = "cpu",
        buckets: tuple[int, ...] | None = None,
        max_rows: int = 64,
        cuda_graphs: bool = False,
        lanes: int = 1,
        tf32: bool = False,
    ):
        super().__init__(spec, buckets or default_buckets(max_rows), device, lanes)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        self._model = cond_model
        self.tf32 = tf32
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.capture_failures: dict[tuple[int, int], str] = {}
        if cuda_graphs:
            self.capture()

    def _run(self, bucket: int, lane: int = 0) -> None:
        io = self.io(bucket, lane)
        # TF32 exists only on CUDA: a CPU engine leaves the switches (and the lock) alone, so CPU runners on two
        # threads still run in parallel
        precision = tf32_allowed(self.tf32) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), precision:
            out = self._model(io.sample, io.timestep, io.cond)
            if out.shape != io.output.shape:  # shape metadata only (no sync): never broadcast a wrong batch
                raise EngineError(f"the model returned shape {tuple(out.shape)} for {tuple(io.output.shape)}")
            io.output.copy_(out)

    def enqueue(self, bucket: int, lane: int = 0, stream: torch.cuda.Stream | None = None, *, replay: bool = True) -> None:
        if self.device.type != "cuda":
            self._run(bucket, lane)
            return
        with torch.cuda.stream(stream or torch.cuda.current_stream(self.device)):
            graph = self._graphs.get((lane, bucket)) if replay else None
            if graph is not None:
                graph.replay()
            else:
                self._run(bucket, lane)

    def capture(self) -> None:
        """Capture one graph per (lane, bucket), largest first; one memory pool per lane (cuda_graphs.capture_graph).

        Graphs of one lane replay one after another and may share a pool; two lanes run concurrently on two
        streams, so they must not. A bucket that cannot be captured stays eager; the reason is in capture_failures.
        """
        for lane in range(self.lanes):
            pool = None
            for bucket in reversed(self.buckets):
                captured = capture_graph(lambda b=bucket, l=lane: self._run(b, l), device=self.device, pool=pool)
                if captured.failure is not None:
                    self.capture_failures[(lane, bucket)] = captured.failure
                    continue
                pool = captured.pool
                self._graphs[(lane, bucket)] = captured.graph
        torch.cuda.synchronize(self.device)
