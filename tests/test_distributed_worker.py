"""One rank of a gloo job for tests/test_distributed.py (run as a script, with torchrun's variables set).

    python tests/test_distributed_worker.py MODE OUT_DIR

MODE parity: every sampler through ShardedModel / ShardedEngine, plus the same runs unsharded in this process;
each rank saves its results to OUT_DIR/rank<k>.pt. MODE raise / kill: rank 1 raises / dies at its 3rd model call;
every rank must end with one line on stderr. No pytest tests live here.
"""

from __future__ import annotations

import os
import sys
import time

import torch

torch.set_num_threads(1)

from srds_trt.models.analytic import hard_mixture  # noqa: E402
from srds_trt.runtime.distributed import DistributedError, ShardedEngine, ShardedModel, init_from_env  # noqa: E402
from srds_trt.samplers.guidance import classifier_free_guidance  # noqa: E402
from srds_trt.samplers.timesteps import ddim_grid  # noqa: E402
from srds_trt.runtime import SRDSRunner  # noqa: E402
from srds_trt.runtime.engines import EngineSpec, TorchEngine  # noqa: E402
from srds_trt.samplers import SAMPLERS  # noqa: E402

SD_LIKE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               set_alpha_to_one=True, clip_sample=False, steps_offset=1)
SPEC = EngineSpec(sample_shape=(2, 2, 2), cond_shape=(), cond_dtype=torch.long, dtype=torch.float32)


def make_cond_model(seed=0):
    """Row-wise nonlinear conditional model (fp32 output; per-row math, so batching should not change a row)."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(9, 32, generator=gen, dtype=torch.float64) / 3
    w2 = torch.randn(32, 8, generator=gen, dtype=torch.float64) / 6
    emb = torch.randn(11, 8, generator=gen, dtype=torch.float64) / 4

    def cond_model(x, t, c):
        h = torch.cat([x.flatten(1).double(), (t.double() / 1000)[:, None]], 1)
        return ((torch.tanh(h @ w1) @ w2) + emb[c.long()]).view_as(x).to(x.dtype)

    return cond_model


def summary(result) -> dict:
    return dict(sample=result.sample.detach().clone(), iterations=result.iterations,
                sequential_calls=result.sequential_calls, model_evals=result.model_evals,
                residuals=list(result.residuals), converged=result.converged)


def mixture_runs(wrap) -> dict:
    ts, ac = ddim_grid(SD_LIKE, 16)
    mix = hard_mixture(ac)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    out = {}
    configs = [("srds", dict(pipelined=True))]
    if os.environ.get("SRDS_TEST_QUICK") != "1":  # the 4-rank job runs pipelined SRDS only (2 shared cores in CI)
        configs += [("srds", dict(pipelined=False)), ("paradigms", {})]
    for name, options in configs:
        for tol, max_iters in [(0.0, None), (0.0, 2)]:  # max_iters=2: compared short of convergence
            model = wrap(mix)
            res = SAMPLERS[name](model, x, ts, ac, tol=tol, max_iters=max_iters, **options)
            key = f"mixture/{name}/{options}/{tol}/{max_iters}"
            out[key] = summary(res)
            if hasattr(model, "counts"):
                out[key]["counts"] = model.counts.as_stats()
    return out


def guided_runs(wrap) -> dict:
    ts, ac = ddim_grid(SD_LIKE, 16)
    cond_model = wrap(make_cond_model())
    x = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    model = classifier_free_guidance(cond_model, torch.tensor([3, 4]), torch.full((2,), 10), 3.0)
    res = SAMPLERS["srds"](model, x, ts, ac, tol=0.0, pipelined=True)
    return {"guided/srds": summary(res)}


def runner_runs(sharded: bool) -> dict:
    ts, ac = ddim_grid(SD_LIKE, 16)
    engine = TorchEngine(make_cond_model(), SPEC, max_rows=64)
    if sharded:
        engine = ShardedEngine(engine)
    runner = SRDSRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac, pipelined=True, state_dtype=torch.float32)
    x = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    res = runner.run(x, torch.tensor([1, 2]), torch.full((2,), 10), guidance_scale=2.0, tol=0.0)
    out = {"runner/srds": summary(res)}
    if sharded:
        out["runner/srds"]["counts"] = engine.counts.as_stats()
    return out


def parity(out_dir: str) -> None:
    init_from_env(torch.device("cpu"), timeout_s=60)
    results = {"rank": torch.distributed.get_rank(), "world_size": torch.distributed.get_world_size()}
    for prefix, wrap in (("sharded", ShardedModel), ("single", lambda m: m)):
        for key, value in {**mixture_runs(wrap), **guided_runs(wrap)}.items():
            results[f"{prefix}:{key}"] = value
    for prefix, sharded in (("sharded", True), ("single", False)):
        for key, value in runner_runs(sharded).items():
            results[f"{prefix}:{key}"] = value
    torch.save(results, os.path.join(out_dir, f"rank{results['rank']}.pt"))
    torch.distributed.destroy_process_group()


def failure(mode: str) -> None:
    init_from_env(torch.device("cpu"), timeout_s=float(os.environ.get("SRDS_TEST_TIMEOUT", "5")))
    rank, calls = torch.distributed.get_rank(), [0]
    ts, ac = ddim_grid(SD_LIKE, 36)
    mix = hard_mixture(ac)

    def model(x, t):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            if mode == "kill":
                os._exit(3)
            raise ValueError("rank 1 model failed on purpose")
        return mix(x, t)

    SAMPLERS["srds"](ShardedModel(model), torch.randn(3, 2), ts, ac, tol=0.0)


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    start = time.perf_counter()
    try:
        parity(out_dir) if mode == "parity" else failure(mode)
    except (DistributedError, ValueError) as exc:
        print(f"rank {os.environ['RANK']}: error: {exc} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # as generate's _exit: no teardown of a gloo group whose peer died (it aborts with a 2nd line)
