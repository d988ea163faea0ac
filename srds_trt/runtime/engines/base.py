"""One engine interface for every backend: static buffers per batch bucket, enqueue on a given stream.

An engine is a conditional UNet call `engine(x[rows], t[rows], cond[rows, ...]) -> output[rows]` whose buffers
never move: for every bucket (a row capacity, e.g. 1, 2, 4, ... 64) it owns input and output tensors, and a
call copies its rows in, pads to the bucket, and enqueues the backend on those buffers. Because the addresses
are fixed, the whole call can live inside a CUDA graph (the backend's own, per bucket, or a caller's that
captures more work around `enqueue`).

Output ownership: `io(bucket).output` is overwritten by the next enqueue of that bucket; `__call__` returns a
copy, `enqueue` users copy out themselves.
"""

from __future__ import annotations

import bisect
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int64": torch.long}


class EngineError(RuntimeError):
    """An engine cannot be built or run as asked."""


@dataclass(frozen=True)
class EngineSpec:
    """What a caller must know to feed an engine."""

    sample_shape: tuple[int, ...]  # (C, H, W)
    cond_shape: tuple[int, ...]  # () for class labels, (L, D) for text embeddings
    cond_dtype: torch.dtype  # torch.long for class labels
    dtype: torch.dtype  # the engine's float precision (inputs and output)
    timestep_dtype: torch.dtype = torch.float32  # exported engines take fp32 timesteps

    @classmethod
    def from_manifest(cls, manifest: dict) -> "EngineSpec":
        """The IO contract an export's manifest describes (srds_trt.export writes it)."""
        from ...export.artifacts import ArtifactError

        inputs = {t["name"]: t for t in manifest["io"]["inputs"]}
        cond = inputs.get("class_labels") or inputs.get("encoder_hidden_states")
        if "sample" not in inputs or "timestep" not in inputs or cond is None:
            raise ArtifactError(f"manifest inputs {sorted(inputs)} do not follow the srds_trt IO contract")
        return cls(
            sample_shape=tuple(inputs["sample"]["shape"][1:]),
            cond_shape=tuple(cond["shape"][1:]),
            cond_dtype=TORCH_DTYPES[cond["dtype"]],
            dtype=TORCH_DTYPES[inputs["sample"]["dtype"]],
            timestep_dtype=TORCH_DTYPES[inputs["timestep"]["dtype"]],
        )


@dataclass
class BucketIO:
    """The static buffers of one bucket."""

    sample: Tensor
    timestep: Tensor
    cond: Tensor
    output: Tensor

    @property
    def rows(self) -> int:
        return self.sample.shape[0]


