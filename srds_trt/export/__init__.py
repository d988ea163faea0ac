"""Export stage: a registry UNet → ONNX (dynamic `rows`) → parity gate → TensorRT plan + manifest.

Run it with `python -m srds_trt.export --model digits`. The loading side (`verify_artifacts`, `find_artifacts`,
`read_manifest`, `tensorrt_module`) imports without torch-side work so a runtime can use it alone.
"""
from .artifacts import (ArtifactError, TensorRTUnavailableError, find_artifacts, load_engine, read_manifest,
                        tensorrt_module, verify_artifacts)
from .config import ExportConfig, ExportConfigError

def __getattr__(name: str):
    # The pipeline pulls in torch and diffusers; load it only when asked for.
    if name in ("export_model", "export_unet", "ExportError", "ExportResult"):
        from . import build as pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)

__all__ = [
    "ArtifactError", "ExportConfig", "ExportConfigError", "ExportError", "ExportResult", "TensorRTUnavailableError",
    "export_model", "export_unet", "find_artifacts", "load_engine", "read_manifest", "tensorrt_module", "verify_artifacts",
]
