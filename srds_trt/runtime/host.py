"""What a host service hands the runtime: its CUDA stream and DLPack tensors.

Streams: `run(..., stream=s)` accepts a torch.cuda.Stream, a raw cudaStream_t as an int, or any object with the
CUDA stream protocol `__cuda_stream__() -> (version, handle)` (cuda.core's Stream, CuPy, Numba, ...). Raw handles
are wrapped with torch.cuda.ExternalStream, which takes no ownership; torch's streams and events then order
the runner on it (entry waits on the host stream, the host stream waits on the runner's final event). That
covers everything the runner does with a host's CUDA objects, so cuda-python (cuda.core / cuda.bindings) is not
needed here: it would replace nothing but the two-line handle parse below, and would add a dependency.

Tensors: anything with `__dlpack__` (NumPy, CuPy, JAX, a host's own device buffers) is viewed with
torch.from_dlpack, zero-copy; results are torch tensors, which speak DLPack back.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor


def stream_handle(stream: Any) -> int:
    """The raw cudaStream_t of a host stream object (0: the legacy default stream). Pure: no CUDA needed."""
    if isinstance(stream, bool):
        raise TypeError("stream must be a CUDA stream, an int handle or an object with __cuda_stream__, got a bool")
    if isinstance(stream, int):
        if stream < 0:
            raise ValueError(f"a CUDA stream handle is a non-negative int, got {stream}")
        return stream
    if hasattr(stream, "__cuda_stream__"):
        protocol = stream.__cuda_stream__()
        if not (isinstance(protocol, tuple) and len(protocol) == 2 and isinstance(protocol[1], int)):
            raise TypeError(f"__cuda_stream__() must return (version, handle), got {protocol!r}")
        return protocol[1]
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream / ExternalStream
        return int(stream.cuda_stream)
    raise TypeError(f"stream must be a torch.cuda.Stream, an int handle or an object with __cuda_stream__, "
                    f"got {type(stream).__name__}")


def host_stream(stream: Any, device: torch.device) -> "torch.cuda.Stream | None":
    """The torch stream to order a run on: the caller's current stream if None; None on a CPU device.

    On a CPU device a given stream is still checked (the API shape is the same everywhere) and then unused:
    CPU work is synchronous, there is nothing to order.
    """
    if stream is not None:
        handle = stream_handle(stream)
    if device.type != "cuda":
        return None
    if stream is None:
        return torch.cuda.current_stream(device)
    if isinstance(stream, torch.cuda.Stream):
        return stream
    return torch.cuda.ExternalStream(handle, device=device)


def as_tensor(value: Any, name: str) -> Tensor:
    """A torch view of a tensor or any DLPack producer, without copying."""
    if isinstance(value, Tensor):
        return value
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    raise TypeError(f"{name} must be a torch tensor or support DLPack (__dlpack__), got {type(value).__name__}")


def device_now(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work has finished (a CUDA sync; nothing on a CPU): what every
    wall-time measurement in srds_trt reads, so GPU times include the kernels they launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
