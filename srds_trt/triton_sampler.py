"""Moved to srds_trt.serve.triton.sampler (kept for repositories written before the move)."""

from .serve.triton.sampler import TritonPythonModel  # noqa: F401
