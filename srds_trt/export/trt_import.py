"""Import whichever TensorRT flavour is installed.

`tensorrt` (TensorRT 11, a GPU machine) is preferred over `tensorrt_rtx` (TensorRT-RTX, which can build plans on a
CPU-only machine but only runs them on RTX-class GPUs). Both expose the same builder API; the code that uses the
module sticks to what they share.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FLAVOURS = ("tensorrt", "tensorrt_rtx")


class TensorRTUnavailableError(ImportError):
    """Neither TensorRT flavour can be imported."""


def tensorrt_module() -> tuple[ModuleType, str]:
    """Return (module, flavour), flavour being "tensorrt" or "tensorrt_rtx"."""
    failures = []
    for name in FLAVOURS:
        try:
            return importlib.import_module(name), name
        except ImportError as exc:  # a broken install is as unusable as a missing one
            failures.append(f"{name}: {exc}")
    raise TensorRTUnavailableError(
        "no TensorRT installed: pip install 'srds_trt[tensorrt]' (TensorRT 11, NVIDIA GPU) or "
        "'srds_trt[tensorrt-rtx]' (TensorRT-RTX, builds on CPU) (" + "; ".join(failures) + ")"
    )