def default_buckets(max_rows: int, min_rows: int = 1) -> tuple[int, ...]:
    """A ladder of row counts from min_rows to max_rows: 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, ...

    vLLM captures a ladder of batch sizes; steps of 1.5x rather than 2x keep padding under a third, which
    matters here because SRDS ticks often hold B + 1 segments (e.g. 33 x 2 rows at N = 1024 with guidance).
    """
    if not 1 <= min_rows <= max_rows:
        raise ValueError(f"need 1 <= min_rows <= max_rows, got {min_rows}, {max_rows}")
    ladder, b = {1, 2}, 2
    while b < max_rows:
        ladder.update({b, b * 3 // 2})
        b *= 2
    return tuple(sorted(r for r in ladder if min_rows <= r < max_rows) + [max_rows])


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `rows`."""
    i = bisect.bisect_left(buckets, rows)
    if i == len(buckets):
        raise EngineError(f"{rows} rows exceed the largest bucket ({buckets[-1]}); raise max rows (re-export for TensorRT)")
    return buckets[i]


def bytes_per_row(spec: EngineSpec) -> int:
    """Static-buffer bytes of one row: sample, output, timestep and conditioning."""
    def size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = 1
        for d in shape:
            n *= d
        return n * torch.empty((), dtype=dtype).element_size()

    return (2 * size(spec.sample_shape, spec.dtype) + size((), spec.timestep_dtype)
            + size(spec.cond_shape, spec.cond_dtype))


# A call's activations are not known before it runs; this many sample-sized tensors per row of the widest
# bucket is a deliberately generous guess for the UNets here (digits: ~40 live feature maps of the sample's
# size per row), so the estimate refuses what certainly cannot fit, not what might.
ACTIVATION_SAMPLES_PER_ROW = 64


def estimate_memory(spec: EngineSpec, buckets: tuple[int, ...], lanes: int = 1) -> int:
    """Bytes an engine needs up front: every bucket's static buffers, per lane, plus the widest call's activations."""
    per_row = bytes_per_row(spec)
    sample = (per_row - bytes_per_row(EngineSpec((), spec.cond_shape, spec.cond_dtype, spec.dtype, spec.timestep_dtype))) // 2
    return sum(buckets) * lanes * per_row + ACTIVATION_SAMPLES_PER_ROW * max(buckets) * sample


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device` (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(spec: EngineSpec, buckets: tuple[int, ...], device: torch.device, lanes: int = 1) -> int:
    """Refuse (EngineError, with the estimate) an engine whose buffers cannot fit; returns the estimate."""
    need = estimate_memory(spec, buckets, lanes)
    have = available_memory(device)
    if have is not None and need > have:
        raise EngineError(f"an engine of {buckets[-1]} rows needs about {need / 2**30:.1f} GiB but {device} has "
                          f"{have / 2**30:.1f} GiB available; re-export with a smaller --max-batch (or use fewer "
                          "--num-images or --blocks)")
    return need


def allocate_io(spec: EngineSpec, rows: int, device: torch.device) -> BucketIO:
    return BucketIO(
        sample=torch.zeros(rows, *spec.sample_shape, dtype=spec.dtype, device=device),
        timestep=torch.zeros(rows, dtype=spec.timestep_dtype, device=device),
        cond=torch.zeros(rows, *spec.cond_shape, dtype=spec.cond_dtype, device=device),
        output=torch.zeros(rows, *spec.sample_shape, dtype=spec.dtype, device=device),
    )


class Engine(ABC):
    """Base class: subclasses allocate `self._io` per bucket and implement `enqueue`."""

    name: str = "engine"

    def __init__(self, spec: EngineSpec, buckets: tuple[int, ...], device: torch.device | str, lanes: int = 1):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive row counts, got {buckets}")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.spec = spec
        self.buckets = tuple(buckets)
        self.device = torch.device(device)
        self.lanes = lanes
        self.memory_estimate = check_fits(spec, self.buckets, self.device, lanes)  # before allocating anything
        # A lane is one set of buffers (and, for TensorRT, one execution context with its own profile):
        # two calls in flight on two streams need two lanes.
        self._io = {(lane, b): allocate_io(spec, b, self.device) for lane in range(lanes) for b in self.buckets}

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, rows: int) -> int:
        return bucket_for(rows, self.buckets)

    def io(self, bucket: int, lane: int = 0) -> BucketIO:
        return self._io[(lane, bucket)]

    @abstractmethod
    def enqueue(self, bucket: int, lane: int = 0, stream: torch.cuda.Stream | None = None, *, replay: bool = True) -> None:
        """Run the model on io(bucket, lane)'s buffers, on `stream` (the current one if None).

        replay=False forces a plain launch: a caller capturing its own CUDA graph around this call cannot
        replay another graph inside it.
        """

    def load(self, x: Tensor, t: Tensor, cond: Tensor, lane: int = 0) -> BucketIO:
        """Copy rows into the smallest bucket's buffers; padding rows repeat row 0 (finite, discarded)."""
        rows = x.shape[0]
        io = self.io(self.bucket_for(rows), lane)
        io.sample[:rows].copy_(x)
        io.timestep[:rows].copy_(t)
        io.cond[:rows].copy_(cond)
        if rows < io.rows:
            io.sample[rows:].copy_(x[:1].expand_as(io.sample[rows:]))
            io.timestep[rows:].copy_(t[:1].expand_as(io.timestep[rows:]))
            io.cond[rows:].copy_(cond[:1].expand_as(io.cond[rows:]))
        return io

    def measure_noise_floor(self, rows: int | None = None, seed: int = 0) -> float:
        """Max |a row evaluated alone - the same row inside a batch of `rows`| over random inputs.

        Batched kernels pick other algorithms (and reduction orders) per batch size, so SRDS, whose rows move
        between batches, sees this much noise per call; a convergence tolerance must sit above it.
        """
        rows = min(rows or self.max_rows, self.max_rows)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, *self.spec.sample_shape, generator=gen).to(self.device, self.spec.dtype)
        t = torch.linspace(999, 0, rows).to(self.device, self.spec.timestep_dtype)
        if self.spec.cond_dtype == torch.long:
            cond = (torch.arange(rows) % 10).to(self.device)
        else:
            cond = torch.randn(rows, *self.spec.cond_shape, generator=gen).to(self.device, self.spec.cond_dtype)
        batched = self(x, t, cond).float()
        single = torch.cat([self(x[i : i + 1], t[i : i + 1], cond[i : i + 1]) for i in range(rows)]).float()
        return float((batched - single).abs().max())

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The conditional-model contract of guidance.py; returns a copy of the output rows."""
        io = self.load(x, t, cond)
        self.enqueue(io.rows)
        return io.output[: x.shape[0]].clone()
