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
    from srds_trt.noise_schedule import ddim_grid

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
