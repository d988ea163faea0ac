"""python -m srds_trt.serve: KServe v2 (REST and gRPC) and the OpenAI images API in front of one batching queue.
Importing this package is cheap: the server's dependencies load on first use of build_app and the configs."""

__all__ = ["BatchConfig", "ServeConfig", "build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from .app import build_app

        return build_app
    if name == "ServeConfig":
        from .service import ServeConfig

        return ServeConfig
    if name == "BatchConfig":
        from .batching import BatchConfig

        return BatchConfig
    raise AttributeError(f"module 'srds_trt.serve' has no attribute {name!r}")
