"""SRDS across gloo ranks on one CPU: the sharded job gives the single-process sample bit-for-bit, the same
stats, per-rank row counts that add up, and a rank that raises or dies ends the whole job with one line.

Each job is K real processes (tests/test_distributed_worker.py with torchrun's variables on 127.0.0.1), the
way torchrun would start them, without torchrun's agent (its start-up would double the CI time).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("test_distributed_worker.py")


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
    results, _ = launch(world, "parity", tmp_path, timeout=300)
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    keys = [k for k in ranks[0] if isinstance(k, str) and k.startswith("sharded:")]
    assert len(keys) == 8  # 6 mixture (srds plain/pipelined, paradigms; converged and max_iters=2), guided, runner
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
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_failing_rank_ends_every_rank_with_one_line(tmp_path, mode):
    timeout = 5
    results, elapsed = launch(2, mode, tmp_path, timeout=60, extra_env={"SRDS_TEST_TIMEOUT": str(timeout)})
    assert all(rc != 0 for rc, _ in results)
    survivor_err = results[0][1].strip()
    assert survivor_err.startswith("rank 0: error: rank 0: all-gather failed"), survivor_err
    assert len(survivor_err.splitlines()) == 1, survivor_err
    if mode == "raise":
        assert results[1][1].strip().splitlines() == [results[1][1].strip()] and "on purpose" in results[1][1]
    assert elapsed < 40  # bounded by the group's timeout (5 s) plus process start-up, never a hang
