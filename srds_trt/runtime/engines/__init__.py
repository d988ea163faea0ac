"""Engines: one interface (base.Engine) over PyTorch, ONNX Runtime and TensorRT."""

from .base import BucketIO, Engine, EngineError, EngineSpec, bucket_for, default_buckets
from .torch_engine import TorchEngine

__all__ = ["BucketIO", "Engine", "EngineError", "EngineSpec", "TorchEngine", "bucket_for", "default_buckets"]
