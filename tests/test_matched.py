"""benchmarks/matched.py (issue 13's matched comparison): runs end to end, writes its files, matches honestly."""

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


def test_merge_joins_partial_runs(tmp_path):
    for name, steps in (("a", "9"), ("b", "16")):
        matched.main(["--mixtures", "wide2", "--mixture-steps", steps, "--digits-steps", "--out", str(tmp_path / name)])
    merged = matched.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    assert sorted({(row["case"], row["steps"]) for row in merged["matched"]}) == [("wide2", 9), ("wide2", 16)]
    assert "| wide2 | 16 |" in (tmp_path / "m" / "results.md").read_text()
