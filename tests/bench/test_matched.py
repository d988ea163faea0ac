"""benchmarks/matched.py (eps-Picard vs ParaDiGMS at matched error): runs end to end, writes its files, matches honestly."""

from __future__ import annotations

import json

from benchmarks import matched
from benchmarks.matched import Run


def _run(sampler: str, calls: int, err: float, tol: float) -> Run:
    return Run("mix", 100, sampler, 10, tol, calls, 3.0 * calls, err, 0.1, 10)


def test_matched_takes_the_cheapest_run_within_the_target_per_sampler():
    runs = [_run("paradigms", 12, 5e-2, 0.5), _run("paradigms", 15, 5e-3, 0.1), _run("paradigms", 20, 5e-4, 0.01),
            _run("eps-picard", 8, 2e-2, 1e-2), _run("eps-picard", 9, 9e-3, 3e-3), _run("eps-picard", 13, 2e-3, 1e-3)]
    rows = {row["target"]: row for row in matched.matched(runs)}
    assert rows[1e-2]["paradigms"]["sequential_calls"] == 15 and rows[1e-2]["eps-picard"]["sequential_calls"] == 9
    assert rows[1e-2]["ratio"] == 9 / 15
    assert rows[1e-3]["paradigms"]["sequential_calls"] == 20 and rows[1e-3]["eps-picard"] is None
    assert rows[1e-3]["ratio"] is None


def test_tiny_run_writes_json_and_markdown(tmp_path):
    results = matched.main(["--mixtures", "wide2", "--mixture-steps", "16", "--digits-steps", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "torch", "date"} <= set(saved["machine"])
    assert "| wide2 | 16 |" in (tmp_path / "results.md").read_text()
    windows = {r["window"] for r in saved["runs"] if r["sampler"] == "paradigms"}
    assert windows == {4, 8}  # ParaDiGMS gets both round(sqrt N) and 2 round(sqrt N)
    for r in saved["runs"]:
        assert r["max_points_per_call"] <= 8  # equal parallel width: at most 2 round(sqrt N) points per image
    assert {r["sampler"] for r in saved["runs"]} == {"paradigms", *matched.ABLATIONS}
    assert results["matched"][0]["paradigms"] is not None
    assert all(abs(sum(r["evals_share"]) - 1) < 1e-9 for r in saved["runs"])
    assert "## Where the calls go" in (tmp_path / "results.md").read_text()


def test_merge_joins_partial_runs(tmp_path):
    for name, steps in (("a", "9"), ("b", "16")):
        matched.main(["--mixtures", "wide2", "--mixture-steps", steps, "--digits-steps", "--out", str(tmp_path / name)])
    merged = matched.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    assert sorted({(row["case"], row["steps"]) for row in merged["matched"]}) == [("wide2", 9), ("wide2", 16)]
    assert "| wide2 | 16 |" in (tmp_path / "m" / "results.md").read_text()


def test_evaluations_per_point_follow_the_window():
    # window 3 over N = 5: sweep 1 sees 0,1,2 and slides 1; sweep 2 sees 1,2,3 and slides 2; sweep 3 sees 3,4
    assert matched.evaluations_per_point(5, 3, [1, 2, 2]) == [1, 2, 2, 2, 1]
    assert matched.evals_share([1, 2, 2, 2, 1, 4, 5, 3]) == (2 / 8, 3 / 8, 1 / 8, 2 / 8)


def test_evaluations_per_point_add_up_to_the_sampler_s_rows(tmp_path):
    import torch

    from benchmarks.cases import mixture_case
    from srds_trt.samplers.eps_picard import eps_picard_sample
    from srds_trt.samplers.paradigms import paradigms_sample

    case = mixture_case("wide2", images=3, device=torch.device("cpu"))
    timesteps, alphas, steps = case.grid(30)
    for fn, window in ((eps_picard_sample, 8), (paradigms_sample, 5)):
        result = fn(case.model, case.x, timesteps, alphas, tol=1e-3, window=window)
        counts = matched.evaluations_per_point(steps, result.window, result.slides)
        assert sum(counts) * 3 == result.model_evals and min(counts) >= 1


def test_finite_difference_jvp_is_exact_for_a_linear_model_and_free_at_zero():
    import torch

    from benchmarks.newton_bound import FiniteDifferenceJVP

    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jvp = FiniteDifferenceJVP(lambda x, t: x @ a.T + t.to(x.dtype)[:, None])
    x, d = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([5, 5, 5])
    assert (jvp(x, t, d) - d @ a.T).abs().max() < 1e-10 and jvp.calls == 1
    assert jvp(x, t, torch.zeros_like(d)).abs().max() == 0 and jvp.calls == 1


def test_newton_bound_runs_end_to_end(tmp_path):
    """wide2 N = 196: ParaDiGMS's counts come from the committed matched results, eps-Picard's are re-measured
    (the committed 10 / 11), and the Newton bound is within each target with its derivative calls counted."""
    from benchmarks import newton_bound

    results = newton_bound.main(["--mixture", "wide2", "--steps", "196", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {r["target"]: r for r in saved["rows"]}
    assert (rows[1e-2]["paradigms_calls"], rows[1e-3]["paradigms_calls"]) == (18, 22)
    assert (rows[1e-2]["allowed_calls"], rows[1e-3]["allowed_calls"]) == (10, 13)
    assert (rows[1e-2]["eps-picard"]["sequential_calls"], rows[1e-3]["eps-picard"]["sequential_calls"]) == (10, 11)
    for target, row in rows.items():
        assert row["eps-picard-newton"]["err_max"] <= target and row["newton_jvp_calls"] > 0
        best = [r for r in saved["runs"] if r["sampler"] == "eps-picard-newton"
                and r["tol"] == row["eps-picard-newton"]["tol"]]
        assert row["newton_jvp_calls"] == best[0]["jvp_calls"]  # the chosen run's own derivative calls
    assert all((r["jvp_calls"] is None) == (r["sampler"] == "eps-picard") for r in saved["runs"])
    assert "| wide2 | 196 | 0.01 | 18 | 10 |" in (tmp_path / "results.md").read_text()
    assert json.loads(json.dumps(results["rows"])) == saved["rows"]
    assert not list(tmp_path.glob(".*.tmp"))
