"""Measure what `--sampler auto` prices: an engine's ms per call by rows, and one all-gather of a tick's state.

Benchmark convention (STYLE 11): one warm-up, then the best of `repeats` timed calls, synchronised around each
timer; a curve's row counts are timed in interleaved rounds (best_ms_interleaved says why). On a GPU every bucket
is timed as a CUDA-graph replay (cuda_graphs.capture_graph around one plain enqueue, largest bucket first, one
shared pool, released afterwards), because the runners replay graphs: an eager curve is launch-bound at small
rows (SD2-base on an H200: 37.9 ms eager vs 9.2 ms graphed at one row) and would make wide calls look free. A
bucket that cannot be captured is timed eagerly. On a CPU there are no graphs and the enqueue is timed as it runs.

The curve is per engine bucket (a call pads to its bucket), so `bucketed(curve, buckets)` prices a call of R
rows at its bucket's time: exact for the engine that was measured.
"""

from __future__ import annotations

from typing import Callable, Mapping, TypeVar

import torch

from ..runtime.engines.base import Engine, bucket_for
from ..runtime.host import device_now as _now

K = TypeVar("K")




def best_ms(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """ms of one call of `fn`: one warm-up, then the best of `repeats` timed calls."""
    return best_ms_interleaved({None: fn}, device, repeats)[None]


def best_ms_interleaved(calls: Mapping[K, Callable[[], None]], device: torch.device, repeats: int) -> dict[K, float]:
    """best_ms of every call, timed in rounds (one of each per round) instead of one call after the other: a burst
    of load from another process then inflates one round of every row count, which the minimum drops, instead of
    every repeat of the row counts timed during it. Why: auto on this 2-core CPU, next to a test run, picked SRDS
    (56 s) over serial (4.4 s) for digits N = 100 from a curve timed one row count after the other (the likely
    cause; the curve of that run was not kept). Three runs under a bursty load since: serial each time."""
    for fn in calls.values():
        fn()  # warm-up
    times: dict[K, list[float]] = {key: [] for key in calls}
    for _ in range(max(1, repeats)):
        for key, fn in calls.items():
            start = _now(device)
            fn()
            times[key].append(_now(device) - start)
    return {key: 1e3 * min(ts) for key, ts in times.items()}


def measure_engine_curve(engine: Engine, buckets: tuple[int, ...] | None = None, repeats: int = 3,
                         seed: int = 0) -> dict[int, float]:
    """{bucket rows: ms of one engine call} over `buckets` (default: all of the engine's), inputs random but finite."""
    from ..runtime.cuda_graphs import capture_graph

    buckets = tuple(sorted(buckets or engine.buckets, reverse=True))  # largest first: smaller graphs fit its pool
    gen = torch.Generator().manual_seed(seed)
    spec, device, pool, graphs = engine.spec, engine.device, None, []
    for rows in buckets:
        x = torch.randn(rows, *spec.sample_shape, generator=gen).to(device, spec.dtype)
        t = torch.linspace(999, 0, rows).to(device, spec.timestep_dtype)
        if spec.cond_dtype == torch.long:
            cond = (torch.arange(rows) % 10).to(device)
        else:
            cond = torch.randn(rows, *spec.cond_shape, generator=gen).to(device, spec.cond_dtype)
        bucket = engine.load(x, t, cond).rows
        graph = capture_graph(lambda b=bucket: engine.enqueue(b, replay=False), device=device, pool=pool)
        pool = graph.pool or pool
        graphs.append((bucket, graph))  # alive until every bucket is timed: the shared pool stays valid
    curve = best_ms_interleaved({bucket: graph.run for bucket, graph in graphs}, device, repeats)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    graphs.clear()  # the runners capture their own graphs; these were for timing only
    return dict(sorted(curve.items()))


def measure_allgather_ms(group, rows: int, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                         repeats: int = 3) -> float:
    """ms of one all-gather of a tick's state: `rows` rows of `sample_shape` from every rank of `group` (every rank
    must call this together; the caller agrees on one number across ranks)."""
    import torch.distributed as dist

    from ..runtime.distributed import _all_gather

    world = dist.get_world_size(group)
    local = torch.zeros(max(1, rows), *sample_shape, dtype=dtype, device=device)
    return best_ms(lambda: _all_gather(local, world, group), device, repeats)


def bucketed(curve: Mapping[int, float], buckets: tuple[int, ...]) -> Callable[[int], float]:
    """rows -> ms of a call padded to its bucket (autotune's interpolation beyond the largest bucket)."""
    from .pricing import interpolate_ms

    table = dict(curve)
    limit = max(buckets)

    def latency(rows: int) -> float:
        return interpolate_ms(table, bucket_for(rows, buckets) if rows <= limit else rows)

    return latency
