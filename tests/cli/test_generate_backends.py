"""`python -m srds_trt.generate --backend ...`: the exported model as the engine, and the refusals around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tensorrt_rtx")

from srds_trt.cli.generate import main


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
    assert stats["iterations"] == stats["blocks"]  # tol = 0: run to the serial sample
    assert stats["max_abs_diff_vs_serial"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png", "stats.json"]


@pytest.mark.parametrize("sampler", ["eps-picard", "paradigms"])
def test_onnxruntime_backend_runs_the_sliding_window_samplers(digits_export, tmp_path, sampler):
    """--sampler eps-picard / paradigms on the runtime (runtime/window_runner.py): one host read per sweep."""
    out = tmp_path / "gen"
    rc = main(["--backend", "onnxruntime", "--engine-dir", str(digits_export), "--steps", "9", "--prompt", "3", "7",
               "--sampler", sampler, "--out", str(out), "--tol", "0", "--quiet", "--compare-serial"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sampler"] == sampler and stats["engine"] == "onnxruntime" and stats["converged"]
    assert stats["host_reads"] == stats["iterations"] == len(stats["slides"]) and stats["host_read_ms"] >= 0
    assert stats["max_abs_diff_vs_serial"] <= 1e-4  # tol = 0: the serial sample


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxruntime", "--engine-dir", "{missing}"], "no export of 'digits'"),
    (["--backend", "tensorrt", "--engine-dir", "{export}", "--device", "cpu"], "needs a CUDA GPU"),
    # one image of N = 100 needs 40 rows (pipelined SRDS, guidance): more than the export's 24
    (["--backend", "onnxruntime", "--engine-dir", "{export}", "--steps", "100"],
     "re-export with `python -m srds_trt.export --model digits --max-batch 40`"),
])
def test_backend_refusals_are_one_line_and_exit_2(digits_export, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "none", export=digits_export) for a in args]
    out = tmp_path / "gen"
    assert main(args + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_run_wider_than_the_export_runs_in_chunks_that_fit(digits_export, tmp_path, capsys):
    """Ten digits at N = 9 need more rows than the export's 24 in one call: the images are sampled in chunks that
    fit the export (the default export serves generate's default run this way), not refused."""
    out = tmp_path / "gen"
    rc = main(["--backend", "onnxruntime", "--engine-dir", str(digits_export), "--steps", "9", "--out", str(out),
               "--quiet", "--no-compare-serial"])
    assert rc == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] == 10 and stats["chunks"] > 1 and stats["export_dir"] == str(digits_export / "digits" /
                                                                                       Path(stats["export_dir"]).name)
    assert len(list(out.glob("0*.png"))) == 10 and stats["export_id"]


def test_pipeline_runtime_path_equals_reference_path():
    """The glue a GPU uses (pipeline -> RuntimeSampler -> torch engine -> runners), exercised on the CPU."""
    import torch

    from srds_trt import SRDSPipeline
    from srds_trt.runtime.executor import RuntimeSampler

    reference = SRDSPipeline.from_pretrained("digits")
    fast = SRDSPipeline.from_pretrained("digits")
    fast.runtime = RuntimeSampler("torch", fast.loaded, device=torch.device("cpu"), dtype=torch.float32)
    kwargs = dict(num_inference_steps=16, generator=3, tol=0.0, pipelined=True, compare_serial=True, progress_bar=False)
    a = reference(["1", "8"], **kwargs)
    b = fast(["1", "8"], **kwargs)
    assert b.stats["engine"] == "torch" and b.stats["iterations"] == a.stats["iterations"] == a.stats["blocks"]  # tol 0
    assert a.stats["sequential_calls"] == b.stats["sequential_calls"] and a.stats["model_evals"] == b.stats["model_evals"]
    torch.testing.assert_close(b.samples, a.samples, rtol=0, atol=1e-4)
    assert b.stats["max_abs_diff_vs_serial"] <= 1e-4


