"""SRDS across gloo ranks on one CPU: the sharded job gives the single-process sample bit-for-bit, the same
stats, per-rank row counts that add up, and a rank that raises or dies ends the whole job with one line.

Each job is K real processes (tests/fixtures/distributed_worker.py with torchrun's variables on 127.0.0.1), the
way torchrun would start them, without torchrun's agent (its start-up would double the CI time).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "fixtures" / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, out_dir: Path, timeout: float = 120, extra_env=None):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", **(extra_env or {})}
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(out_dir)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    start, results = time.perf_counter(), []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{mode}: a rank hung past {timeout} s")
        results.append((p.returncode, err))
    return results, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_job_matches_single_process_bitwise(tmp_path, world):
    quick = world > 2
    results, _ = launch(world, "parity", tmp_path, timeout=300, extra_env={"SRDS_TEST_QUICK": str(int(quick))})
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    keys = [k for k in ranks[0] if isinstance(k, str) and k.startswith("sharded:")]
    assert len(keys) == (4 if quick else 8)  # 6 mixture (srds plain/pipelined, paradigms; converged and max_iters=2), guided, runner
    for key in keys:
        single = ranks[0][key.replace("sharded:", "single:")]
        for rank in ranks:  # every rank returns the same sample and stats as one process, bit-for-bit
            got = rank[key]
            assert torch.equal(got["sample"], single["sample"]), key
            for field in ("iterations", "sequential_calls", "model_evals", "residuals", "converged"):
                assert got[field] == single[field], (key, field)
        counts = ranks[0][key].get("counts")
        if counts is not None:  # rows each rank ran add up to the rows the sampler evaluated
            assert counts["world_size"] == world and all(r[key]["counts"] == counts for r in ranks)
            per_row = 2 if key.startswith("sharded:runner") else 1  # the runner's engine rows are guided (x2)
            total = single["model_evals"] * per_row
            assert sum(counts["rank_rows"]) >= total if "runner" in key else sum(counts["rank_rows"]) == total
            assert max(counts["rank_rows"]) - min(counts["rank_rows"]) <= counts["rank_engine_calls"] * (-(-64 // world))
    not_converged = ranks[0]["sharded:mixture/srds/{'pipelined': True}/0.0/2"]
    assert not_converged["iterations"] == 2 and not not_converged["converged"]  # compared short of convergence


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill"])  # a rank that raises exits too: the same closed socket ("raise" mode
# of the worker shows it; one of the two keeps CI time down)
def test_failing_rank_ends_every_rank_with_one_line(tmp_path, mode):
    timeout = 5
    results, elapsed = launch(2, mode, tmp_path, timeout=120, extra_env={"SRDS_TEST_TIMEOUT": str(timeout)})
    assert all(rc != 0 for rc, _ in results)
    survivor_err = results[0][1].strip()
    assert survivor_err.startswith("rank 0: error: rank 0: all-gather failed"), survivor_err
    assert len(survivor_err.splitlines()) == 1, survivor_err
    if mode == "raise":
        assert results[1][1].strip().splitlines() == [results[1][1].strip()] and "on purpose" in results[1][1]
    # no hang: launch() fails the test past 120 s; the survivor's wait is bounded by the group's 5 s timeout
    # (a dead peer's closed socket usually ends it sooner)


@pytest.mark.slow
def test_torchrun_generate_digits_two_ranks_matches_one_process(tmp_path):
    """The real launcher: `torchrun --nproc-per-node 2 -m srds_trt.generate` on digits; rank 0 writes the outputs,
    stats.json carries world_size and per-rank rows, and iterations / sequential calls equal one process's
    (the 16x16 UNet's CPU convolutions are not batch-invariant: samples agree to ~1e-5, not bit-for-bit)."""
    args = ["--steps", "16", "--prompt", "3", "--quiet", "--compare-serial"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "srds_trt.generate"]
    dist = subprocess.run(torchrun + args + ["--out", str(tmp_path / "dist")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert dist.returncode == 0, dist.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "srds_trt.generate", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    a = json.loads((tmp_path / "dist" / "stats.json").read_text())
    b = json.loads((tmp_path / "one" / "stats.json").read_text())
    assert a["world_size"] == 2 and "world_size" not in b
    for key in ("iterations", "sequential_calls", "model_evals"):
        assert a[key] == b[key], key
    # both ranks ran every call (SRDS + the serial comparison), rows split evenly (guided: 2 rows per state)
    assert a["rank_engine_calls"] == a["sequential_calls"] + a["serial"]["sequential_calls"]
    assert sum(a["rank_rows"]) == 2 * (a["model_evals"] + a["serial"]["model_evals"])
    assert abs(a["max_abs_diff_vs_serial"] - b["max_abs_diff_vs_serial"]) < 1e-4


def test_rank_counts_are_per_call_in_a_long_lived_pipeline():
    """A server keeps one pipeline: its stats must give each call's engine calls and rows, not the running total.
    One gloo rank in this process (world size 1: the counting path without a second process)."""
    import torch.distributed as dist

    from srds_trt import SRDSPipeline

    store = dist.HashStore()
    group_made = not dist.is_initialized()
    if group_made:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        pipe = SRDSPipeline.from_pretrained("digits", process_group=dist.group.WORLD)
        runs = [pipe(["3"], num_inference_steps=6, sampler="srds", tol=0.0, progress_bar=False).stats for _ in range(2)]
    finally:
        if group_made:
            dist.destroy_process_group()
    first, second = runs
    assert first["world_size"] == 1
    assert first["rank_engine_calls"] == second["rank_engine_calls"] == first["sequential_calls"]
    assert first["rank_rows"] == second["rank_rows"] == [2 * first["model_evals"]]
