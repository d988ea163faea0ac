"""Embedding the runtime in a host service, on CPU: stream objects, DLPack tensors, two runners on two threads,
the capture fallback, and the property that every plan's widest tick fits the rows the runner reserves.

The CUDA side of the same API (ExternalStream ordering, graphs) is in test_gpu_runtime.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers_core import single_thread  # noqa: F401  (fixture)
from srds_trt.samplers.guidance import classifier_free_guidance
from srds_trt.samplers.timesteps import ddim_grid
from srds_trt.runtime import EngineError, SerialRunner, SRDSRunner
from srds_trt.runtime.cuda_graphs import capture_graph
from srds_trt.runtime.engines import EngineSpec, TorchEngine
from srds_trt.runtime.host import as_tensor, host_stream, stream_handle
from srds_trt.runtime.srds.tables import build_tick_tables, tick_rows, widest_call
from srds_trt.samplers import serial_sample, srds_sample
from srds_trt.samplers.plan import build_tick_plan

pytestmark = pytest.mark.usefixtures("single_thread")

SD_LIKE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               set_alpha_to_one=True, clip_sample=False, steps_offset=1)
SPEC = EngineSpec(sample_shape=(2, 2, 2), cond_shape=(), cond_dtype=torch.long, dtype=torch.float64)


def make_model(seed):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(9, 16, generator=gen, dtype=torch.float64) / 2
    w2 = torch.randn(16, 8, generator=gen, dtype=torch.float64) / 4
    emb = torch.randn(11, 8, generator=gen, dtype=torch.float64) / 3

    def cond_model(x, t, c):
        h = torch.cat([x.flatten(1).double(), (t.double() / 1000)[:, None]], 1)
        return (torch.tanh(h @ w1) @ w2 + emb[c.long()] + 0.4 * x.flatten(1)).view_as(x).to(x.dtype)

    return cond_model


class ProtocolStream:
    """What cuda.core / CuPy / Numba streams expose: the CUDA stream protocol."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


class TorchLikeStream:
    cuda_stream = 1234


def test_stream_objects_a_host_may_hand_over():
    assert stream_handle(0) == 0 and stream_handle(77) == 77
    assert stream_handle(ProtocolStream(0xBEEF)) == 0xBEEF
    assert stream_handle(TorchLikeStream()) == 1234
    for bad, error in ((True, TypeError), (-1, ValueError), ("stream", TypeError), (object(), TypeError)):
        with pytest.raises(error):
            stream_handle(bad)

    class BadProtocol:
        def __cuda_stream__(self):
            return 5

    with pytest.raises(TypeError, match="version, handle"):
        stream_handle(BadProtocol())
    cpu = torch.device("cpu")
    assert host_stream(None, cpu) is None and host_stream(ProtocolStream(3), cpu) is None  # checked, then unused
    with pytest.raises(TypeError):
        host_stream("nope", cpu)


def test_dlpack_inputs_are_views_not_copies():
    array = np.arange(8, dtype=np.float64).reshape(1, 2, 2, 2)
    view = as_tensor(array, "x")
    array[0, 0, 0, 0] = 42.0
    assert view[0, 0, 0, 0].item() == 42.0  # the same memory
    with pytest.raises(TypeError, match="DLPack"):
        as_tensor([1.0, 2.0], "x")


def test_run_takes_a_host_stream_and_dlpack_tensors_and_writes_into_the_hosts_buffer():
    ts, ac = ddim_grid(SD_LIKE, 12)
    model = make_model(0)
    x = np.random.default_rng(0).standard_normal((2, 2, 2, 2))
    labels, null = np.array([3, 4]), np.array([10, 10])
    engine = TorchEngine(model, SPEC, max_rows=32)
    runner = SRDSRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac, max_iters=2, state_dtype=torch.float64)
    out = np.zeros((2, 2, 2, 2))
    got = runner.run(x, labels, null, guidance_scale=2.0, tol=0.0, stream=ProtocolStream(0), out=out)
    guided = classifier_free_guidance(model, torch.from_numpy(labels), torch.from_numpy(null), 2.0)
    ref = srds_sample(guided, torch.from_numpy(x), ts, ac, tol=0.0, max_iters=2, pipelined=True)
    torch.testing.assert_close(torch.from_numpy(out), ref.sample, rtol=0, atol=1e-12)  # written in place
    assert got.sample.data_ptr() == torch.from_numpy(out).data_ptr()
    serial = SerialRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac, state_dtype=torch.float64)
    torch.testing.assert_close(serial.run(x, labels, null, guidance_scale=2.0, stream=7),
                               serial_sample(guided, torch.from_numpy(x), ts, ac), rtol=0, atol=1e-12)


