"""The exported ONNX as an engine: ONNX Runtime behind the same interface, driven by the same runner.

The export (ONNX + parity gate + TensorRT-RTX plan + manifest) is real; the plan is built, never executed here.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("tensorrt_rtx")

from srds_trt.runtime import SerialRunner, SRDSRunner
from srds_trt.runtime.engines import EngineSpec, TorchEngine
from srds_trt.runtime.engines.base import default_buckets
from srds_trt.runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from srds_trt.export import ArtifactError, ExportConfig, export_unet
from srds_trt.samplers.timesteps import ddim_grid
from export_support import digits_like



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    loaded = digits_like(seed=3)
    reference = digits_like(seed=3)  # export_unet takes over its model (attention processors, dtype)
    result = export_unet(loaded, ExportConfig(model="digits", out=out, dtype="fp32", min_batch=1, max_batch=24), quiet=True)
    return result.folder, reference


def _torch_engine(reference, max_rows):
    unet = reference.unet

    def cond_model(x, t, c):
        return unet(x, t, class_labels=c).sample

    spec = EngineSpec(sample_shape=(1, 16, 16), cond_shape=(), cond_dtype=torch.long, dtype=torch.float32)
    return TorchEngine(cond_model, spec, max_rows=max_rows)


def test_onnxruntime_engine_matches_pytorch_rows(exported):
    folder, reference = exported
    engine = OnnxRuntimeEngine(folder)
    # a bucket ladder, not one buffer set per row count (that grew with the square of --max-batch)
    assert engine.buckets == default_buckets(24) and engine.spec.timestep_dtype == torch.float32
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 700.0, 500.0, 20.0, 0.0])
    c = torch.tensor([0, 3, 7, 9, 10])
    with torch.no_grad():
        expected = reference.unet(x, t, class_labels=c).sample
    torch.testing.assert_close(engine(x, t, c), expected, rtol=0, atol=1e-4)


def test_srds_on_onnxruntime_equals_srds_on_torch_and_serial(exported):
    folder, reference = exported
    ts, ac = ddim_grid(reference.scheduler_config, 16)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.tensor([4, 8]), torch.full((2,), 10)
    ort = OnnxRuntimeEngine(folder)
    torch_engine = _torch_engine(reference, 24)
    runs = [SRDSRunner(e, batch=2, timesteps=ts, alphas_cumprod=ac, num_blocks=4, pipelined=True).run(x, cond, uncond, guidance_scale=3.0, tol=0.0)
            for e in (ort, torch_engine)]
    torch.testing.assert_close(runs[0].sample, runs[1].sample, rtol=0, atol=1e-3)
    serial = SerialRunner(ort, batch=2, timesteps=ts, alphas_cumprod=ac).run(x, cond, uncond, guidance_scale=3.0)
    torch.testing.assert_close(runs[0].sample, serial, rtol=0, atol=1e-3)


def test_tampered_onnx_is_refused_before_onnxruntime_reads_it(exported, tmp_path, monkeypatch):
    import shutil

    import onnxruntime

    folder, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    onnx_file = copy / "unet.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")

    def forbidden(*args, **kwargs):
        raise AssertionError("InferenceSession must not be created for a tampered model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", forbidden)
    with pytest.raises(ArtifactError, match="sha256"):
        OnnxRuntimeEngine(copy)


def test_tensorrt_engine_needs_a_gpu_and_says_so(exported):
    from srds_trt.runtime.engines.base import EngineError
    from srds_trt.runtime.engines.tensorrt_engine import TensorRTEngine

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU refusal does not apply")
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        TensorRTEngine(exported[0], device="cpu")
