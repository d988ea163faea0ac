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
    manifest = well_formed_manifest(file_entries([folder / n for n in names]))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def well_formed_manifest(files: dict) -> dict:
    """Every field the manifest schema requires, digits-shaped."""
    tensor = lambda name, shape, dtype: {"name": name, "shape": shape, "dtype": dtype}  # noqa: E731
    return {
        "schema": SCHEMA, "key": "k",
        "model": {"name": "digits", "conditioning": "class", "sample_shape": [1, 16, 16], "cond_shape": [],
                  "null_class": 10},
        "request": {"dtype": "fp32", "min_batch": 1, "opt_batch": 4, "max_batch": 8, "height": 16, "width": 16,
                    "profiles": 1, "weights_id": "w", "flavour": FLAVOUR, "version": VERSION,
                    "random_weights": False},
        "io": {"inputs": [tensor("sample", ["rows", 1, 16, 16], "fp32"), tensor("timestep", ["rows"], "fp32"),
                          tensor("class_labels", ["rows"], "int64")],
               "outputs": [tensor("out_sample", ["rows", 1, 16, 16], "fp32")]},
        "num_profiles": 1,
        "onnx": {"file": "unet.onnx"},
        "tensorrt": {"flavour": FLAVOUR, "version": VERSION, "plan": "unet.plan",
                     "target": {"compute_capabilities": ["8.0", "8.6", "8.9", "12.0"]}},
        "files": files,
    }


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


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("files"), "files: missing"),
    (lambda m: m.pop("tensorrt"), "tensorrt: missing"),
    (lambda m: m["tensorrt"].pop("version"), "tensorrt.version: missing"),
    (lambda m: m.__setitem__("files", ["unet.plan"]), "files: expected dict"),
    (lambda m: m["request"].__setitem__("max_batch", "8"), "request.max_batch: expected int, got str"),
    (lambda m: m["request"].__setitem__("max_batch", True), "request.max_batch: expected int, got bool"),
    (lambda m: m["files"]["unet.plan"].__setitem__("sha256", 5), "files.unet.plan.sha256: expected str"),
    (lambda m: m["io"]["inputs"].append(3), "io.inputs[3]: expected an object"),
    (lambda m: m["tensorrt"]["target"].__setitem__("compute_capabilities", [8.9]),
     "tensorrt.target.compute_capabilities[0]: expected str"),
    (lambda m: m.__setitem__("latency_per_rows", {"4": "fast"}), "latency_per_rows.4"),
    (lambda m: m.__setitem__("latency_per_rows", [1.0]), "latency_per_rows: expected dict"),
])
def test_malformed_manifest_is_an_artifact_error_naming_the_field(tmp_path, edit, field):
    """Hand-edited or truncated manifests: an ArtifactError naming the field, never KeyError/TypeError."""
    folder = make_artifacts(tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="malformed manifest: " + __import__("re").escape(field)):
        verify(folder)


def test_latency_per_rows_is_optional_and_read_back(tmp_path):
    folder = make_artifacts(tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "latency_per_rows" not in manifest and verify(folder)  # absent: fine (older exports)
    manifest["latency_per_rows"] = {"1": 0.87, "32": 1.23}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(folder)["latency_per_rows"] == {"1": 0.87, "32": 1.23}


def _export_folder(root: Path, key: str, *, max_batch: int, dtype: str = "fp32", created: str = "2026-11-27T00:00:00+00:00",
                   random_weights: bool = False) -> Path:
    folder = make_artifacts(root / "digits" / key)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["request"].update(max_batch=max_batch, dtype=dtype, random_weights=random_weights)
    manifest["created"] = created
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_find_artifacts_picks_the_smallest_export_that_fits(tmp_path):
    """After 're-export with --max-batch N' the folder holds two exports; the run's rows choose, no weights_id."""
    from srds_trt.export.artifacts import find_artifacts

    small = _export_folder(tmp_path, "a", max_batch=8)
    large = _export_folder(tmp_path, "b", max_batch=256)
    newer_large = _export_folder(tmp_path, "c", max_batch=256, created="2026-11-27T01:00:00+00:00")
    _export_folder(tmp_path, "d", max_batch=4, random_weights=True)
    assert find_artifacts(tmp_path, "digits", rows=4) == tmp_path / "digits" / "a"  # trained weights first
    assert find_artifacts(tmp_path, "digits", rows=8) == small
    assert find_artifacts(tmp_path, "digits", rows=220) == newer_large != large
    assert find_artifacts(tmp_path, "digits", rows=2, random_weights=True).name == "d"


def test_find_artifacts_advice_names_export_flags_and_skipped_folders(tmp_path):
    from srds_trt.export.artifacts import find_artifacts

    _export_folder(tmp_path, "a", max_batch=8)
    broken = make_artifacts(tmp_path / "digits" / "z")
    (broken / "manifest.json").write_text('{"schema": "%s", "files": 3}' % SCHEMA)
    with pytest.raises(ArtifactError) as info:
        find_artifacts(tmp_path, "digits", rows=220, dtype="fp16")
    message = str(info.value)
    assert f"python -m srds_trt.export --model digits --out {tmp_path} --max-batch 220 --dtype fp16" in message
    assert "skipped 1 unreadable: z" in message and "malformed manifest" in message
    assert "weights_id" not in message


def test_record_latency_merges_and_keeps_the_export_valid(tmp_path):
    from srds_trt.export.artifacts import record_latency

    folder = make_artifacts(tmp_path / "a")
    record_latency(folder, {32: 1.23, 1: 0.87})
    record_latency(folder, {2: 0.92, 1: 0.9})
    assert verify(folder)["latency_per_rows"] == {"1": 0.9, "2": 0.92, "32": 1.23}
    with pytest.raises(ArtifactError, match="latency_per_rows.4"):
        record_latency(folder, {4: -1.0})
    assert read_manifest(folder)["latency_per_rows"] == {"1": 0.9, "2": 0.92, "32": 1.23}
