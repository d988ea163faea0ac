"""PyTorch backend: eager, or one CUDA graph per bucket.

Graphs are captured largest bucket first into one shared memory pool after a warm-up on a side stream (the
recipe of vLLM's CUDA-graph runner and PyTorch's docs): launch-bound small batches then cost one graph launch.

fp32 means fp32: PyTorch lets cuDNN convolutions use TF32 by default, which on an H200 made the same row differ
by 1.2e-3 between batch sizes (digits UNet) and left SRDS stalled on that noise floor. The engine switches TF32
off around its own kernels (and restores the process's flags), unless tf32=True is asked for.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from .base import Engine, EngineSpec, default_buckets

CondModel = Callable[[Tensor, Tensor, Tensor], Tensor]


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Set cuDNN's and cuBLAS's TF32 switches for a block and restore them after (they are process-wide)."""
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
        if cuda_graphs:
            self.capture()

    def _run(self, bucket: int, lane: int = 0) -> None:
        io = self.io(bucket, lane)
        with torch.no_grad(), tf32_allowed(self.tf32):
            io.output.copy_(self._model(io.sample, io.timestep, io.cond))

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
        """Capture one graph per (lane, bucket), largest first; one memory pool per lane.

        Graphs of one lane replay one after another and may share a pool; two lanes run concurrently on two
        streams, so they must not.
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for lane in range(self.lanes):  # warm-up: lazy init, cuDNN/cuBLAS autotuning, allocator growth
                for bucket in self.buckets:
                    self._run(bucket, lane)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for lane in range(self.lanes):
            pool = None
            for bucket in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._run(bucket, lane)
                pool = graph.pool()
                self._graphs[(lane, bucket)] = graph
        torch.cuda.synchronize(self.device)
