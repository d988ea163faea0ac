"""One sampling job across ranks on torch.distributed: every rank runs the same sampler, only model calls split.

Design (chosen over "whole blocks per rank, exchange boundaries"): every rank runs the SAME deterministic sampler
on the same inputs; each model call's rows are cut into K equal contiguous slices (padded by repeating row 0),
rank k runs slice k through its own model or engine, and one all_gather_into_tensor gives every rank the whole
output. All ranks then hold identical states, so they take the same branches, stop at the same iteration and
return the same sample and stats with no other communication; samplers, runners and the stopping rule stay
untouched. Classifier-free guidance composes for free: its uncond/cond halves are rows of one call (shard the
conditional model `cond_model(x, t, cond)`), so with K = 2 they land on different GPUs.
Why not whole blocks per rank: SRDS's fine solves are already batched per tick, so giving rank k the blocks of
its slice IS row sharding; exchanging only boundaries would save the all-gather of finished rows but needs a
second, rank-dependent control flow (and a broadcast of every coarse sweep). One collective per tick is simpler
and, at SD shapes (~0.1-0.3 ms per all-gather of 64x64x4 latents over NVLink), small beside a UNet call.

The full design note (what was measured, why these choices): docs/multi-gpu.md, section "Module notes: srds_trt/runtime/distributed.py".
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .engines.base import Engine

DEFAULT_TIMEOUT_S = 120.0


class DistributedError(RuntimeError):
    """A distributed job cannot start or cannot go on (bad world, a rank died or raised, a timeout)."""


def torchrun_world() -> tuple[int, int] | None:
    """(rank, world_size) from torchrun's environment variables, or None when not launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise DistributedError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} are not integers") from None
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: str | None) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when CUDA is there (one GPU per process), else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def init_from_env(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Init the default process group from torchrun's variables (gloo on CPU, NCCL on CUDA); None if not torchrun.

    Returns the group (the default WORLD group) after `check_world` has agreed on devices across ranks."""
    world = torchrun_world()
    if world is None:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    group = dist.group.WORLD
    check_world(group, device)
    return group


def check_world(group, device: torch.device) -> None:
    """Refuse up front what cannot work: ranks on different device types, or a backend that does not fit them."""
    backend = dist.get_backend(group)
    if device.type == "cuda" and "nccl" not in backend:
        raise DistributedError(f"CUDA ranks need the nccl backend, the process group uses {backend}")
    if device.type == "cpu" and "gloo" not in backend:
        raise DistributedError(f"CPU ranks need the gloo backend, the process group uses {backend}")
    kinds = [None] * dist.get_world_size(group)
    dist.all_gather_object(kinds, device.type, group=group)
    if len(set(kinds)) > 1:
        raise DistributedError(f"ranks run on different device types {kinds}; use one kind of device on every rank")


def group_size(group) -> int:
    """Ranks in `group` (1 for None: one process, no torch.distributed)."""
    return 1 if group is None else dist.get_world_size(group)


def shard_rows(rows: int, world: int) -> int:
    """Rows per rank for a call of `rows` rows: equal contiguous slices, the last ones padded."""
    return max(1, math.ceil(rows / world))


@dataclass
class RankCounts:
    """Every rank's calls and rows, known on every rank (the split is deterministic): no communication needed."""

    world_size: int
    calls: int = 0
    rows: list[int] = field(default_factory=list)  # real (unpadded) rows each rank evaluated
    padded_rows: list[int] = field(default_factory=list)  # rows each rank computed, padding included

    def __post_init__(self):
        self.rows = self.rows or [0] * self.world_size
        self.padded_rows = self.padded_rows or [0] * self.world_size

    def add(self, rows: int) -> None:
        per = shard_rows(rows, self.world_size)
        self.calls += 1
        for k in range(self.world_size):
            self.rows[k] += max(0, min(per, rows - k * per))
            self.padded_rows[k] += per

    def snapshot(self) -> "RankCounts":
        return RankCounts(self.world_size, self.calls, list(self.rows), list(self.padded_rows))

    def since(self, earlier: "RankCounts") -> "RankCounts":
        """The calls and rows counted after `earlier` (a snapshot): one pipeline call's share of a long-lived engine."""
        return RankCounts(self.world_size, self.calls - earlier.calls,
                          [a - b for a, b in zip(self.rows, earlier.rows)],
                          [a - b for a, b in zip(self.padded_rows, earlier.padded_rows)])

    def as_stats(self) -> dict:
        return {"world_size": self.world_size, "rank_engine_calls": self.calls, "rank_rows": list(self.rows),
                "rank_padded_rows": list(self.padded_rows)}


def _all_gather(local: Tensor, world: int, group) -> Tensor:
    out = local.new_empty((world * local.shape[0], *local.shape[1:]))
    try:
        # all_gather_single is all_gather_into_tensor's new name (torch >= 2.13); one collective either way
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, local.contiguous(), group=group)
    except RuntimeError as exc:  # a peer raised, died or timed out: one line for the caller
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"rank {dist.get_rank(group)}: all-gather failed (another rank died, raised or timed "
                               f"out): {first[:200]}") from None
    return out


