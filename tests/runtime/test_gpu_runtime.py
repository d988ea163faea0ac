"""GPU checks of the runtime (pytest -m gpu). Skipped, with the reason, on machines without CUDA.

They run in benchmarks/device_check.sh on a lent H100/H200; results go to benchmarks/results/.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)"),
]

SD_LIKE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               set_alpha_to_one=True, clip_sample=False, steps_offset=1)


def digits_like_engine(dtype, lanes=1, graphs=True, max_rows=64):
    from diffusers import UNet2DModel

    from srds_trt.runtime.engines import EngineSpec, TorchEngine

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11, attention_head_dim=8).eval().requires_grad_(False)
    unet = torch.nn.Module.to(unet, device="cuda", dtype=dtype)

    def cond_model(x, t, c):
        return unet(x, t, class_labels=c).sample

    spec = EngineSpec(sample_shape=(1, 16, 16), cond_shape=(), cond_dtype=torch.long, dtype=dtype)
    return TorchEngine(cond_model, spec, device="cuda", max_rows=max_rows, cuda_graphs=graphs, lanes=lanes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_replay_equals_eager(dtype):
    engine = digits_like_engine(dtype)
    x = torch.randn(6, 1, 16, 16, device="cuda", dtype=dtype)
    t = torch.linspace(999, 0, 6, device="cuda")
    c = torch.arange(6, device="cuda")
    io = engine.load(x, t, c)
    engine.enqueue(io.rows, replay=True)
    graph_out = io.output[:6].clone()
    engine.enqueue(io.rows, replay=False)
    torch.cuda.synchronize()
    assert torch.equal(graph_out, io.output[:6])


def _runs(dtype, coarse_modes, steps=64):
    from srds_trt.runtime import SerialRunner, SRDSRunner
    from srds_trt.samplers.timesteps import ddim_grid

    ts, ac = ddim_grid(SD_LIKE, steps)
    engine = digits_like_engine(dtype, lanes=2, max_rows=64)
    x = torch.randn(2, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cond, uncond = torch.tensor([3, 7], device="cuda"), torch.full((2,), 10, device="cuda")
    serial = SerialRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac).run(x, cond, uncond, guidance_scale=3.0)
    out = {}
    for coarse in coarse_modes:
        runner = SRDSRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac, coarse=coarse)
        out[coarse] = runner.run(x, cond, uncond, guidance_scale=3.0, tol=0.0)
    return serial, out


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-3), (torch.float16, 5e-2)])
def test_srds_on_gpu_equals_serial_at_tol_zero(dtype, bound, record_property):
    serial, out = _runs(dtype, ["merged"])
    err = float((out["merged"].sample - serial).abs().max())
    record_property("max_abs_err", err)
    print(f"{dtype}: SRDS(tol=0) vs serial max abs diff {err:.3g}")
    assert out["merged"].iterations == out["merged"].num_blocks
    assert err <= bound


def test_two_stream_schedule_equals_single_stream():
    _, out = _runs(torch.float32, ["merged", "separate", "overlap"])
    # serial and overlap run identical programs and differ only in the stream: bit-identical expected
    assert torch.equal(out["separate"].sample, out["overlap"].sample)
    # merged batches coarse rows into the fine call: same math, other batch composition
    assert float((out["merged"].sample - out["overlap"].sample).abs().max()) <= 1e-3


# ----- short of convergence: where graphs, streams and events can actually be wrong -----

def _short_runs(**variants):
    """One SRDSRunner per variant (kwargs), max_iters = 2 < B, same x; returns {name: (runner, result)}."""
    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.runtime import SRDSRunner

    ts, ac = ddim_grid(SD_LIKE, 64)
    engine = digits_like_engine(torch.float32, lanes=2, graphs=False, max_rows=64)
    x = torch.randn(2, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cond, uncond = torch.tensor([3, 7], device="cuda"), torch.full((2,), 10, device="cuda")
    out = {}
    for name, kwargs in variants.items():
        runner = SRDSRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac, max_iters=2, **kwargs)
        result = runner.run(x, cond, uncond, guidance_scale=3.0, tol=0.0)
        torch.cuda.synchronize()
        out[name] = (runner, result)
    return out


def _assert_same_iterates(a, b, atol):
    (ra, res_a), (rb, res_b) = a, b
    assert res_a.iterations == res_b.iterations == 2 < res_a.num_blocks
    for p in range(3):
        for bnd in range(1, res_a.num_blocks + 1):
            diff = float((ra.boundary(p, bnd) - rb.boundary(p, bnd)).abs().max())
            assert diff <= atol, f"U[{p}][{bnd}] differs by {diff}"
    assert res_a.residuals == pytest.approx(res_b.residuals, rel=0, abs=max(atol, 1e-12) * 4)


def test_graphs_equal_eager_short_of_convergence():
    runs = _short_runs(graphs=dict(cuda_graphs=True), eager=dict(cuda_graphs=False))
    assert runs["graphs"][0].capture_failures == {}
    _assert_same_iterates(runs["graphs"], runs["eager"], atol=1e-5)


def test_overlap_equals_one_stream_short_of_convergence():
    """Same programs, coarse call on a second stream: any missing event shows up as a different iterate."""
    runs = _short_runs(overlap=dict(coarse="overlap"), separate=dict(coarse="separate"))
    _assert_same_iterates(runs["overlap"], runs["separate"], atol=0.0)


def test_host_stream_and_early_exit_on_gpu():
    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.runtime import SRDSRunner

    ts, ac = ddim_grid(SD_LIKE, 64)
    engine = digits_like_engine(torch.float32, lanes=1, graphs=False, max_rows=64)
    runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, max_iters=3)
    x = torch.randn(1, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    cond, uncond = torch.tensor([5], device="cuda"), torch.tensor([10], device="cuda")
    ref = runner.run(x, cond, uncond, guidance_scale=3.0, tol=0.0).sample
    host = torch.cuda.Stream()
    for stream in (host, host.cuda_stream):  # a torch stream, then its raw handle (ExternalStream)
        with torch.cuda.stream(host):
            x_host = x.clone()  # produced on the host stream: the runner must wait for it
            got = runner.run(x_host, cond, uncond, guidance_scale=3.0, tol=0.0, stream=stream)
            out = got.sample.clone()  # ordered after the runner's final event on the host stream
        host.synchronize()
        assert torch.equal(out, ref)
    assert runner.last_run.final_tick == runner.plan.ticks_until(3) - 1


def test_capture_failure_runs_uncaptured_and_says_so():
    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.runtime import SRDSRunner
    from srds_trt.runtime.engines import EngineSpec, TorchEngine

    def syncing_model(x, t, c):
        _ = float(x.sum())  # a host sync: illegal during capture
        return 0.1 * x

    spec = EngineSpec(sample_shape=(1, 4, 4), cond_shape=(), cond_dtype=torch.long, dtype=torch.float32)
    engine = TorchEngine(syncing_model, spec, device="cuda", max_rows=16)
    ts, ac = ddim_grid(SD_LIKE, 9)
    runner = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac)
    x = torch.randn(1, 1, 4, 4, device="cuda")
    got = runner.run(x, torch.tensor([1], device="cuda"), torch.tensor([10], device="cuda"), tol=0.0)
    assert runner.capture_failures and got.iterations == got.num_blocks
    eager = SRDSRunner(engine, batch=1, timesteps=ts, alphas_cumprod=ac, cuda_graphs=False)
    ref = eager.run(x, torch.tensor([1], device="cuda"), torch.tensor([10], device="cuda"), tol=0.0)
    assert torch.equal(got.sample, ref.sample)


@pytest.mark.parametrize("sampler", ["eps-picard", "paradigms"])
def test_window_runner_graph_equals_eager_every_sweep(sampler, record_property):
    """The sliding-window runner (runtime/window_runner.py): ONE captured sweep program equals the same sweep
    run eagerly at every max_iters short of convergence (sample, residuals, slides), tail of the grid included
    (N = 63, not a multiple of the window); one host read per sweep, measured; tol = 0 gives the serial sample."""
    import time

    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.runtime import SerialRunner
    from srds_trt.runtime.window.runner import WindowRunner

    ts, ac = ddim_grid(SD_LIKE, 63)
    engine = digits_like_engine(torch.float32, graphs=False, max_rows=64)
    x = torch.randn(2, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cond, uncond = torch.tensor([3, 7], device="cuda"), torch.full((2,), 10, device="cuda")
    build = lambda graphs: WindowRunner(engine, sampler=sampler, batch=2, timesteps=ts, alphas_cumprod=ac,  # noqa: E731
                                        guided=True, cuda_graphs=graphs)
    graph, eager = build(True), build(False)
    graph.capture()
    assert graph.sweep_program.captured and not graph.capture_failures, graph.capture_failures
    tol = 1e-3 if sampler == "eps-picard" else 0.05
    full = eager.run(x, cond, uncond, guidance_scale=3.0, tol=tol)
    for k in sorted({1, 2, 3, full.iterations // 2, full.iterations}):
        a = graph.run(x, cond, uncond, guidance_scale=3.0, tol=tol, max_iters=k)
        b = eager.run(x, cond, uncond, guidance_scale=3.0, tol=tol, max_iters=k)
        assert a.slides == b.slides and a.iterations == b.iterations == k
        # eager and captured kernels may differ in the last bits (as for SRDS: test_graphs_equal_eager_...)
        torch.testing.assert_close(a.sample, b.sample, rtol=0, atol=1e-5, msg=lambda m, k=k: f"sweep {k}: {m}")
        torch.testing.assert_close(torch.tensor(a.residuals), torch.tensor(b.residuals), rtol=0, atol=1e-5)
        assert graph.last_run.host_reads == k  # ONE host read per sweep
    torch.cuda.synchronize()
    start = time.perf_counter()
    got = graph.run(x, cond, uncond, guidance_scale=3.0, tol=0.0)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    serial = SerialRunner(engine, batch=2, timesteps=ts, alphas_cumprod=ac).run(x, cond, uncond, guidance_scale=3.0)
    err = float((got.sample - serial).abs().max())
    stats = graph.last_run
    record_property("host_read_ms_per_sweep", stats.host_read_ms_per_sweep)
    print(f"{sampler} tol=0: {got.iterations} sweeps, {wall * 1e3:.1f} ms, host reads {stats.host_reads} "
          f"({stats.host_read_ms_per_sweep:.3f} ms each), vs serial {err:.3g}")
    assert stats.host_reads == got.iterations and got.converged
    assert err <= 1e-3


def test_window_runner_on_a_host_stream():
    """The window runner ordered on a host's stream (a torch stream, then its raw handle): same sample as the
    current stream, and the input produced on that stream is waited for."""
    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.runtime.window.runner import WindowRunner

    ts, ac = ddim_grid(SD_LIKE, 30)
    engine = digits_like_engine(torch.float32, graphs=False, max_rows=64)
    runner = WindowRunner(engine, sampler="eps-picard", batch=2, timesteps=ts, alphas_cumprod=ac, guided=True)
    x = torch.randn(2, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    cond, uncond = torch.tensor([3, 7], device="cuda"), torch.full((2,), 10, device="cuda")
    ref = runner.run(x, cond, uncond, guidance_scale=3.0, tol=1e-3)
    host = torch.cuda.Stream()
    for stream in (host, host.cuda_stream):
        with torch.cuda.stream(host):
            x_host = x.clone()
            got = runner.run(x_host, cond, uncond, guidance_scale=3.0, tol=1e-3, stream=stream)
            out = got.sample.clone()
        host.synchronize()
        torch.testing.assert_close(out, ref.sample, rtol=0, atol=1e-6)
        assert got.slides == ref.slides
        assert runner.last_run.host_reads == got.iterations


def test_fused_chains_equal_the_torch_loops_every_sweep(record_property):
    """eps-Picard's two sequential chains as Triton kernels (runtime/fused.py) equal the runner's torch loops
    (the first sweeps: same slides, states to fp32 rounding; converged: the same sample to 1e-3), captured in the
    sweep's CUDA graph; prints both sweep times at w = 64 (digits shapes, N = 1024, one guided image)."""
    import time

    from srds_trt.samplers.timesteps import ddim_grid
    from srds_trt.runtime.window import fused
    from srds_trt.runtime.window.runner import WindowRunner

    if not fused.available(torch.device("cuda"), torch.float32):
        pytest.skip("Triton is not importable here")
    engine = digits_like_engine(torch.float32, graphs=False, max_rows=128)
    x = torch.randn(1, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cond, uncond = torch.tensor([3], device="cuda"), torch.full((1,), 10, device="cuda")
    for steps in (63, 1024):
        ts, ac = ddim_grid(SD_LIKE, steps)
        build = lambda f: WindowRunner(engine, sampler="eps-picard", batch=1, timesteps=ts,  # noqa: E731
                                       alphas_cumprod=ac, guided=True, fused_chains=f)
        fast, loops = build(True), build(False)
        fast.capture()
        assert fast.fused and fast.sweep_program.captured and not fast.capture_failures, fast.capture_failures
        # the first sweeps from the same states: the same slides, states to fp32 rounding. Later a point whose
        # change lands within rounding of tol may slide in one and not the other (seen on an H100 at sweep 5 of
        # N = 63: slides 5, 12 vs 6, 11), so the converged runs are compared by their results
        for k in (1, 2, 3):
            a = fast.run(x, cond, uncond, guidance_scale=3.0, tol=1e-4, max_iters=k)
            b = loops.run(x, cond, uncond, guidance_scale=3.0, tol=1e-4, max_iters=k)
            assert a.slides == b.slides and a.iterations == b.iterations == k
            torch.testing.assert_close(a.sample, b.sample, rtol=0, atol=1e-4, msg=lambda m, k=k: f"sweep {k}: {m}")
        a = fast.run(x, cond, uncond, guidance_scale=3.0, tol=1e-4)
        b = loops.run(x, cond, uncond, guidance_scale=3.0, tol=1e-4)
        assert a.converged and b.converged and abs(a.iterations - b.iterations) <= 3
        torch.testing.assert_close(a.sample, b.sample, rtol=0, atol=1e-3)
        times = {}
        for name, runner in (("fused", fast), ("loops", loops)):
            runner.run(x, cond, uncond, guidance_scale=3.0, tol=1e-4)
            torch.cuda.synchronize()
            start = time.perf_counter()
            got = runner.run(x, cond, uncond, guidance_scale=3.0, tol=1e-4)
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - start) * 1e3 / got.iterations
        record_property(f"sweep_ms_N{steps}", times)
        print(f"eps-Picard N={steps} w={fast.window}: {got.iterations} sweeps, ms per sweep fused "
              f"{times['fused']:.3f} vs torch loops {times['loops']:.3f}")
