"""benchmarks (python -m benchmarks.run): the harness runs end to end, writes its files, matches honestly."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import cases, run
from benchmarks.run import BenchConfig, Run, bench_case, matched


def _run(sampler: str, steps: int, sequential_calls: int, err: float, tol: float = 1e-3) -> Run:
    return Run("gmm", steps, steps, sampler, tol, 5, 1, 10 * steps, steps, sequential_calls, steps / sequential_calls,
               1.0, 1.0, err, err, None, True, projected_ms={"h200_digits": float(sequential_calls)})


def test_matched_picks_the_cheapest_run_that_reaches_the_target():
    runs = [_run("serial", 100, 100, 0.0), _run("srds", 100, 80, 5e-4), _run("srds", 100, 60, 5e-3, tol=1e-2),
            _run("paradigms", 100, 30, 2e-2, tol=1e-1), _run("paradigms", 100, 40, 5e-3, tol=1e-2)]
    rows = {(m["sampler"], m["target"]): m for m in matched(runs, (1e-2, 1e-3))}
    assert rows[("srds", 1e-2)]["sequential_calls"] == 60 and rows[("srds", 1e-3)]["sequential_calls"] == 80
    assert rows[("paradigms", 1e-2)]["sequential_calls"] == 40 and not rows[("paradigms", 1e-3)]["reached"]
    assert not rows[("srds-pipelined", 1e-2)]["reached"]
    assert rows[("srds", 1e-2)]["projected_speedup"]["h200_digits"] == pytest.approx(100 / 60)


def test_latency_projection_interpolates_and_extrapolates():
    from benchmarks.latency import call_ms, projected_ms

    curve = {1: 1.0, 4: 4.0, 8: 6.0}
    assert call_ms(curve, 1) == 1.0 and call_ms(curve, 2) == pytest.approx(2.0) and call_ms(curve, 12) == pytest.approx(8.0)
    assert projected_ms({1: 3, 2: 1}, curve, rows_per_point=2) == pytest.approx(3 * 2.0 + 4.0)


def test_quick_gmm_run_writes_json_table_and_plots(tmp_path):
    results = run.main(["--quick", "--cases", "gmm", "--out", str(tmp_path)])
    for name in ("results.json", "results.md", "residual_vs_iteration.png", "speedup_vs_n.png", "error_vs_speedup.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"platform", "cpu", "torch", "date"} <= set(saved["machine"])
    by = {}
    for r in saved["runs"]:
        by.setdefault((r["steps"], r["sampler"]), []).append(r)
    assert sorted({s for s, _ in by}) == [25, 100]
    for steps in (25, 100):
        serial = by[(steps, "serial")][0]
        assert serial["sequential_calls"] == steps and serial["err_max"] == 0 and serial["evals_per_image"] == steps
        for sampler in ("srds", "srds-pipelined", "paradigms", "eps-picard"):
            for r in by[(steps, sampler)]:
                assert r["sequential_calls"] <= r["model_evals"]
                assert r["converged"] or r["stop"] == "fixed"
                assert r["seq_speedup"] == pytest.approx(steps / r["sequential_calls"])
        # plain and pipelined SRDS compute the same iterates: same error, pipelined never needs more calls
        plain, piped = by[(steps, "srds")][0], by[(steps, "srds-pipelined")][0]
        assert plain["err_max"] == pytest.approx(piped["err_max"], abs=1e-12)
        assert piped["sequential_calls"] <= min(plain["sequential_calls"], steps)
        # the oracle sweep: fixed iteration counts 1, 2, ... below the rule's, until the tightest target (1e-3) is met
        fixed = [r for r in by[(steps, "srds-pipelined")] if r["stop"] == "fixed"]
        assert [r["iterations"] for r in fixed] == list(range(1, len(fixed) + 1))
        assert len(fixed) < piped["iterations"] and all(r["err_max"] > 1e-3 for r in fixed[:-1])
    assert len(saved["matched"]) == 2 * 2 * 4  # N x targets x samplers (srds, srds-pipelined, paradigms, eps-picard)
    table = (tmp_path / "results.md").read_text()
    assert "## Matched accuracy" in table and "ParaDiGMS" in table and "SRDS pipelined" in table and "eps-Picard" in table


def test_digits_case_skips_with_a_clear_message_when_weights_are_missing(monkeypatch):
    import srds_trt.models

    def missing(*args, **kwargs):
        raise FileNotFoundError("no weights")

    monkeypatch.setattr(srds_trt.models, "load_unet", missing)
    with pytest.raises(cases.CaseUnavailable, match="train_digits.py"):
        cases.build_case("digits", images=2, device=torch.device("cpu"))


@pytest.mark.slow
def test_random_digits_unet_runs_through_the_harness():
    case = cases.build_case("digits-random", images=2, device=torch.device("cpu"))
    assert case.x.shape == (2, 1, 16, 16) and case.score is None
    config = BenchConfig(steps=(4,), cases=("digits-random",), srds_tols=(1e-3,), paradigms_tols=(1e-3,),
                         eps_picard_tols=(1e-3,), srds_oracle=False)
    runs = bench_case(case, config, log=lambda msg: None)
    # ParaDiGMS at both windows round(sqrt N) and 2 round(sqrt N); eps-Picard at 2 round(sqrt N)
    assert [r.sampler for r in runs] == ["serial", "srds", "srds-pipelined", "paradigms", "paradigms", "eps-picard"]
    assert [r.width for r in runs[3:]] == [2, 4, 4]
    assert all(r.steps == 4 and r.accuracy is None for r in runs)


def test_grids_finer_than_the_training_schedule_run_at_the_requested_n():
    case = cases.Case("x", lambda x, t: x, torch.zeros(1, 2), dict(cases.GMM_SCHEDULER, num_train_timesteps=1000), "epsilon", "")
    timesteps, _, steps = case.grid(1024)
    assert steps == 1024 and timesteps.numel() == 1025
    gmm_timesteps, _, gmm_steps = cases.build_case("gmm", images=2, device=torch.device("cpu")).grid(196)
    assert gmm_steps == 196 and bool((gmm_timesteps[1:] < gmm_timesteps[:-1]).all())


def test_digits_classifier_features_roundtrip():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images[:50].astype("float32")).unsqueeze(1) / 8 - 1
    up = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    assert (cases.digits_classifier().predict(cases.digits_features(up)) == digits.target[:50]).mean() > 0.95


@pytest.mark.parametrize("argv", [["--device", "cuda"], ["--steps", "0"]])
def test_invalid_configs_are_rejected(argv):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError):
        run.parse_args(argv)


@pytest.mark.slow
def test_quick_run_with_every_default_case(tmp_path):
    """The documented `python -m benchmarks.run --quick` (digits included when its weights exist): < 2 min on 2 cores."""
    results = run.main(["--quick", "--out", str(tmp_path)])
    assert "gmm" in results["cases"]
    assert "digits" in results["cases"] or "digits" in results["skipped"]
    assert (tmp_path / "results.md").is_file()


def test_expected_sweeps_fit_bounds_every_measured_run(tmp_path):
    """benchmarks.expected_sweeps (auto's sweep model): the slow-side fit covers three of four measured runs."""
    from benchmarks import expected_sweeps

    assert expected_sweeps.fit([(1.0, 10), (2.0, 12), (4.0, 20)]) == (3.43, 6.6)  # LS slope, b raised to cover all
    out = tmp_path / "sweeps.json"
    result = expected_sweeps.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["fit_a_b"] == {k: list(v) for k, v in result["fit_a_b"].items()}
    for sampler, (a, b) in result["fit_a_b"].items():
        rows = [r for r in result["rows"] if r["sampler"] == sampler]
        covered = [r["sweeps"] <= a * r["n_over_w"] + b + 1e-9 for r in rows]
        assert sum(covered) >= 0.75 * len(rows)  # the slow side: three of four runs need no more than predicted
    assert all(row["within_tol"] for row in result["rows"])  # tol is the distance to serial (window_accept_tol)


def test_multigpu_projection_is_autos_prediction(tmp_path):
    """The projection is --sampler auto's own pricing (one auto pick per N and GPU count, the pick the cheapest),
    serial sharded over its two guidance rows, and the JSON lands whole."""
    import json

    from benchmarks import multigpu_projection as mgp
    from srds_trt.autotune import pricing as autotune

    result = mgp.project(0.1)
    for steps in mgp.STEPS:
        for gpus in mgp.WORLDS:
            rows = [r for r in result["rows"] if r["steps"] == steps and r["gpus"] == gpus]
            picked = [r for r in rows if r["auto_picks"]]
            assert len(picked) == 1 and picked[0]["projected_ms"] == min(r["projected_ms"] for r in rows)
            serial = next(r for r in rows if r["sampler"] == "serial")
            assert serial["projected_ms"] == round(steps * (mgp.H200_SD2_MS[2] if gpus == 1 else mgp.H200_SD2_MS[1] + 0.1), 1)
    choice = autotune.choose(steps=100, latency_ms=mgp.H200_SD2_MS, world_size=4, allgather_ms=0.1,
                             sweep_overhead_ms=autotune.GPU_SWEEP_OVERHEAD_MS)
    picked = next(r for r in result["rows"] if r["steps"] == 100 and r["gpus"] == 4 and r["auto_picks"])
    assert picked["projected_ms"] == round(choice.predicted_ms, 1)
    mgp.main(["--out", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text())["kind"] == "PROJECTED"
    assert not list(tmp_path.glob(".*.tmp"))


def test_gpu_samplers_flow_section_runs_every_sampler(tmp_path, monkeypatch):
    """The prepared device check's sd3 section, on a tiny SD3 (its loader swapped; the script is otherwise as the
    GPU runs it): every sampler measured, errors vs serial recorded, auto's curve kept, nothing failed."""
    from benchmarks import gpu_samplers
    from srds_trt import pipeline as pipeline_module
    from srds_trt.models.text import random_text_stack
    from srds_trt.models.transformers import TINY_CONFIGS, load_transformer

    def tiny(name, **kwargs):
        loaded = load_transformer(name, tiny=True, seed=1)
        return pipeline_module.SRDSPipeline(loaded, text=random_text_stack(loaded, 0, TINY_CONFIGS[name]["vae"]))

    monkeypatch.setattr(pipeline_module.SRDSPipeline, "from_pretrained", staticmethod(tiny))
    gpu_samplers.main(["--smoke", "--sections", "sd3", "--out", str(tmp_path), "--budget-s", "300"])
    record = json.loads((tmp_path / "gpu_samplers.json").read_text())
    rows = record["sd3-float32"]["N4"]
    assert "errors" not in record, record.get("errors")
    assert [r["sampler"] for r in rows] == ["serial", "srds", "paradigms", "paradigms", "eps-picard", "auto"]
    assert all(r["max_abs_err_vs_serial"] is not None for r in rows)
    assert rows[-1]["auto"]["latency_per_rows_ms"]
