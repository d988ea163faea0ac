"""ONNX → TensorRT plan with the TensorRT builder API that `tensorrt` (11.x) and `tensorrt_rtx` share.

Builder, strongly typed network, OnnxParser, optimization profiles, build_serialized_network. Precision comes from
the ONNX (strong typing), so no precision flags are set. The timing cache is used only by `tensorrt`: in
TensorRT-RTX its calls are deprecated no-ops (kernels are specialised at load time there instead).
Where the flavour has `BuilderFlag.REQUIRE_USER_ALLOCATION` (TensorRT-RTX: stream capture needs it) it is set, so
the runtime can capture the plan's enqueue in a CUDA graph; TensorRT 11 lacks the flag and captures without it.

Why not Polygraphy's TensorRT backend (NetworkFromOnnxPath / CreateConfig / engine_bytes_from_network): it picks
`tensorrt` or `tensorrt_rtx` once, from POLYGRAPHY_USE_TENSORRT_RTX read at its import (a process global), while
this module takes the flavour as an argument; and CreateConfig has no TensorRT-RTX compute-capability targets.
What remains here is the part both would write anyway: parse, profiles, flags, build. Users can still point
`polygraphy inspect model unet.plan` / `polygraphy run unet.onnx` at the artifacts (see README).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .io_contract import IOContract


class BuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build a plan."""


@dataclass(frozen=True)
class BuildTarget:
    """The GPUs a plan is built for; a plan is refused on any other compute capability."""

    compute_capabilities: tuple[str, ...]
    note: str

    def as_json(self) -> dict[str, Any]:
        return {"compute_capabilities": list(self.compute_capabilities), "note": self.note}


def build_target(trt: ModuleType, flavour: str) -> BuildTarget:
    if flavour == "tensorrt_rtx":
        # Named explicitly rather than left to the builder's default, so what the manifest says is what was built.
        # Turing (SM75) is left out as in the builder's own default; it needs its own plan.
        members = [name for name in dir(trt.ComputeCapability) if name.startswith("SM") and name != "SM75"]
        ccs = tuple(sorted((f"{int(n[2:-1])}.{n[-1]}" for n in members), key=lambda c: tuple(map(int, c.split(".")))))
        return BuildTarget(ccs, "TensorRT-RTX ahead-of-time build (no GPU needed to build); runs only on these "
                                "compute capabilities, so not on 9.0 (H100/H200)")
    import torch

    if not torch.cuda.is_available():
        raise BuildError("TensorRT 11 builds for the GPU it runs on and none is visible; "
                         "use TensorRT-RTX (pip install 'srds_trt[tensorrt-rtx]') to build without a GPU")
    major, minor = torch.cuda.get_device_capability()
    return BuildTarget((f"{major}.{minor}",), f"TensorRT build on {torch.cuda.get_device_name()}")


def capture_flag(trt: ModuleType) -> Any:
    """BuilderFlag.REQUIRE_USER_ALLOCATION where the flavour has it (TensorRT-RTX), else None."""
    return getattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION", None)


def _rtx_capability_enum(trt: ModuleType, capability: str) -> Any:
    major, minor = capability.split(".")
    return getattr(trt.ComputeCapability, f"SM{major}{minor}")


@dataclass(frozen=True)
class BuildResult:
    plan: bytes | memoryview  # the serialised plan, a view of TensorRT's host memory (not copied)
    seconds: float
    device_memory_bytes: int | None  # known only where the plan can be deserialised (a supported GPU)


def build_tensorrt_plan(
    trt: ModuleType,
    flavour: str,
    onnx_path: Path,
    contract: IOContract,
    batch_range: tuple[int, int, int],
    *,
    profiles: int,
    target: BuildTarget,
    timing_cache: Path | None,
) -> BuildResult:
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: required on TensorRT-RTX and 10.x to take precision from the ONNX; accepted (and implied) on 11.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file so external data resolves next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    flag = capture_flag(trt)
    if flag is not None:
        config.set_flag(flag)
    if flavour == "tensorrt_rtx":
        config.num_compute_capabilities = len(target.compute_capabilities)
        for index, capability in enumerate(target.compute_capabilities):
            config.set_compute_capability(_rtx_capability_enum(trt, capability), index)
    for _ in range(profiles):
        # Identical profiles: one per concurrent execution context (a context owns a profile while it runs).
        profile = builder.create_optimization_profile()
        for spec in contract.inputs:
            profile.set_shape(spec.name, *(spec.concrete(rows) for rows in batch_range))
        config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None and flavour == "tensorrt":
        blob = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)  # False: refuse a cache from another device/version

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise BuildError("TensorRT failed to build a plan (see its log above)")
    if cache is not None:
        _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    del parser, network  # the parsed weights (a real model's size) are not needed once the plan exists
    view = memoryview(plan).cast("B")  # no copy: SD3-medium's fp32 plan is 8 GB (keeps `plan` alive)
    return BuildResult(view, seconds, _device_memory(trt, logger, view, target))


def _device_memory(trt: ModuleType, logger: Any, plan: bytes, target: BuildTarget) -> int | None:
    """Deserialise once to read the activation memory a context needs, where this machine can run the plan."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if f"{major}.{minor}" not in target.compute_capabilities:
        return None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    return int(engine.device_memory_size_v2) if engine is not None else None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
