"""SRDSPipeline end to end: the SD path on a tiny locally built SD pipeline, and the digits path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srds_trt import SRDSPipeline
from srds_trt.samplers.plan import default_num_blocks
from tiny_sd import RESOLUTION, build_tiny_sd



@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def tiny_sd32(tiny_sd_folder):
    return SRDSPipeline.from_pretrained(str(tiny_sd_folder))


@pytest.fixture(scope="module")
def digits():
    return SRDSPipeline.from_pretrained("digits")


@pytest.mark.slow
def test_sd_path_end_to_end(tiny_sd32):
    out = tiny_sd32(["a red cat", "dog"], num_inference_steps=9, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                    num_images_per_prompt=2, progress_bar=False)
    assert len(out.images) == 4 and all(im.size == (RESOLUTION, RESOLUTION) and im.mode == "RGB" for im in out.images)
    assert out.samples.shape == (4, 4, RESOLUTION // 2, RESOLUTION // 2) and torch.isfinite(out.samples).all()
    assert out.stats["cfg_rows_per_image"] == 2 and out.stats["blocks"] == default_num_blocks(9)
    assert out.stats["prompts"] == ["a red cat", "a red cat", "dog", "dog"]


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_sd_srds_at_tol_zero_is_the_serial_sample(tiny_sd_folder, tiny_sd32, dtype, bound):
    """Bounds are relative to the sample's magnitude: an untrained UNet under CFG 7.5 drives these latents to
    ~35, where one float32 ulp is 4e-6 and batch-size-dependent GEMM rounding leaves ~10 ulp."""
    pipe = tiny_sd32 if dtype == torch.float32 else SRDSPipeline.from_pretrained(str(tiny_sd_folder), dtype=dtype)
    out = pipe("a cat", num_inference_steps=10, guidance_scale=7.5, tol=0.0, compare_serial=True, progress_bar=False)
    assert out.stats["iterations"] == out.stats["blocks"] and out.stats["converged"]
    serial = pipe("a cat", num_inference_steps=10, guidance_scale=7.5, sampler="serial", progress_bar=False)
    scale = max(1.0, float(serial.samples.abs().max()))
    assert out.stats["max_abs_diff_vs_serial"] <= bound * scale
    assert (out.samples.double() - serial.samples.double()).abs().max() <= bound * scale


def test_sd_random_weights_path(tiny_sd_folder):
    pipe = SRDSPipeline.from_pretrained(str(tiny_sd_folder), random_weights=True, seed=5)
    out = pipe("x", num_inference_steps=4, progress_bar=False)
    assert out.stats["weights_id"].startswith("random-seed-5-")
    assert out.images[0].size == (RESOLUTION, RESOLUTION) and torch.isfinite(out.samples).all()


def test_digits_call_shapes_and_stats(digits):
    out = digits([3, "7"], num_inference_steps=16, generator=torch.Generator().manual_seed(0), progress_bar=False,
                 compare_serial=True)
    assert [im.size for im in out.images] == [(16, 16)] * 2 and out.images[0].mode == "L"
    assert out.samples.shape == (2, 1, 16, 16)
    stats = out.stats
    assert stats["prompts"] == ["3", "7"] and stats["guidance_scale"] == digits.default_guidance_scale
    assert stats["blocks"] == default_num_blocks(16) and 1 <= stats["iterations"] <= stats["blocks"]
    assert stats["sequential_calls"] <= 2 * 4 * stats["iterations"] + 4 and stats["max_abs_diff_vs_serial"] >= 0
    assert digits(None, num_inference_steps=2, progress_bar=False).stats["prompts"] == [str(d) for d in range(10)]


@pytest.mark.slow
def test_same_seed_same_images_and_default_generator(digits):
    kwargs = dict(num_inference_steps=8, progress_bar=False)
    a = digits("5", generator=torch.Generator().manual_seed(11), **kwargs)
    b = digits("5", generator=11, **kwargs)
    c = digits("5", generator=12, **kwargs)
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert torch.equal(digits("5", **kwargs).samples, digits("5", generator=0, **kwargs).samples)


@pytest.mark.slow
def test_two_pipelines_do_not_interfere(digits, tiny_sd32):
    kwargs = dict(num_inference_steps=6, progress_bar=False, generator=1)
    alone_digits = digits("2", **kwargs).samples
    alone_sd = tiny_sd32("cat", **kwargs).samples
    other_digits = SRDSPipeline.from_pretrained("digits", random_weights=True, seed=9)
    assert not torch.equal(other_digits("2", **kwargs).samples, alone_digits)
    assert torch.equal(tiny_sd32("cat", **kwargs).samples, alone_sd)
    assert torch.equal(digits("2", **kwargs).samples, alone_digits)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="a"), "digits 0..9"), (dict(prompt=["1", "12"]), "digits 0..9"),
    (dict(num_inference_steps=0), "steps"), (dict(tol=-1.0), "tol"), (dict(num_blocks=9, num_inference_steps=8), "blocks"),
    (dict(sampler="euler"), "sampler"), (dict(num_images_per_prompt=0), "num_images")])
def test_bad_arguments_are_refused(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits(**{"prompt": "1", **kwargs}, progress_bar=False)


@pytest.mark.slow
def test_pipelined_gives_the_same_sample_in_fewer_sequential_calls(digits):
    kwargs = dict(num_inference_steps=16, num_blocks=4, progress_bar=False, tol=0.0)
    plain, pipelined = digits(["4", "9"], pipelined=False, **kwargs), digits(["4", "9"], **kwargs)  # pipelined: default
    assert (plain.samples - pipelined.samples).abs().max() <= 1e-5
    assert pipelined.stats["sequential_calls"] < plain.stats["sequential_calls"] and pipelined.stats["pipelined"]


def test_half_precision_unet_under_float32_sampler_states(tiny_sd_folder):
    """The samplers keep float32 states; the model wrapper casts to the UNet's dtype and back."""
    pipe = SRDSPipeline.from_pretrained(str(tiny_sd_folder), dtype=torch.bfloat16)
    out = pipe("a cat", num_inference_steps=4, progress_bar=False)
    assert out.stats["dtype"] == "bfloat16" and torch.isfinite(out.samples.float()).all()


