"""SD3- and Flux-shaped transformers through SRDSPipeline (tiny configs, random weights): SRDS at tol = 0 is the
serial flow sample, SD3's guidance doubles the rows of one call, Flux-dev's distilled guidance is one call carrying
the scale; the real-size configs are the public parameter counts (built on the meta device, no memory)."""

from __future__ import annotations

import pytest
import torch

from srds_trt import SRDSPipeline
from srds_trt.models.text import random_text_stack
from srds_trt.models.transformers import TINY_CONFIGS, build_transformer, load_transformer, transformer_config


def tiny_pipeline(kind: str) -> SRDSPipeline:
    loaded = load_transformer(kind, tiny=True, seed=1)
    return SRDSPipeline(loaded, text=random_text_stack(loaded, 0, vae_config=TINY_CONFIGS[kind]["vae"]))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_srds_at_tol_zero_is_the_serial_sample_and_guidance_is_one_call(kind):
    pipe = tiny_pipeline(kind)
    seen = []
    hook = pipe.loaded.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[0], kw.get("guidance"))), with_kwargs=True)
    try:
        out = pipe("a cat", num_inference_steps=8, tol=0.0, compare_serial=True, progress_bar=False, generator=0)
    finally:
        hook.remove()
    assert out.stats["max_abs_diff_vs_serial"] <= 1e-5
    assert out.images[0].size == (64, 64)
    rows = {r for r, _ in seen}
    if kind == "sd3":  # classifier-free: the rows of every call doubled, scale 7
        assert out.stats["cfg_rows_per_image"] == 2 and all(r % 2 == 0 for r in rows)
        assert all(g is None for _, g in seen)
    else:  # distilled: one undoubled call, the guidance embedding's input is the scale
        assert out.stats["cfg_rows_per_image"] == 1 and 1 in rows
        assert all(torch.equal(g, torch.full_like(g, 3.5)) for _, g in seen)


def test_a_registry_model_without_weights_points_at_random_weights():
    from srds_trt.models.registry import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="random-weights"):  # no HF cache here: the hint names the flag
        SRDSPipeline.from_pretrained("sd3")


@pytest.mark.parametrize("kind, params", [("sd3", 2.03e9), ("flux", 11.9e9)])
def test_embedded_configs_have_the_public_parameter_counts(kind, params):
    with torch.device("meta"):
        model = build_transformer(transformer_config(kind))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.02, count