def test_two_runners_on_two_threads_do_not_interfere():
    ts, ac = ddim_grid(SD_LIKE, 16)
    runners, inputs, expected = [], [], []
    for k in range(2):
        engine = TorchEngine(make_model(k), SPEC, max_rows=32)
        runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, max_iters=2, coarse=("merged", "separate")[k],
                            state_dtype=torch.float64)
        x = torch.randn(1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        runners.append(runner)
        inputs.append(x)
        expected.append(runner.run(x, torch.tensor([k]), torch.tensor([10]), guidance_scale=3.0, tol=0.0).sample)
    results: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def work(k):
        barrier.wait()
        for _ in range(4):
            results[k].append(runners[k].run(inputs[k], torch.tensor([k]), torch.tensor([10]), guidance_scale=3.0, tol=0.0))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.equal(expected[0], expected[1])
    for k in range(2):
        assert len(results[k]) == 4
        for res in results[k]:
            torch.testing.assert_close(res.sample, expected[k], rtol=0, atol=0)


def test_capture_helper_runs_eagerly_where_it_cannot_capture():
    calls = []
    captured = capture_graph(lambda: calls.append(1), device="cpu")
    assert not captured.captured and captured.failure is None and captured.pool is None
    captured.run()
    assert calls == [1]
    engine = TorchEngine(make_model(0), SPEC, max_rows=8)
    ts, ac = ddim_grid(SD_LIKE, 4)
    runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac)
    runner.capture()
    assert runner.capture_failures == {} and not any(p.captured.captured for p in runner.programs)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 160), blocks=st.integers(1, 16), images=st.integers(1, 3), guided=st.booleans(),
       pipelined=st.booleans(), split=st.booleans())
def test_widest_tick_of_every_plan_fits_the_rows_the_runner_reserves(steps, blocks, images, guided, pipelined, split):
    """Every tick's call fits its program's capacity, and a runner builds exactly when the widest tick fits."""
    blocks = min(blocks, steps)
    plan = build_tick_plan(steps, blocks, None, pipelined)
    kinds = ("fine", "coarse") if split else ("all",)
    # the plan's own widest call, counted from its ticks (not from the runtime's helper)
    widest = max(len(tick_rows(plan, _slots(plan), i, kind).inputs) for i in range(len(plan.ticks)) for kind in kinds)
    assert widest_call(plan, split) == widest
    factor = 2 if guided else 1
    need = widest * images * factor
    ts, ac = ddim_grid(SD_LIKE, steps)
    caps = tuple(sorted({1, 2, 3, 5, 8, 13, 21, 34, 55, widest * images}))
    tables = build_tick_tables(plan, batch=images, caps=caps, timesteps=ts, alphas_cumprod=ac,
                               prediction_type="epsilon", split=split, state_dtype=torch.float32,
                               timestep_dtype=torch.float32)
    for i, step in enumerate(tables.schedule):
        for kind in kinds:
            rows = len(tick_rows(plan, tables.slots, i, kind).inputs) * images
            if rows:
                assert tables.programs[step[kind]].cap >= rows
                assert i in tables.programs[step[kind]].ticks
    coarse = "separate" if split else "merged"
    fits = TorchEngine(make_model(0), SPEC, buckets=(need,))
    SRDSRunner(fits, batch=images, timesteps=ts, alphas_cumprod=ac, num_blocks=blocks, pipelined=pipelined,
               guided=guided, coarse=coarse)
    if need > factor:
        too_small = TorchEngine(make_model(0), SPEC, buckets=(need - factor,))
        with pytest.raises(EngineError, match="state rows"):
            SRDSRunner(too_small, batch=images, timesteps=ts, alphas_cumprod=ac, num_blocks=blocks,
                       pipelined=pipelined, guided=guided, coarse=coarse)


def _slots(plan):
    from srds_trt.runtime.srds.tables import slot_map

    return slot_map(plan)
