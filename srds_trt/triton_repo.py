"""Moved to srds_trt.serve.triton.repo (kept so `from srds_trt.triton_repo import ...` keeps working)."""

from .serve.triton.repo import TritonRepoError, row_buckets, write_triton_repo  # noqa: F401
