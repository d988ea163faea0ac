"""The runner short of convergence: every iterate, every boundary, every residual (CPU, eager programs).

At tol = 0 and max_iters = B, SRDS hands back the fine segments chained from x_T: the coarse rows, the Parareal
correction and the second stream never reach that answer, so equality there proves little (a runner with a
halved correction passes it). These tests compare where those parts DO matter:

- every boundary state U[p][b], p = 0..B, of a runner against an independent textbook Parareal
  (helpers_core.parareal_ref, written from the paper's formulas, not from srds_trt);
- runs stopped at max_iters = 1, 2, 3 (< B = 4) against the reference sampler srds_sample: the sample, the
  per-boundary changes and the residuals;
- merged / separate / overlap (CPU fallback: separate), plain and pipelined, guided and not;
- the early exit: the result is handed back after the tick that completed the accepted iteration, while
  speculative ticks of the next iteration were already launched (on CPU, residuals land `lookahead` ticks late).

scripts/mutants.py breaks the runtime on purpose (halved correction, wrong coarse coefficients, shared slots,
formation before the coarse call, ...) and checks this file fails for each.
"""

from __future__ import annotations

import functools

import pytest
import torch

from helpers_core import parareal_ref, single_thread  # noqa: F401  (fixture)
from srds_trt.samplers.guidance import classifier_free_guidance, conditional
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.runtime import SRDSRunner
from srds_trt.runtime.engines import EngineSpec, TorchEngine
from srds_trt.samplers import srds_sample

pytestmark = pytest.mark.usefixtures("single_thread")

SD_LIKE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               set_alpha_to_one=True, clip_sample=False, steps_offset=1)
SPEC = EngineSpec(sample_shape=(2, 2, 2), cond_shape=(), cond_dtype=torch.long, dtype=torch.float64)
STEPS, BLOCKS, BATCH, SCALE = 16, 4, 2, 3.0
LABELS, NULL = torch.tensor([1, 6]), torch.full((BATCH,), 10)


_GEN = torch.Generator().manual_seed(0)
W1 = torch.randn(9, 24, generator=_GEN, dtype=torch.float64) / 2
W2 = torch.randn(24, 8, generator=_GEN, dtype=torch.float64) / 4
EMB = torch.randn(11, 8, generator=_GEN, dtype=torch.float64) / 3


def cond_model(x, t, c):
    """Row-wise nonlinear conditional model in float64 (batch composition cannot change a row)."""
    w1, w2, emb = W1, W2, EMB
    h = torch.cat([x.flatten(1).double(), (t.double() / 1000)[:, None]], 1)
    return ((torch.tanh(h @ w1) @ w2) + emb[c.long()] + 0.4 * x.flatten(1)).view_as(x).to(x.dtype)


def x_T(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, *SPEC.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def model_for(guided: bool):
    return classifier_free_guidance(cond_model, LABELS, NULL, SCALE) if guided else conditional(cond_model, LABELS)


@functools.lru_cache(maxsize=None)
def grid(steps: int = STEPS):
    return ddim_grid(SD_LIKE, steps)


@functools.lru_cache(maxsize=None)
def textbook(guided: bool, seed: int):
    ts, ac = grid()
    bounds = [0, 4, 8, 12, 16]  # B = 4 equal blocks (block_bounds' convention, written out)
    return parareal_ref(model_for(guided), x_T(seed), ts.tolist(), ac, bounds, BLOCKS)


def make_runner(*, coarse: str, pipelined: bool, guided: bool, max_iters=None, lookahead=2, steps=STEPS,
                blocks=BLOCKS) -> SRDSRunner:
    ts, ac = grid(steps)
    engine = TorchEngine(cond_model, SPEC, max_rows=64)
    return SRDSRunner(engine, batch=BATCH, timesteps=ts, alphas_cumprod=ac, num_blocks=blocks, max_iters=max_iters,
                      pipelined=pipelined, guided=guided, coarse=coarse, state_dtype=torch.float64, lookahead=lookahead)


def run(runner: SRDSRunner, guided: bool, seed: int, tol: float = 0.0):
    if guided:
        return runner.run(x_T(seed), LABELS, NULL, guidance_scale=SCALE, tol=tol)
    return runner.run(x_T(seed), LABELS, tol=tol)


def assert_lists_close(got, expected, atol):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=atol)


MODES = [(coarse, pipelined, guided) for coarse in ("merged", "separate", "overlap")
         for pipelined in (False, True) for guided in (True, False)]