_nullcontext = contextlib.nullcontext


def _pad(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


class ShardedModel:
    """`model(x[rows], t[rows], *row_args)` with each call's rows split across the group's ranks and all-gathered.

    Every argument is row-aligned (dim 0), so it wraps a plain `model(x, t)` as well as a conditional
    `cond_model(x, t, cond)` (shard that one under guidance: the uncond/cond halves are rows). Every rank must make
    the same sequence of calls with the same row counts (true when all run the same deterministic sampler).
    """

    def __init__(self, model: Callable[..., Tensor], group=None):
        self.model = model
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.counts = RankCounts(self.world_size)

    def __call__(self, x: Tensor, t: Tensor, *row_args: Tensor) -> Tensor:
        rows = x.shape[0]
        per = shard_rows(rows, self.world_size)
        lo, hi = self.rank * per, (self.rank + 1) * per
        args = [_pad(a, per * self.world_size)[lo:hi] for a in (x, t, *row_args)]
        local = self.model(*args)
        self.counts.add(rows)
        return _all_gather(local, self.world_size, self.group)[:rows]


class ShardedEngine(Engine):
    """An Engine whose enqueue runs this rank's slice of the bucket on an inner engine, then all-gathers.

    Buffers: this engine's own static buffers per bucket (what runners load and read); the inner engine's bucket
    for the slice (ceil(bucket / K) rows) receives the slice by copy. With NCCL the copy, the inner launch and the
    all-gather are all stream work on static addresses, so a caller's CUDA graph can hold them (gloo cannot be
    captured; on a CPU there are no graphs). Inner engine graphs are not replayed (replay=False) because a
    capture around this enqueue cannot replay another graph inside it.
    """

    name = "sharded"

    def __init__(self, engine: Engine, group=None, buckets: tuple[int, ...] | None = None):
        self.inner = engine
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if buckets is None:  # every bucket whose slice fits the inner engine
            buckets = tuple(r * self.world_size for r in engine.buckets)
        for b in buckets:
            engine.bucket_for(shard_rows(b, self.world_size))  # raises EngineError when a slice does not fit
        super().__init__(engine.spec, buckets, engine.device, engine.lanes)
        self.name = f"sharded({engine.name}, world={self.world_size})"
        self.counts = RankCounts(self.world_size)

    def enqueue(self, bucket: int, lane: int = 0, stream=None, *, replay: bool = True) -> None:
        io = self.io(bucket, lane)
        per = shard_rows(bucket, self.world_size)
        inner_bucket = self.inner.bucket_for(per)
        inner = self.inner.io(inner_bucket, lane)
        lo, hi = self.rank * per, min(bucket, (self.rank + 1) * per)
        n = max(0, hi - lo)
        for name in ("sample", "timestep", "cond"):
            dst, src = getattr(inner, name), getattr(io, name)
            if n:
                dst[:n].copy_(src[lo:hi])
            if n < inner_bucket:  # padding rows repeat row 0 (finite, discarded)
                dst[n:].copy_(src[:1].expand_as(dst[n:]))
        self.inner.enqueue(inner_bucket, lane, stream, replay=replay)
        # NCCL orders its work after the current stream's: make the caller's stream current around the gather
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            gathered = _all_gather(inner.output[:per], self.world_size, self.group)
            io.output.copy_(gathered[:bucket])
        self.counts.add(bucket)
