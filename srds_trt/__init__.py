"""Low-latency Self-Refining Diffusion Samplers (Parareal SRDS). `import srds_trt` stays cheap: the pipeline
(torch, diffusers) loads on first use of `srds_trt.SRDSPipeline`."""

__all__ = ["Cancelled", "ConvergenceReport", "SRDSPipeline", "SRDSPipelineOutput"]


def __getattr__(name: str):
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'srds_trt' has no attribute {name!r}")