class _CountingModel:
    """Wraps a pipeline's conditional model; counts its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return self.model(x, t, cond)


@pytest.mark.parametrize("sampler, unit", [("srds", "iter"), ("eps-picard", "sweep"), ("paradigms", "sweep"),
                                           ("serial", "serial step")])
def test_cancel_stops_at_the_next_boundary(digits, monkeypatch, sampler, unit):
    """cancel() is polled at every iteration / sweep / serial step: the call raises Cancelled at the boundary after
    the one where it first returned True, and makes no model call after it."""
    from srds_trt import Cancelled

    counting = _CountingModel(digits.cond_model)
    monkeypatch.setattr(digits, "cond_model", counting)
    polls = []

    def cancel():
        polls.append(counting.calls)
        return len(polls) >= 2

    with pytest.raises(Cancelled, match=unit):
        digits("3", num_inference_steps=16, sampler=sampler, tol=0.0, progress_bar=False, cancel=cancel)
    assert len(polls) == 2 and counting.calls == polls[-1]  # nothing ran after the boundary that cancelled


def test_convergence_report_on_every_output(digits):
    """out.report (and stats["report"]): what ran, how far from serial it is estimated to be, against which tol."""
    srds = digits("3", num_inference_steps=16, tol=1e-3, progress_bar=False)
    r = srds.report
    assert (r.sampler, r.iteration_unit, r.iterations) == ("srds", "iterations", srds.stats["iterations"])
    assert r.sequential_calls == srds.stats["sequential_calls"] and r.tol == r.tol_used == 1e-3 and r.noise_floor is None
    assert r.converged and not r.cut and r.estimated_error <= r.tol and r.residual == srds.stats["residuals"][-1]
    assert srds.stats["report"] == r.as_dict() and srds.stats["warnings"] == []
    cut = digits("3", num_inference_steps=16, tol=0.0, max_iters=2, progress_bar=False)
    assert cut.report.cut and not cut.report.converged and cut.report.iterations == 2
    assert any("iteration limit" in w for w in cut.stats["warnings"])
    window = digits("3", num_inference_steps=16, sampler="eps-picard", progress_bar=False).report
    assert window.iteration_unit == "sweeps" and window.iterations >= 1
    serial = digits("3", num_inference_steps=16, sampler="serial", progress_bar=False).report
    assert (serial.iterations, serial.iteration_unit, serial.sequential_calls, serial.estimated_error) == (None, None, 16, None)


def test_chunks_give_the_images_one_chunk_gives(digits):
    """Noise drawn chunk by chunk from one generator equals one draw for every image, so max_rows (how many images
    a chunk holds) changes no pixel; iter_chunks streams the same images __call__ returns."""
    common = dict(num_inference_steps=8, sampler="serial", num_images_per_prompt=3, progress_bar=False, generator=7)
    whole = digits(["1", "2"], **common)
    chunked = digits(["1", "2"], max_rows=4, **common)  # 2 images (x2 guidance rows) per chunk: 3 chunks
    assert chunked.stats["chunks"] == 3 and whole.stats["chunks"] == 1
    assert torch.equal(whole.samples, chunked.samples)
    streamed = list(digits.iter_chunks(["1", "2"], max_rows=4, **common))
    assert [c.start for c in streamed] == [0, 2, 4] and torch.equal(torch.cat([c.samples for c in streamed]), whole.samples)
