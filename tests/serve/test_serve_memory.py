"""Bounded memory: RSS stays flat over varied valid traffic (a bounded loopback soak: distinct (steps, images,
sampler) settings, each a new shape), the caches are reported in /metrics and kept under --cache-mb (LRU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("uvicorn")

from serve_helpers import metric, post, serve, v2_body  # noqa: E402

from srds_trt import SRDSPipeline  # noqa: E402

INFER = "/v2/models/digits/infer"
RSS = 'srds_process_resident_bytes{model="digits"}'
MB = 1 << 20
# distinct settings: round 1 grows to the largest job (8 images x 64 steps); rounds 2 and 3 stay inside that
# envelope with other settings (steps, tol, seed). The allocator's and oneDNN's primitive cache (an LRU of 1024
# shapes) settle within the envelope; what the server keeps must then stop growing with the number of settings.
ROUND_1 = [(steps, images, sampler, 0.01) for steps, images in ((8, 2), (16, 4), (32, 8), (64, 8))
           for sampler in ("srds", "serial")]
ROUND_2 = [(steps, images, "srds", tol) for steps, images in ((12, 3), (20, 5), (40, 7), (56, 8), (60, 6))
           for tol in (0.02, 0.005)]
ROUND_3 = [(steps, images, "srds", tol) for steps, images in ((12, 3), (20, 5), (40, 7), (56, 8), (60, 6))
           for tol in (0.03, 0.002)]


@pytest.mark.slow
def test_rss_stays_flat_over_varied_traffic():
    from srds_trt.serve import BatchConfig

    torch.set_num_threads(1)
    pipe = SRDSPipeline.from_pretrained("digits")
    with serve(pipe, BatchConfig(window_s=0.0, max_batch_images=8, max_queue=8, timeout_s=300),
               cache_bytes=64 * MB) as (port, _):
        for _ in range(2):  # warm: torch's and the allocator's one-time state
            assert post(port, INFER, v2_body(["1", "2"], steps=8))[0] == 200
        baseline = metric(port, RSS)
        rounds = []
        for settings in (ROUND_1, ROUND_2, ROUND_3):
            after = []
            for steps, images, sampler, tol in settings:
                body = v2_body([str(i) for i in range(images)], seed=steps, steps=steps, sampler=sampler, tol=tol)
                status, reply = post(port, INFER, body)
                assert status == 200, reply
                after.append((metric(port, RSS) - baseline) / MB)
            rounds.append(after)
        print(f"RSS baseline {baseline / MB:.0f} MB; MB above it after each job, by round: "
              + "; ".join(" ".join(f"{g:+.0f}" for g in r) for r in rounds))
        assert max(rounds[2]) < max(rounds[1]) + 8, rounds  # flat: more distinct settings add nothing
        assert max(max(r) for r in rounds) < 96, rounds  # and freed heap goes back (without: +322 MB, then +650)
        assert metric(port, 'srds_cache_budget_bytes{model="digits"}') == 64 * MB
        assert 'srds_cache_bytes{model="digits"}' in __import__("urllib.request").request.urlopen(
            f"http://127.0.0.1:{port}/metrics").read().decode()


def test_lru_budget_evicts_least_recently_used_runner():
    """The runtime's runner cache under a byte budget: the least recently used runner goes first; the shared
    engine is never counted; two views of one storage count once."""
    from types import SimpleNamespace

    from srds_trt.runtime.cache import RunnerCache

    cache = RunnerCache()
    engine = SimpleNamespace(weights=torch.zeros(MB))  # 4 MB, shared by every runner: not theirs to count
    for key in ("a", "b", "c"):
        cache.put(key, SimpleNamespace(buffer=torch.zeros(MB // 4), engine=engine))  # 1 MB each
    assert cache.get("a") is not None  # used: "b" is now the least recently used
    assert cache.trim(2 * MB + 1, skip=engine) == 2 * MB
    assert list(cache) == ["c", "a"] and cache.evictions == 1 and cache.get("b") is None
    shared = torch.zeros(MB // 4)
    cache.put("d", SimpleNamespace(x=shared[:10], y=shared[10:], engine=engine))
    assert cache.trim(None, skip=engine) == 3 * MB == cache.held_bytes(skip=engine)
    assert cache.trim(0, skip=engine) == 0 and len(cache) == 0 and cache.evictions == 4


def test_server_budget_trims_the_runtime_after_each_job():
    """CacheBudget hands its budget to the runtime (RuntimeSampler.trim) after every job and counts its drops."""
    from types import SimpleNamespace

    from srds_trt.runtime.cache import RunnerCache
    from srds_trt.runtime.executor import RuntimeSampler
    from srds_trt.serve.memory import CacheBudget

    runtime = RuntimeSampler.__new__(RuntimeSampler)  # the cache and trim only: no engine is built here
    runtime.runners, runtime.engine, runtime.device = RunnerCache(), None, torch.device("cpu")
    for key in ("a", "b", "c"):
        runtime.runners.put(key, SimpleNamespace(buffer=torch.zeros(MB // 4)))
    budget = CacheBudget(SimpleNamespace(runtime=runtime, auto=None), MB)
    assert budget.after_job() == MB and list(runtime.runners) == ["c"] and budget.evictions == 2


def test_auto_planner_caches_stay_capped():
    from types import SimpleNamespace

    from srds_trt.serve.memory import MAX_AUTO_ENTRIES, CacheBudget

    planner = SimpleNamespace(cache={("reference", i): {1: 1.0} for i in range(MAX_AUTO_ENTRIES + 5)},
                              observed={(i, 0.01, True, "srds"): [3] for i in range(MAX_AUTO_ENTRIES + 2)})
    planner.cache[("recorded", "x")] = "kept"
    pipe = SimpleNamespace(runtime=None, auto=planner)
    CacheBudget(pipe, None).after_job()
    assert len(planner.cache) == MAX_AUTO_ENTRIES + 1 and ("recorded", "x") in planner.cache
    assert ("reference", 0) not in planner.cache and ("reference", MAX_AUTO_ENTRIES + 4) in planner.cache
    assert len(planner.observed) == MAX_AUTO_ENTRIES
