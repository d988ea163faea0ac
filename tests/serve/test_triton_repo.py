"""The Triton model repository written from an export: every config.pbtxt parses into Triton's ModelConfig
protobuf (tritonclient's model_config_pb2) and agrees with the export manifest and the server's protocol; the
sampler model's code runs against a stand-in for Triton's Python backend whose BLS calls reach the torch digits
UNet (no Triton server and no TensorRT execution here: see the module docstring of srds_trt.serve.triton.repo)."""

from __future__ import annotations

import copy
import json
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from srds_trt.export.config import ExportConfig  # noqa: E402
from srds_trt.export.build import export_unet  # noqa: E402
from srds_trt.serve.protocol import INPUTS  # noqa: E402
from srds_trt.serve.triton.repo import row_buckets, write_triton_repo  # noqa: E402
from export_support import digits_like  # noqa: E402

pytestmark = pytest.mark.slow  # the module fixture runs a real digits-shaped export (ONNX, parity, TensorRT-RTX plan)

PROTOCOL_TO_TRITON = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32",
                      "FP64": "TYPE_FP64"}
MANIFEST_TO_TRITON = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int64": mc.TYPE_INT64}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    result = export_unet(digits_like(), ExportConfig(model="digits", out=out, dtype="fp32", min_batch=1, max_batch=8,
                                                     profiles=2), quiet=True)
    folder = result.folder
    repo = tmp_path_factory.mktemp("triton")
    write_triton_repo(folder, repo)
    manifest = json.loads((folder / "manifest.json").read_text())
    return repo, folder, manifest


def _parse(path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_unet_config_parses_and_matches_the_manifest(repo):
    repo, folder, manifest = repo
    config = _parse(repo / "digits_unet" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0 and config.name == "digits_unet"
    for tensors, specs in ((config.input, manifest["io"]["inputs"]), (config.output, manifest["io"]["outputs"])):
        assert [t.name for t in tensors] == [s["name"] for s in specs]
        for t, s in zip(tensors, specs):
            assert t.data_type == MANIFEST_TO_TRITON[s["dtype"]], t.name
            assert list(t.dims) == [-1, *s["shape"][1:]], t.name
    assert [list(g.profile) for g in config.instance_group] == [["0"], ["1"]] == \
        [[str(p)] for p in range(manifest["num_profiles"])]
    assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU and g.count == 1 for g in config.instance_group)
    graphs = config.optimization.cuda
    assert graphs.graphs
    buckets = row_buckets(manifest["request"]["min_batch"], manifest["request"]["max_batch"])
    assert buckets == [1, 2, 4, 8]
    for spec, rows in zip(graphs.graph_spec, buckets, strict=True):
        for s in manifest["io"]["inputs"]:
            assert list(spec.input[s["name"]].dim) == [rows, *s["shape"][1:]]
            lo, hi = manifest["profiles"][0][s["name"]]["min"][0], manifest["profiles"][0][s["name"]]["max"][0]
            assert lo <= rows <= hi
    plan = repo / "digits_unet" / "1" / "model.plan"
    assert plan.read_bytes() == (folder / manifest["tensorrt"]["plan"]).read_bytes()


def test_sampler_config_speaks_the_servers_protocol(repo):
    repo, _, manifest = repo
    config = _parse(repo / "digits" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert {t.name: mc.DataType.Name(t.data_type) for t in config.input} == \
        {name: PROTOCOL_TO_TRITON[dtype] for name, (dtype, _) in INPUTS.items()}
    assert [t.name for t in config.input if not t.optional] == ["prompt"]
    assert {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in config.output} == \
        {"image": ("TYPE_UINT8", [-1, -1, -1, 1]), "stats": ("TYPE_STRING", [1])}
    assert config.parameters["unet_model"].string_value == "digits_unet"
    assert config.parameters["max_rows"].string_value == str(manifest["request"]["max_batch"])
    assert "srds_trt.serve.triton.sampler" in (repo / "digits" / "1" / "model.py").read_text()


def _fake_pb_utils(unet):
    """The slice of triton_python_backend_utils the sampler model uses; BLS requests run `unet` (numpy in/out)."""
    pb = types.ModuleType("triton_python_backend_utils")
    calls = []

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self._error = output_tensors, error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names):
            self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names

        def exec(self):
            assert self.model_name == "digits_unet" and self.outputs == ["model_output"]
            arrays = {t.name(): t.as_numpy() for t in self.inputs}
            assert arrays["sample"].dtype == np.float32 and arrays["timestep"].dtype == np.float32
            assert arrays["class_labels"].dtype == np.int64 and arrays["timestep"].shape == (len(arrays["sample"]),)
            calls.append(len(arrays["sample"]))
            return InferenceResponse([Tensor("model_output", unet(**arrays))])

    def by_name(holder, name):  # requests carry .inputs, responses .output_tensors
        tensors = holder.inputs if hasattr(holder, "inputs") else holder.output_tensors
        return next((t for t in tensors if t.name() == name), None)

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = Tensor, TritonError, InferenceResponse, InferenceRequest
    pb.get_input_tensor_by_name = pb.get_output_tensor_by_name = by_name
    return pb, calls


def test_sampler_model_gives_generates_pixels_through_bls(repo, monkeypatch):
    from srds_trt import SRDSPipeline
    from srds_trt.serve.triton.sampler import TritonPythonModel

    torch.set_num_threads(1)
    repo, _, _ = repo
    reference = SRDSPipeline.from_pretrained("digits")

    def unet(sample, timestep, class_labels):  # the stand-in for the TensorRT UNet: the same weights in torch
        with torch.inference_mode():
            return reference.cond_model(torch.from_numpy(sample), torch.from_numpy(timestep),
                                        torch.from_numpy(class_labels)).numpy()

    pb, calls = _fake_pb_utils(unet)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setattr(SRDSPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: copy.copy(reference)))
    config = json_format.MessageToDict(_parse(repo / "digits" / "config.pbtxt"), preserving_proto_field_name=True)
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    assert model.pipe.cond_model is not reference.cond_model

    def request(**arrays):
        return types.SimpleNamespace(inputs=[pb.Tensor(k, v) for k, v in arrays.items()])

    good = request(prompt=np.array([b"3", b"8"], dtype=object), seed=np.array([5], dtype=np.int64),
                   steps=np.array([4], dtype=np.int32))
    bad = request(prompt=np.array([b"x"], dtype=object))
    good_response, bad_response = model.execute([good, bad])
    assert not good_response.has_error() and calls, "the sampler must call the UNet model through BLS"
    image = next(t for t in good_response.output_tensors if t.name() == "image").as_numpy()
    out = reference(["3", "8"], num_inference_steps=4, generator=5, progress_bar=False)
    np.testing.assert_array_equal(image, np.stack([np.asarray(i) for i in out.images])[..., None])
    assert bad_response.has_error() and "digits prompts must be digits" in bad_response.error().message()