@pytest.mark.parametrize("coarse,pipelined,guided", MODES)
def test_every_boundary_of_every_iterate_equals_textbook_parareal(coarse, pipelined, guided):
    runner = make_runner(coarse=coarse, pipelined=pipelined, guided=guided)
    for seed in (0, 1):  # the second run reuses the runner: no state of the first may leak into it
        result = run(runner, guided, seed)
        ref = textbook(guided, seed)
        assert result.iterations == BLOCKS
        for p in range(BLOCKS + 1):
            for b in range(1, BLOCKS + 1):
                torch.testing.assert_close(runner.boundary(p, b), ref[p][b], rtol=0, atol=1e-10,
                                           msg=lambda m, p=p, b=b: f"U[{p}][{b}] (seed {seed}): {m}")
        changes = [[float((ref[p][b] - ref[p - 1][b]).abs().max()) for b in range(1, BLOCKS + 1)]
                   for p in range(1, BLOCKS + 1)]
        assert_lists_close(result.boundary_changes, changes, atol=1e-10)
        assert_lists_close(result.residuals, [max(c) for c in changes], atol=1e-10)


@pytest.mark.parametrize("coarse,pipelined,guided", MODES)
def test_runs_stopped_short_of_convergence_equal_the_reference_sampler(coarse, pipelined, guided):
    ts, ac = grid()
    for k in (1, 2, 3):
        runner = make_runner(coarse=coarse, pipelined=pipelined, guided=guided, max_iters=k)
        got = run(runner, guided, seed=2)
        ref = srds_sample(model_for(guided), x_T(2), ts, ac, tol=0.0, num_blocks=BLOCKS, max_iters=k, pipelined=pipelined)
        assert (got.iterations, got.converged, got.sequential_calls, got.model_evals) == \
            (ref.iterations, ref.converged, ref.sequential_calls, ref.model_evals) == (k, False, ref.sequential_calls, ref.model_evals)
        torch.testing.assert_close(got.sample, ref.sample, rtol=0, atol=1e-12)
        assert_lists_close(got.boundary_changes, ref.boundary_changes, atol=1e-12)
        assert_lists_close(got.residuals, ref.residuals, atol=1e-12)
        # short of convergence the answer is NOT the chained fine segments: the correction is in it
        assert float((got.sample - textbook(guided, 2)[BLOCKS][BLOCKS]).abs().max()) > 1e-6


@pytest.mark.parametrize("coarse", ["merged", "separate"])
def test_early_exit_waits_for_the_accepting_tick_not_the_speculative_ones(coarse):
    """The host waits on the event after the tick that completed the accepted iteration."""
    ts, ac = grid(36)
    runner = make_runner(coarse=coarse, pipelined=True, guided=True, lookahead=2, steps=36, blocks=6)
    tol = 1e-2
    got = run(runner, True, seed=3, tol=tol)
    ref = srds_sample(model_for(True), x_T(3), ts, ac, tol=tol, num_blocks=6, pipelined=True)
    assert 1 <= got.iterations == ref.iterations < 6, "the case must stop early to test the exit"
    accepting = runner.plan.ticks_until(got.iterations) - 1
    assert runner.last_run.final_tick == accepting
    assert got.sequential_calls == ref.sequential_calls == accepting + 1
    assert got.ticks_launched > got.sequential_calls  # the next iteration was running speculatively
    assert got.model_evals == ref.model_evals  # work the answer needed; speculation shows in ticks_launched
    torch.testing.assert_close(got.sample, ref.sample, rtol=0, atol=1e-12)
    assert_lists_close(got.residuals, ref.residuals, atol=1e-12)
    # the accepted iterate is untouched by the speculative ticks behind it
    torch.testing.assert_close(runner.boundary(got.iterations, 6), ref.sample, rtol=0, atol=1e-12)


def test_iteration_zero_needs_no_residual_of_its_own():
    """Iteration 1's changes cover every U[0][b]: no host wait on iteration 0 (only max_iters = 0 checks it)."""
    runner = make_runner(coarse="merged", pipelined=True, guided=True)
    run(runner, True, seed=0)
    assert runner.last_run.residuals_launched == list(range(1, BLOCKS + 1))
    coarse_only = make_runner(coarse="merged", pipelined=True, guided=True, max_iters=0)
    got = run(coarse_only, True, seed=0)
    assert got.iterations == 0 and coarse_only.last_run.residuals_launched == [0]
    torch.testing.assert_close(got.sample, textbook(True, 0)[0][BLOCKS], rtol=0, atol=1e-10)