def test_one_warm_up_per_runner_and_first_call_timing_apart(monkeypatch):
    """A cached runner is built (and captured) once; every call runs it exactly once."""
    import torch

    from srds_trt import SRDSPipeline
    from srds_trt.runtime import serial_runner
    from srds_trt.runtime.srds import runner as srds_runner
    from srds_trt.runtime.executor import RuntimeSampler

    runs = {"srds": 0, "serial": 0}
    for name, module, cls in (("srds", srds_runner, "SRDSRunner"), ("serial", serial_runner, "SerialRunner")):
        real = getattr(module, cls).run

        def counted(self, *a, _real=real, _name=name, **k):
            runs[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(getattr(module, cls), "run", counted)
    pipe = SRDSPipeline.from_pretrained("digits")
    pipe.runtime = RuntimeSampler("torch", pipe.loaded, device=torch.device("cpu"), dtype=torch.float32)
    kwargs = dict(num_inference_steps=8, generator=1, compare_serial=True, progress_bar=False)
    first = pipe(["2"], **kwargs)
    assert runs == {"srds": 1, "serial": 1} and pipe.runtime.runner_builds == 2
    assert first.stats["first_call"] and first.stats["setup_s"] > 0 and first.stats["serial"]["first_call"]
    second = pipe(["5"], **kwargs)
    assert runs == {"srds": 2, "serial": 2} and pipe.runtime.runner_builds == 2  # no second warm-up
    assert not second.stats["first_call"] and second.stats["setup_s"] == 0.0
    assert second.stats["pipelined"] is True  # the default


def test_widest_pipelined_tick_fits_the_reserved_rows():
    """rows_needed reads the plan's widest tick: N=8, B=4 pipelined needs 6 rows, not B + 1 = 5 (N=100, B=25: 32);
    an engine of exactly that many rows runs the whole plan."""
    import torch

    from srds_trt.models import load_unet
    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.runtime.engines.factory import torch_engine
    from srds_trt.runtime.executor import rows_needed
    from srds_trt.runtime.srds.runner import SRDSRunner
    from srds_trt.samplers.plan import build_tick_plan

    assert rows_needed(100, 25, 1, False) == 32 and rows_needed(8, 4, 1, False) == 6
    for steps in range(2, 40, 3):
        for blocks in range(1, steps + 1, 2):
            widest = max(t.rows for t in build_tick_plan(steps, blocks, pipelined=True).ticks)
            assert rows_needed(steps, blocks, 3, True) == widest * 3 * 2
    loaded = load_unet("digits", device="cpu", dtype=torch.float32)
    engine = torch_engine(loaded, device="cpu", dtype=torch.float32, max_rows=rows_needed(8, 4, 1, False), cuda_graphs=False)
    timesteps, alphas = ddim_grid(loaded.scheduler_config, 8)
    runner = SRDSRunner(engine, batch=1, timesteps=timesteps, alphas_cumprod=alphas, prediction_type="epsilon",
                        num_blocks=4, pipelined=True, guided=False)
    result = runner.run(torch.randn(1, *loaded.sample_shape), torch.tensor([3]), None, tol=0.0)
    assert result.iterations == 4 and torch.isfinite(result.sample).all()


def test_onnxruntime_buffers_on_a_bucket_ladder_bounded_by_an_estimate(digits_export):
    from srds_trt.runtime.engines.base import EngineError, default_buckets, estimate_memory
    from srds_trt.runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
    from srds_trt.runtime.executor import artifact_folder

    engine = OnnxRuntimeEngine(artifact_folder(digits_export, "digits", "onnxruntime"))
    assert engine.buckets == default_buckets(24) and len(engine.buckets) < 12  # not one buffer set per row count
    assert engine.memory_estimate == estimate_memory(engine.spec, engine.buckets)
    with pytest.raises(EngineError, match="GiB"):  # far beyond any machine: refused before allocating
        estimate = estimate_memory(engine.spec, default_buckets(10**9))
        from srds_trt.runtime.engines.base import check_fits

        check_fits(engine.spec, default_buckets(10**9), engine.device)
    assert estimate > 2**40


def _tampered_copy(export, tmp_path, **request):
    import shutil

    folder = next(export.glob("digits/*/manifest.json")).parent
    copy = tmp_path / "engines" / "digits" / folder.name
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["request"].update(request)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "engines"


@pytest.mark.slow
def test_manifest_claiming_100000_rows_runs_in_bounded_memory(digits_export, tmp_path):
    """Buffers follow the run's rows, not the manifest's claim; peak RSS of the real CLI bounded."""
    import resource
    import subprocess
    import sys

    engines = _tampered_copy(digits_export, tmp_path, max_batch=100000)
    out = tmp_path / "gen"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run([sys.executable, "-m", "srds_trt.generate", "--backend", "onnxruntime", "--engine-dir",
                           str(engines), "--steps", "16", "--prompt", "3", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 2 * 2**20, f"peak RSS {peak_kib / 2**20:.2f} GiB (before: {before / 2**20:.2f})"
    assert json.loads((out / "stats.json").read_text())["engine"] == "onnxruntime"


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float16"], "--dtype float16 does not match"),
    (["--engine-dir", "{broken}"], "manifest"),
])
def test_export_mismatch_and_corrupt_manifest_are_one_line(digits_export, tmp_path, capsys, args, message):
    broken = tmp_path / "broken" / "digits" / "x"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    args = [a.format(broken=broken) for a in args]
    out = tmp_path / "gen"
    rc = main(["--backend", "onnxruntime", "--engine-dir", str(digits_export), *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
