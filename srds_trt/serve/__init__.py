"""python -m srds_trt.serve: the Open Inference Protocol (KServe v2) over HTTP with dynamic batching."""

from .app import ServeConfig, build_app
from .batching import BatchConfig

__all__ = ["BatchConfig", "ServeConfig", "build_app"]
