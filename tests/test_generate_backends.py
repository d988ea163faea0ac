"""`python -m srds_trt.generate --backend ...`: the exported model as the engine, and the refusals around it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tensorrt_rtx")

from srds_trt.generate import main


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    from srds_trt.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("engines")
    export_model(ExportConfig(model="digits", out=out, dtype="fp32", min_batch=1, max_batch=24), quiet=True)
    return out


def test_onnxruntime_backend_generates_and_matches_serial(digits_export, tmp_path, capsys):
    out = tmp_path / "gen"
    rc = main(["--backend", "onnxruntime", "--engine-dir", str(digits_export), "--steps", "9", "--prompt", "3", "7",
               "--out", str(out), "--tol", "0", "--quiet"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["backend"] == "onnxruntime" and stats["engine"] == "onnxruntime"
    assert stats["iterations"] == stats["blocks"] == 3  # tol = 0: run to the serial sample
    assert stats["max_abs_diff_vs_serial"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png", "stats.json"]


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxruntime", "--engine-dir", "{missing}"], "no export of 'digits'"),
    (["--backend", "tensorrt", "--engine-dir", "{export}", "--device", "cpu"], "needs a CUDA GPU"),
    (["--backend", "onnxruntime", "--engine-dir", "{export}", "--steps", "100"], "re-export with --max-batch"),
])
def test_backend_refusals_are_one_line_and_exit_2(digits_export, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "none", export=digits_export) for a in args]
    out = tmp_path / "gen"
    assert main(args + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_pipeline_runtime_path_equals_reference_path():
    """The glue a GPU uses (pipeline -> RuntimeSampler -> torch engine -> runners), exercised on the CPU."""
    import torch

    from srds_trt import SRDSPipeline
    from srds_trt.runtime.sampler import RuntimeSampler

    reference = SRDSPipeline.from_pretrained("digits")
    fast = SRDSPipeline.from_pretrained("digits")
    fast.runtime = RuntimeSampler("torch", fast.loaded, device=torch.device("cpu"), dtype=torch.float32)
    kwargs = dict(num_inference_steps=16, generator=3, tol=0.0, pipelined=True, compare_serial=True, progress_bar=False)
    a = reference(["1", "8"], **kwargs)
    b = fast(["1", "8"], **kwargs)
    assert b.stats["engine"] == "torch" and b.stats["iterations"] == a.stats["iterations"] == 4
    assert a.stats["sequential_calls"] == b.stats["sequential_calls"] and a.stats["model_evals"] == b.stats["model_evals"]
    torch.testing.assert_close(b.samples, a.samples, rtol=0, atol=1e-4)
    assert b.stats["max_abs_diff_vs_serial"] <= 1e-4
