"""The one CUDA-graph capture recipe of the project (runners, the torch engine, the TensorRT engine).

    captured = capture_graph(fn, device=device, pool=pool, stream=side)
    captured.run()            # graph replay, or fn() when capture was not possible
    captured.failure          # None, or why it runs uncaptured (kept for the run's stats)

Recipe (PyTorch's CUDA-graph docs, vLLM's CUDAGraphWrapper): warm up on a side stream (lazy init, cuDNN/cuBLAS
autotuning, allocator growth must not happen inside capture), then capture on that stream into a memory pool
the caller shares between graphs that never run concurrently (largest first, so smaller ones fit in its
blocks). Capture is an optimisation, never a requirement: any exception during warm-up-free capture leaves
`fn` to run eagerly and the reason is kept, so a backend that cannot be captured still runs, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class CapturedGraph:
    fn: Callable[[], None]
    graph: Any = None  # torch.cuda.CUDAGraph, or None: run fn eagerly
    failure: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @property
    def pool(self) -> Any:
        """The memory pool this graph captured into (pass it to the next capture that may share it)."""
        return self.graph.pool() if self.graph is not None else None

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


def capture_graph(
    fn: Callable[[], None],
    *,
    device: torch.device | str,
    pool: Any = None,
    stream: "torch.cuda.Stream | None" = None,
    warmup: int = 1,
    enabled: bool = True,
) -> CapturedGraph:
    """Warm `fn` up on a side stream and capture it; on any failure, return it uncaptured with the reason.

    device: where fn's work runs (not CUDA, or enabled=False: returned uncaptured, failure None: nothing failed).
    pool: a graph memory pool handle (CapturedGraph.pool or torch.cuda.graph_pool_handle()) shared with graphs that
    never replay concurrently with this one. stream: the side stream to warm up and capture on (new if None).
    The caller's current stream waits for the capture before returning, so captured buffers are ready.
    """
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return CapturedGraph(fn)
    caller = torch.cuda.current_stream(device)
    side = stream or torch.cuda.Stream(device)
    side.wait_stream(caller)
    try:
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side):
            fn()
    except Exception as exc:  # capture is an optimisation: run eagerly and say why
        torch.cuda.synchronize(device)
        return CapturedGraph(fn, failure=f"{type(exc).__name__}: {exc}")
    caller.wait_stream(side)
    return CapturedGraph(fn, graph=graph)
