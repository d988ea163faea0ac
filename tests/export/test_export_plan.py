"""Real exports: ONNX + parity + a TensorRT-RTX plan built on this CPU-only machine, checked against the manifest.

Plans are built, never executed here (TensorRT-RTX refuses H100/H200, and no GPU is present in CI).
"""
from __future__ import annotations

import shutil
import types

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("tensorrt_rtx")

from srds_trt.export import ArtifactError, ExportConfig, export_unet, find_artifacts, load_engine, verify_artifacts
from srds_trt.export import artifacts as artifacts_mod
from srds_trt.export import build as pipeline
from srds_trt.export.manifest import sha256_file
from srds_trt.export.parity import ParityError
from srds_trt.export.artifacts import tensorrt_module
from export_support import digits_like, text_like

ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    config = ExportConfig(model="digits", out=out, dtype="fp32", min_batch=1, max_batch=8)
    result = export_unet(digits_like(), config, quiet=True)
    return config, result


def _graph_io(model: onnx.ModelProto) -> list[dict]:
    def entry(value):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        return {"name": value.name, "dtype": ONNX_TYPES[value.type.tensor_type.elem_type], "shape": dims}

    initializers = {i.name for i in model.graph.initializer}
    return [entry(v) for v in model.graph.input if v.name not in initializers], [entry(v) for v in model.graph.output]


def test_manifest_matches_onnx_graph_plan_and_files(digits_export):
    config, result = digits_export
    folder, manifest = result.folder, result.manifest
    assert not result.reused
    assert folder.parent == config.out / "digits" and folder.name == manifest["key"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "unet.onnx", "unet.plan"]
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o644"}  # readable by a service's user

    inputs, outputs = _graph_io(onnx.load(str(folder / "unet.onnx")))
    assert inputs == manifest["io"]["inputs"] and outputs == manifest["io"]["outputs"]
    assert [i["name"] for i in inputs] == ["sample", "timestep", "class_labels"]
    assert [i["dtype"] for i in inputs] == ["float32", "float32", "int64"]
    assert inputs[0]["shape"] == ["rows", 1, 16, 16] and outputs[0]["shape"] == ["rows", 1, 16, 16]

    assert manifest["num_profiles"] == 1 and len(manifest["profiles"]) == 1
    (profile,) = manifest["profiles"]
    assert profile["sample"] == {"min": [1, 1, 16, 16], "opt": [4, 1, 16, 16], "max": [8, 1, 16, 16]}
    assert profile["timestep"] == {"min": [1], "opt": [4], "max": [8]}

    # The plan exists and TensorRT-RTX parses the same ONNX to the same IO (what the C++ side will bind).
    trt, flavour = tensorrt_module()
    network = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, trt.Logger(trt.Logger.ERROR)).parse_from_file(str(folder / "unet.onnx"))
    assert [network.get_input(i).name for i in range(network.num_inputs)] == [i["name"] for i in inputs]
    assert manifest["tensorrt"]["flavour"] == flavour and manifest["tensorrt"]["version"] == trt.__version__
    assert manifest["tensorrt"]["build_seconds"] > 0
    # Stream capture on TensorRT-RTX needs plans built with REQUIRE_USER_ALLOCATION (TensorRT 11 has no such flag).
    expected_flags = ["REQUIRE_USER_ALLOCATION"] if flavour == "tensorrt_rtx" else []
    assert manifest["tensorrt"]["builder_flags"] == expected_flags
    assert manifest["latency_per_rows"] is None  # measured on a GPU at warm-up, never on the build machine
    assert "9.0" not in manifest["tensorrt"]["target"]["compute_capabilities"]
    assert "8.9" in manifest["tensorrt"]["target"]["compute_capabilities"]

    for name, entry in manifest["files"].items():
        assert sha256_file(folder / name) == entry["sha256"] and (folder / name).stat().st_size == entry["bytes"]
    assert manifest["parity"]["max_rel"] <= manifest["parity"]["tolerance"] and manifest["parity"]["rows"] == [1, 3]
    assert manifest["guidance"]["row_layout"] == ["uncond", "cond"] and manifest["model"]["null_class"] == 10
    assert manifest["scheduler_config"]["num_train_timesteps"] == 1000
    assert manifest["model"]["prediction_type"] == "epsilon"

    version = trt.__version__
    assert verify_artifacts(folder, flavour=flavour, version=version, target="sm_89")["key"] == manifest["key"]
    with pytest.raises(ArtifactError, match="compute capabilities"):
        verify_artifacts(folder, flavour=flavour, version=version, target="9.0")  # H100/H200
    with pytest.raises(ArtifactError, match="re-export"):
        verify_artifacts(folder, flavour=flavour, version="0.0.1", target=None)
    with pytest.raises(ArtifactError):
        verify_artifacts(folder, flavour="tensorrt", version=version, target=None)


