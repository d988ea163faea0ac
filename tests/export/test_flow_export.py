"""Flow transformers exported: tiny SD3- and Flux-shaped models to ONNX with a dynamic row dimension, the parity gate
(ONNX Runtime vs PyTorch at several row counts), a TensorRT-RTX plan built on this CPU-only machine (built, never
executed: no GPU here), and the exported ONNX sampled through the runtime (onnxruntime engine) against the reference
path: SRDS at tol = 0 is the serial flow sample."""

from __future__ import annotations

import onnx
import pytest
import torch

from srds_trt import SRDSPipeline
from srds_trt.export import ExportConfig, export_unet
from srds_trt.models.text import random_text_stack
from srds_trt.models.transformers import TINY_CONFIGS, load_transformer


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_export(request, tmp_path_factory):
    pytest.importorskip("tensorrt_rtx")
    kind = request.param
    out = tmp_path_factory.mktemp("engines")
    config = ExportConfig(model=kind, out=out, dtype="fp32", min_batch=1, max_batch=8, random_weights=True,
                          exporter="dynamo" if kind == "flux" else "legacy")
    return kind, export_unet(load_transformer(kind, tiny=True, seed=1), config, quiet=True)


def test_export_has_a_dynamic_row_axis_parity_and_a_plan(flow_export):
    kind, result = flow_export
    manifest = result.manifest
    graph = onnx.load(str(result.folder / "unet.onnx"))
    initializers = {i.name for i in graph.graph.initializer}
    rows = [i.type.tensor_type.shape.dim[0].dim_param for i in graph.graph.input if i.name not in initializers]
    assert rows == ["rows", "rows", "rows"], rows  # sample, timestep (sigma), cond
    text = str(manifest)
    assert "parity" in text and (result.folder / "unet.plan").stat().st_size > 0
    # every listed file readable by a service running as another user (torch writes external data 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in result.folder.iterdir()} == {"0o644"}, list(result.folder.iterdir())


def test_exported_onnx_samples_the_serial_flow_trajectory(flow_export):
    kind, result = flow_export
    loaded = load_transformer(kind, tiny=True, seed=1)
    text = random_text_stack(loaded, 0, vae_config=TINY_CONFIGS[kind]["vae"])
    engine = SRDSPipeline(loaded, text=text, backend="onnxruntime", engine_dir=result.folder)
    reference = SRDSPipeline(load_transformer(kind, tiny=True, seed=1), text=text)
    kwargs = dict(num_inference_steps=6, generator=0, progress_bar=False)
    got = engine("a cat", tol=0.0, **kwargs)
    serial = reference("a cat", sampler="serial", **kwargs)
    assert float((got.samples.double() - serial.samples.double()).abs().max()) <= 1e-4


def test_aoti_refuses_flow_models_before_any_work(tmp_path):
    from srds_trt.export.aoti import AOTIError

    config = ExportConfig(model="sd3", out=tmp_path, dtype="fp32", max_batch=4, random_weights=True, aoti=True)
    with pytest.raises(AOTIError, match="flow-matching"):
        export_unet(load_transformer("sd3", tiny=True), config, quiet=True)
    assert not any(tmp_path.rglob("*.onnx"))


def test_a_local_sd3_folder_exports_and_its_engine_samples_what_diffusers_does(tmp_path):
    """Real weights through the export: a diffusers SD3 folder (tiny, its own text encoders) -> ONNX + parity + plan
    -> `generate --backend onnxruntime` path; the serial sample equals StableDiffusion3Pipeline's on the same noise,
    and SRDS at tol = 0 on the engine equals it too."""
    pytest.importorskip("tensorrt_rtx")
    from diffusers import StableDiffusion3Pipeline
    from tiny_flow import build_tiny_sd3

    from srds_trt.export import export_model

    folder = build_tiny_sd3(tmp_path / "sd3")
    result = export_model(ExportConfig(model=str(folder), out=tmp_path / "engines", dtype="fp32", max_batch=16),
                          quiet=True)
    assert result.manifest["model"]["family"] == "sd3" and result.manifest["model"]["random_weights"] is False
    pipe = SRDSPipeline.from_pretrained(str(folder), backend="onnxruntime", engine_dir=tmp_path / "engines")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)(
        "a cat", latents=noise, num_inference_steps=6, output_type="latent", guidance_scale=7.0).images
    for sampler in ("serial", "srds"):
        out = pipe("a cat", num_inference_steps=6, latents=noise, sampler=sampler, tol=0.0, progress_bar=False)
        assert float((out.samples - reference).abs().max()) <= 1e-4, sampler
