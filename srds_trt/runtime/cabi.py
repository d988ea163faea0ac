"""ctypes binding of libsrds_trt (cpp/include/srds_trt.h): what the C ABI tests and the overhead benchmark drive.

A Python program normally uses SRDSPipeline; this binding exists to exercise the C ABI exactly as a C caller
would (struct layouts, status codes, caller-owned buffers), from Python.
"""
from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIBRARY_ENV = "SRDS_TRT_LIB"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "cpp" / "libsrds_trt.so"

OK, INVALID_ARGUMENT, ARTIFACT_ERROR, NON_FINITE, ENGINE_ERROR, INTERNAL_ERROR = range(6)
SAMPLERS = {"serial": 0, "srds": 1, "paradigms": 2}


class Request(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("sampler", ctypes.c_int32), ("steps", ctypes.c_int32),
                ("num_images", ctypes.c_int32), ("class_ids", ctypes.POINTER(ctypes.c_int64)),
                ("embeddings", ctypes.POINTER(ctypes.c_float)), ("uncond_embeddings", ctypes.POINTER(ctypes.c_float)),
                ("guidance_scale", ctypes.c_double), ("initial_noise", ctypes.POINTER(ctypes.c_float)),
                ("seed", ctypes.c_uint64), ("tol", ctypes.c_double), ("num_blocks", ctypes.c_int32),
                ("max_iters", ctypes.c_int32), ("cuda_stream", ctypes.c_void_p),
                ("window", ctypes.c_int32)]


class Report(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("sampler", ctypes.c_int32), ("iterations", ctypes.c_int32),
                ("num_blocks", ctypes.c_int32), ("sequential_calls", ctypes.c_int32), ("engine_calls", ctypes.c_int64),
                ("model_evals", ctypes.c_int64), ("residual", ctypes.c_double), ("estimated_error", ctypes.c_double),
                ("tol", ctypes.c_double), ("converged", ctypes.c_int32), ("cut", ctypes.c_int32),
                ("seconds", ctypes.c_double), ("engine_seconds", ctypes.c_double)]


class Info(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("channels", ctypes.c_int32), ("height", ctypes.c_int32),
                ("width", ctypes.c_int32), ("conditioning", ctypes.c_int32), ("num_classes", ctypes.c_int32),
                ("null_class", ctypes.c_int32), ("cond_length", ctypes.c_int32), ("cond_dim", ctypes.c_int32),
                ("max_rows", ctypes.c_int32), ("default_guidance_scale", ctypes.c_double),
                ("default_tol", ctypes.c_double)]


class CABIError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"status {status}: {message}")
        self.status, self.message = status, message


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path or os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY))
    lib.srds_trt_version.restype = ctypes.c_char_p
    lib.srds_trt_last_error.restype = ctypes.c_char_p
    lib.srds_trt_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.srds_trt_open_engine.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
    lib.srds_trt_info_get.argtypes = [ctypes.c_void_p, ctypes.POINTER(Info)]
    lib.srds_trt_generate.argtypes = [ctypes.c_void_p, ctypes.POINTER(Request), ctypes.POINTER(ctypes.c_float),
                                      ctypes.c_size_t, ctypes.POINTER(Report)]
    lib.srds_trt_describe_plan.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                           ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.srds_trt_close.argtypes = [ctypes.c_void_p]
    lib.srds_trt_request_init.argtypes = [ctypes.POINTER(Request)]
    lib.srds_trt_report_init.argtypes = [ctypes.POINTER(Report)]
    for name in ("srds_trt_open", "srds_trt_open_engine", "srds_trt_info_get", "srds_trt_generate", "srds_trt_describe_plan"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


@dataclass
class Generated:
    sample: np.ndarray  # [images, C, H, W] float32
    report: Report


class Runtime:
    """One open export (srds_trt_open ... srds_trt_close)."""

    def __init__(self, export_dir: str | os.PathLike, lib: ctypes.CDLL | None = None) -> None:
        self.lib = lib or load_library()
        handle = ctypes.c_void_p()
        self._check(self.lib.srds_trt_open(str(export_dir).encode(), ctypes.byref(handle)))
        self.handle = handle
        info = Info(struct_size=ctypes.sizeof(Info))
        self._check(self.lib.srds_trt_info_get(self.handle, ctypes.byref(info)))
        self.info = info

    def _check(self, status: int) -> None:
        if status != OK:
            raise CABIError(status, self.lib.srds_trt_last_error().decode())

    def close(self) -> None:
        if getattr(self, "handle", None):
            self.lib.srds_trt_close(self.handle)
            self.handle = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.info.channels, self.info.height, self.info.width

    def request(self, *, class_ids, sampler: str = "srds", steps: int = 100, seed: int = 0,
                initial_noise: np.ndarray | None = None, tol: float | None = None, guidance_scale: float | None = None,
                num_blocks: int = 0, max_iters: int = -1, window: int = 0) -> tuple[Request, list]:
        r = Request()
        self.lib.srds_trt_request_init(ctypes.byref(r))
        keep: list = []
        ids = np.ascontiguousarray(np.asarray(class_ids, dtype=np.int64))
        keep.append(ids)
        r.class_ids = ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
        r.num_images = len(ids)
        r.sampler, r.steps, r.seed = SAMPLERS.get(sampler, sampler), steps, seed
        r.num_blocks, r.max_iters, r.window = num_blocks, max_iters, window
        r.tol = math.nan if tol is None else tol
        r.guidance_scale = math.nan if guidance_scale is None else guidance_scale
        if initial_noise is not None:
            noise = np.ascontiguousarray(initial_noise, dtype=np.float32)
            keep.append(noise)
            r.initial_noise = noise.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        return r, keep

    def generate_into(self, request: Request, out: np.ndarray, report: Report | None = None) -> int:
        """The raw call: status code; `out` (float32, C-contiguous) is the caller's buffer."""
        return self.lib.srds_trt_generate(self.handle, ctypes.byref(request),
                                          out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size,
                                          ctypes.byref(report) if report is not None else None)

    def generate(self, **kwargs) -> Generated:
        request, keep = self.request(**kwargs)
        out = np.empty((request.num_images, *self.sample_shape), dtype=np.float32)
        report = Report()
        self.lib.srds_trt_report_init(ctypes.byref(report))
        self._check(self.generate_into(request, out, report))
        return Generated(out, report)

    def describe_plan(self, steps: int, num_blocks: int = 0, max_iters: int = -1) -> str:
        needed = ctypes.c_size_t()
        self.lib.srds_trt_describe_plan(self.handle, steps, num_blocks, max_iters, None, 0, ctypes.byref(needed))
        buf = ctypes.create_string_buffer(needed.value)
        self._check(self.lib.srds_trt_describe_plan(self.handle, steps, num_blocks, max_iters, buf, needed.value, None))
        return buf.value.decode()
