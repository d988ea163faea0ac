"""Loading-side checks on hand-made artifact folders: no TensorRT build needed, so these run everywhere."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from srds_trt.export.artifacts import ArtifactError, normalise_capability, read_manifest, verify_artifacts
from srds_trt.export.manifest import SCHEMA, file_entries

FLAVOUR, VERSION = "tensorrt_rtx", "1.7.1.116"


def write_onnx(folder: Path, location: str | None) -> Path:
    """A one-initializer model; with `location`, its weight lives in external data at that path."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], np.arange(4, dtype=np.float32))
    if location is not None:
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight],
    )
    path = folder / "unet.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def make_artifacts(folder: Path, location: str | None = None, extra: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_onnx(folder, location)
    (folder / "unet.plan").write_bytes(b"not really a plan")
    names = ["unet.onnx", "unet.plan", *extra]
    manifest = {
        "schema": SCHEMA, "key": "k",
        "onnx": {"file": "unet.onnx"},
        "tensorrt": {"flavour": FLAVOUR, "version": VERSION, "plan": "unet.plan",
                     "target": {"compute_capabilities": ["8.0", "8.6", "8.9", "12.0"]}},
        "request": {"min_batch": 1, "max_batch": 8},
        "files": file_entries([folder / n for n in names]),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def verify(folder: Path, target: str | None = None) -> dict:
    return verify_artifacts(folder, flavour=FLAVOUR, version=VERSION, target=target)


def test_inside_external_data_accepted(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "unet.onnx.data").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    make_artifacts(folder, "unet.onnx.data", extra=("unet.onnx.data",))
    assert verify(folder, "sm_86")["key"] == "k"


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd"])
def test_escaping_external_data_refused(tmp_path, location):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    folder = make_artifacts(tmp_path / "a", location)
    with pytest.raises(ArtifactError, match="leaves"):
        verify(folder)


def test_symlinked_external_data_refused(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    folder = tmp_path / "a"
    folder.mkdir()
    os.symlink(tmp_path / "outside.bin", folder / "unet.onnx.data")
    make_artifacts(folder, "unet.onnx.data")
    with pytest.raises(ArtifactError, match="leaves"):
        verify(folder)


def test_unlisted_external_data_refused(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    make_artifacts(folder, "weights.bin")
    with pytest.raises(ArtifactError, match="not listed"):
        verify(folder)


def test_modified_missing_or_foreign_files_refused(tmp_path):
    folder = make_artifacts(tmp_path / "a")
    (folder / "unet.plan").write_bytes(b"evil")
    with pytest.raises(ArtifactError, match="sha256"):
        verify(folder)
    (folder / "unet.plan").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify(folder)

    folder = make_artifacts(tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../b/unet.plan"] = manifest["files"].pop("unet.plan")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a file of this folder"):
        verify(folder)


def test_version_flavour_target_and_schema(tmp_path):
    folder = make_artifacts(tmp_path / "a")
    with pytest.raises(ArtifactError, match="1.7.1.116"):
        verify_artifacts(folder, flavour=FLAVOUR, version="1.8.0", target=None)
    with pytest.raises(ArtifactError, match="tensorrt_rtx"):
        verify_artifacts(folder, flavour="tensorrt", version=VERSION, target=None)
    with pytest.raises(ArtifactError, match="9.0"):
        verify(folder, "sm_90")
    assert verify(folder, "12.0")["schema"] == SCHEMA

    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "schema": "srds_trt.unet-artifacts/999"}))
    with pytest.raises(ArtifactError, match="schema"):
        read_manifest(folder)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "missing")


@pytest.mark.parametrize("text, expected", [("sm_90", "9.0"), ("SM86", "8.6"), ("8.9", "8.9"), ("sm_120", "12.0")])
def test_normalise_capability(text, expected):
    assert normalise_capability(text) == expected
