"""ONNX export pieces: the I/O contract, external data, both torch exporters, and the option checks."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from srds_trt.export import onnx_export
from srds_trt.export.artifacts import check_external_data
from srds_trt.export.config import ExportConfig, ExportConfigError
from srds_trt.export.io_contract import io_contract, sample_inputs
from srds_trt.export.parity import check_parity, parity_rows, reference_outputs
from export_support import digits_like


def _export(tmp_path: Path, exporter: str, opset: int = 17) -> tuple[list[Path], object, list, list]:
    loaded = digits_like()
    contract = io_contract("class", (1, 16, 16), (), "fp32")
    module = onnx_export.UNetForExport(loaded.unet, "class").eval()
    feeds = [sample_inputs(contract, rows, seed=0) for rows in parity_rows(1, 8)]
    refs = reference_outputs(module, feeds)
    example = {k: torch.from_numpy(v) for k, v in sample_inputs(contract, 2, seed=1).items()}
    files = onnx_export.export_onnx(module, contract, example, tmp_path, opset=opset, exporter=exporter)
    return files, contract, feeds, refs


def _dims(model: onnx.ModelProto) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}


def test_large_models_use_one_external_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # treat the tiny UNet as if it were over 2 GB
    files, contract, feeds, refs = _export(tmp_path, "legacy")
    assert [p.name for p in files] == ["unet.onnx", "unet.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]  # raw export cleaned up
    check_external_data(tmp_path / "unet.onnx", tmp_path, {"unet.onnx.data"})
    report = check_parity(tmp_path / "unet.onnx", feeds, refs, 1e-3)  # ORT reads the external data
    assert report.rows == (1, 3) and report.max_rel < 1e-4


@pytest.mark.slow
def test_dynamo_exporter_keeps_the_contract(tmp_path):
    files, contract, feeds, refs = _export(tmp_path, "dynamo", opset=18)
    model = onnx.load(str(files[0]))
    assert _dims(model) == {s.name: list(s.shape) for s in contract.all}
    assert check_parity(files[0], feeds, refs, 1e-3).max_rel < 1e-4


def test_sample_inputs_give_each_row_its_own_timestep():
    contract = io_contract("text", (4, 8, 8), (77, 1024), "fp16")
    feeds = sample_inputs(contract, 5, seed=0)
    assert {k: (v.shape, str(v.dtype)) for k, v in feeds.items()} == {
        "sample": ((5, 4, 8, 8), "float16"), "timestep": ((5,), "float32"),
        "encoder_hidden_states": ((5, 77, 1024), "float16")}
    assert len(set(feeds["timestep"].tolist())) == 5


def test_config_batch_range_and_rejections():
    assert ExportConfig(model="m").batch_range == (1, 16, 32)
    assert ExportConfig(model="m", min_batch=3, max_batch=3).batch_range == (3, 3, 3)
    assert ExportConfig(model="m", min_batch=2, opt_batch=6, max_batch=8).batch_range == (2, 6, 8)
    assert parity_rows(3, 3) == (3,) and parity_rows(1, 2) == (1, 2)
    for bad in ({"max_batch": 0}, {"min_batch": 0}, {"dtype": "bf16"}, {"opset": 11}, {"exporter": "x"},
                {"width": 64}, {"parity_tol": 0.0}):
        with pytest.raises(ExportConfigError):
            ExportConfig(model="m", **bad)


def test_image_size_maps_to_the_unet_input():
    from srds_trt.export.build import ExportError, spatial_shape
    from export_support import text_like

    tiny_sd = text_like()  # latents are pixels / 8, and two resolution levels need an even latent size
    assert spatial_shape(tiny_sd, ExportConfig(model="m")) == (4, 8, 8)
    assert spatial_shape(tiny_sd, ExportConfig(model="m", height=96, width=128)) == (4, 12, 16)
    with pytest.raises(ExportError, match="multiples of 16"):
        spatial_shape(tiny_sd, ExportConfig(model="m", height=72, width=72))
    assert spatial_shape(digits_like(), ExportConfig(model="m", height=24, width=32)) == (1, 24, 32)