def test_same_key_reuses_without_rebuilding(digits_export, monkeypatch):
    config, first = digits_export

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt despite an identical key")

    monkeypatch.setattr(pipeline, "build_tensorrt_plan", no_build)
    monkeypatch.setattr(pipeline, "export_onnx", no_build)
    again = export_unet(digits_like(), config, quiet=True)
    assert again.reused and again.folder == first.folder


def test_find_artifacts_by_request(digits_export):
    config, result = digits_export
    assert find_artifacts(config.out, "digits", dtype="fp32", rows=5) == result.folder
    assert find_artifacts(config.out, "digits", max_batch=8, height=16, width=16) == result.folder
    with pytest.raises(ArtifactError, match="python -m srds_trt.export --model digits"):
        find_artifacts(config.out, "digits", rows=64)
    with pytest.raises(ArtifactError, match="no export"):
        find_artifacts(config.out, "sd2", dtype="fp16")


def test_tampered_plan_refused_before_deserialisation(digits_export, tmp_path, monkeypatch):
    _, result = digits_export
    copy = tmp_path / "copy"
    shutil.copytree(result.folder, copy)
    plan = bytearray((copy / "unet.plan").read_bytes())
    plan[len(plan) // 2] ^= 0xFF
    (copy / "unet.plan").write_bytes(bytes(plan))

    trt, flavour = tensorrt_module()

    class NoRuntime:
        def __init__(self, *args):
            pass

        def deserialize_cuda_engine(self, plan):
            raise AssertionError("a tampered plan reached the deserialiser")

    fake = types.SimpleNamespace(__version__=trt.__version__, Runtime=NoRuntime, Logger=trt.Logger)
    monkeypatch.setattr(artifacts_mod, "tensorrt_module", lambda: (fake, flavour))
    with pytest.raises(ArtifactError, match="sha256"):
        load_engine(copy, target="8.9")
    with pytest.raises(ArtifactError, match="compute capabilities"):  # untampered, but an H100
        load_engine(result.folder, target="9.0")


def test_fp16_text_model_two_profiles(tmp_path):
    config = ExportConfig(model="tiny-sd", out=tmp_path, dtype="fp16", min_batch=2, max_batch=4, profiles=2)
    result = export_unet(text_like(), config, quiet=True)
    manifest = result.manifest
    dtypes = {i["name"]: i["dtype"] for i in manifest["io"]["inputs"] + manifest["io"]["outputs"]}
    assert dtypes == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
                      "model_output": "float16"}
    assert manifest["io"]["inputs"][2]["shape"] == ["rows", 7, 32]
    assert manifest["num_profiles"] == 2 and len(manifest["profiles"]) == 2
    assert manifest["parity"]["rows"] == [2, 4] and np.isfinite(manifest["parity"]["max_abs"])
    assert manifest["request"]["height"] == 64 and manifest["model"]["sample_shape"] == [4, 8, 8]
    assert manifest["model"]["prediction_type"] == "v_prediction" and manifest["model"]["vae_scaling_factor"] == 0.18215
    inputs, _ = _graph_io(onnx.load(str(result.folder / "unet.onnx")))
    assert [i["dtype"] for i in inputs] == ["float16", "float32", "float16"]


def test_fp16_overflow_fails_the_gate_and_leaves_nothing(tmp_path):
    loaded = text_like()
    with torch.no_grad():  # an output past fp16's 65504: finite in the fp32 reference, inf in the fp16 ONNX
        loaded.unet.conv_out.weight.mul_(1e6)
        loaded.unet.conv_out.bias.fill_(1e5)
    out = tmp_path / "engines"
    with pytest.raises(ParityError, match=r"NaN/Inf.*onnx finite=False, torch finite=True"):
        export_unet(loaded, ExportConfig(model="tiny-sd", out=out, dtype="fp16", max_batch=4), quiet=True)
    assert not out.exists()


def test_weights_freed_before_the_parity_gate_and_every_file_readable(tmp_path, monkeypatch):
    """The gate compares with the stored references and the plan is built from the ONNX files alone: the PyTorch
    weights are gone before either (SD3-medium fp32 was killed at 24 GB with them alive). External data (written 0600 by onnx) is published 0644 like the rest."""
    from srds_trt.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the UNet were over 2 GB
    loaded = digits_like()
    devices = []

    def spy(name):
        real = getattr(pipeline, name)

        def call(*args, **kwargs):
            devices.append((name, {p.device.type for p in loaded.unet.parameters()}))
            return real(*args, **kwargs)
        monkeypatch.setattr(pipeline, name, call)

    spy("check_parity")
    spy("build_tensorrt_plan")
    result = export_unet(loaded, ExportConfig(model="digits", out=tmp_path, dtype="fp32", max_batch=4), quiet=True)
    assert devices == [("check_parity", {"meta"}), ("build_tensorrt_plan", {"meta"})]
    assert (result.folder / "unet.onnx.data").is_file()
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in result.folder.iterdir()} == dict.fromkeys(
        ["manifest.json", "unet.onnx", "unet.onnx.data", "unet.plan"], "0o644")
