"""Engine specs and checks from an export folder's manifest (srds_trt.export writes it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..export.artifacts import ArtifactError, check_external_data, check_files, read_manifest
from .base import EngineSpec

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int64": torch.long}


def spec_from_manifest(manifest: dict[str, Any]) -> EngineSpec:
    inputs = {t["name"]: t for t in manifest["io"]["inputs"]}
    cond = inputs.get("class_labels") or inputs.get("encoder_hidden_states")
    if "sample" not in inputs or "timestep" not in inputs or cond is None:
        raise ArtifactError(f"manifest inputs {sorted(inputs)} do not follow the srds_trt IO contract")
    return EngineSpec(
        sample_shape=tuple(inputs["sample"]["shape"][1:]),
        cond_shape=tuple(cond["shape"][1:]),
        cond_dtype=TORCH_DTYPES[cond["dtype"]],
        dtype=TORCH_DTYPES[inputs["sample"]["dtype"]],
        timestep_dtype=TORCH_DTYPES[inputs["timestep"]["dtype"]],
    )


def cond_input_name(manifest: dict[str, Any]) -> str:
    names = [t["name"] for t in manifest["io"]["inputs"]]
    return "class_labels" if "class_labels" in names else "encoder_hidden_states"


def verify_onnx(artifact_dir: str | Path) -> dict[str, Any]:
    """Check the ONNX model (and its external data) against the manifest's sha256 before ONNX Runtime reads it."""
    folder = Path(artifact_dir)
    manifest = read_manifest(folder)
    onnx_name = manifest["onnx"]["file"]
    names = [onnx_name] + ([manifest["onnx"]["external_data"]] if manifest["onnx"].get("external_data") else [])
    check_files(folder, manifest, names)
    check_external_data(folder / onnx_name, folder, set(manifest["files"]))
    return manifest
