"""The runtime on CPU: engines behind one interface, and the scheduler giving srds_sample's results.

On CPU the runner executes the same per-bucket programs as on a GPU (gather, engine call, guidance, DDIM update,
scatter, boundary formation), only without streams and graphs; so equality with the pure reference here checks
the tables, slots and programs the GPU path replays.
"""

from __future__ import annotations

import pytest
import torch

from helpers_core import single_thread  # noqa: F401  (fixture)
from srds_trt.runtime import NonFiniteError, SerialRunner, SRDSRunner
from srds_trt.runtime.engines import EngineError, EngineSpec, TorchEngine, bucket_for, default_buckets
from srds_trt.samplers.guidance import classifier_free_guidance, conditional
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.samplers import serial_sample, srds_sample

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: a second intra-op thread only spins

SD_LIKE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               set_alpha_to_one=True, clip_sample=False, steps_offset=1)
SPEC = EngineSpec(sample_shape=(2, 2, 2), cond_shape=(), cond_dtype=torch.long, dtype=torch.float64)


def make_cond_model(seed=0):
    """A small row-wise nonlinear conditional model in float64 (so batching cannot change a row)."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(9, 32, generator=gen, dtype=torch.float64) / 3
    w2 = torch.randn(32, 8, generator=gen, dtype=torch.float64) / 6
    emb = torch.randn(11, 8, generator=gen, dtype=torch.float64) / 4

    def cond_model(x, t, c):
        h = torch.cat([x.flatten(1).double(), (t.double() / 1000)[:, None]], 1)
        return ((torch.tanh(h @ w1) @ w2) + emb[c.long()]).view_as(x).to(x.dtype)

    return cond_model


def test_bucket_ladder_and_lookup():
    assert default_buckets(64) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert default_buckets(5, 2) == (2, 3, 4, 5)
    assert bucket_for(5, (1, 2, 4, 8)) == 8
    assert bucket_for(8, (1, 2, 4, 8)) == 8
    with pytest.raises(EngineError, match="exceed the largest bucket"):
        bucket_for(9, (1, 2, 4, 8))


def test_engine_call_pads_to_bucket_and_returns_only_its_rows():
    calls = []
    model = make_cond_model()

    def spy(x, t, c):
        calls.append(x.shape[0])
        return model(x, t, c)

    engine = TorchEngine(spy, SPEC, buckets=(1, 4, 8))
    x = torch.randn(5, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([900, 700, 500, 300, 100], dtype=torch.float32)
    c = torch.tensor([0, 1, 2, 3, 10])
    out = engine(x, t, c)
    assert calls == [8] and out.shape == (5, 2, 2, 2)
    torch.testing.assert_close(out, model(x, t, c), rtol=0, atol=1e-12)
    out.add_(1.0)  # a copy: the engine's buffer is not the caller's
    assert not torch.equal(engine.io(8).output[:5], out)


@pytest.mark.parametrize("steps,pipelined,coarse", [(25, True, "merged"), (25, False, "merged"), (30, True, "separate"),
                                                    (7, True, "merged"), (1, False, "merged"), (50, True, "separate")])
def test_runner_equals_reference_sampler(steps, pipelined, coarse):
    ts, ac = ddim_grid(SD_LIKE, steps)
    cond_model = make_cond_model()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels, null = torch.tensor([1, 2, 3]), torch.full((3,), 10)
    engine = TorchEngine(cond_model, SPEC, max_rows=128)
    runner = SRDSRunner(engine, batch=3, timesteps=ts, alphas_cumprod=ac, pipelined=pipelined, coarse=coarse,
                        state_dtype=torch.float64)
    model = classifier_free_guidance(cond_model, labels, null, 3.0)
    for tol in (0.0, 1e-3):
        got = runner.run(x, labels, null, guidance_scale=3.0, tol=tol)
        ref = srds_sample(model, x, ts, ac, tol=tol, pipelined=pipelined)
        assert (got.iterations, got.sequential_calls, got.model_evals) == (ref.iterations, ref.sequential_calls, ref.model_evals)
        torch.testing.assert_close(got.sample, ref.sample, rtol=0, atol=1e-12)
        assert got.residuals == pytest.approx(ref.residuals, rel=1e-9, abs=1e-14)
    exact = runner.run(x, labels, null, guidance_scale=3.0, tol=0.0)
    torch.testing.assert_close(exact.sample, serial_sample(model, x, ts, ac), rtol=0, atol=1e-9)


def test_runner_without_guidance_and_v_prediction():
    ts, ac = ddim_grid(SD_LIKE, 16)
    cond_model = make_cond_model(3)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    labels = torch.tensor([4, 5])
    engine = TorchEngine(cond_model, SPEC, max_rows=16)
    runner = SRDSRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac, prediction_type="v_prediction",
                        guided=False, state_dtype=torch.float64, num_blocks=4)
    got = runner.run(x, labels, tol=0.0)
    ref = serial_sample(conditional(cond_model, labels), x, ts, ac, prediction_type="v_prediction")
    torch.testing.assert_close(got.sample, ref, rtol=0, atol=1e-9)


def test_runner_max_iters_and_reuse_across_runs():
    ts, ac = ddim_grid(SD_LIKE, 36)
    cond_model = make_cond_model()
    engine = TorchEngine(cond_model, SPEC, max_rows=64)
    runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, max_iters=2, state_dtype=torch.float64)
    labels, null = torch.tensor([7]), torch.tensor([10])
    model = classifier_free_guidance(cond_model, labels, null, 2.0)
    for seed in (0, 1):  # a second run on the same runner must not see the first one's states
        x = torch.randn(1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        got = runner.run(x, labels, null, guidance_scale=2.0, tol=0.0)
        ref = srds_sample(model, x, ts, ac, tol=0.0, max_iters=2, pipelined=True)
        assert got.iterations == 2 and not got.converged
        torch.testing.assert_close(got.sample, ref.sample, rtol=0, atol=1e-12)


def test_serial_runner_equals_serial_sample():
    ts, ac = ddim_grid(SD_LIKE, 20)
    cond_model = make_cond_model()
    engine = TorchEngine(cond_model, SPEC, max_rows=8)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    labels, null = torch.tensor([1, 9]), torch.full((2,), 10)
    runner = SerialRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac, state_dtype=torch.float64)
    got = runner.run(x, labels, null, guidance_scale=4.0)
    ref = serial_sample(classifier_free_guidance(cond_model, labels, null, 4.0), x, ts, ac)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_non_finite_state_is_a_typed_error():
    ts, ac = ddim_grid(SD_LIKE, 9)

    def overflowing(x, t, c):
        return torch.where(t[:, None, None, None] < 500, torch.full_like(x, float("inf")), x)

    engine = TorchEngine(overflowing, SPEC, max_rows=16)
    runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, state_dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        runner.run(torch.ones(1, 2, 2, 2, dtype=torch.float64), torch.tensor([1]), torch.tensor([10]), guidance_scale=2.0)


def test_runner_rejects_what_the_engine_cannot_hold_and_bad_arguments():
    ts, ac = ddim_grid(SD_LIKE, 100)
    engine = TorchEngine(make_cond_model(), SPEC, max_rows=8)
    with pytest.raises(EngineError, match="state rows"):
        SRDSRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac)
    with pytest.raises(ValueError, match="coarse"):
        SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, num_blocks=2, coarse="sideways")
    runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, num_blocks=2)
    with pytest.raises(ValueError, match="shape"):
        runner.run(torch.zeros(2, 2, 2, 2), torch.tensor([1, 2]), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="tol"):
        runner.run(torch.zeros(1, 2, 2, 2), torch.tensor([1]), torch.tensor([10]), tol=-1.0)


def test_tf32_switches_belong_to_one_block_at_a_time():
    """Two engines on two threads: while one block runs with TF32 off, the other's `tf32=True` must wait, not flip
    the process-wide switches under it (they are read when kernels are launched)."""
    import threading
    import time

    from srds_trt.runtime.engines.torch_engine import tf32_allowed

    entered, seen = threading.Event(), []

    def strict():
        with tf32_allowed(False):
            entered.set()
            for _ in range(5):
                seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
                time.sleep(0.01)

    def loose():
        entered.wait(5)
        with tf32_allowed(True):
            seen.append("loose")

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    threads = [threading.Thread(target=strict), threading.Thread(target=loose)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen[:5] == [(False, False)] * 5 and seen[5] == "loose"
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == saved
