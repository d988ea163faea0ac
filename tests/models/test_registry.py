"""The model registry: names, local folders, offline SD errors and random-weight architectures."""

from __future__ import annotations

import json

import pytest
import torch

from srds_trt.models import (KNOWN_MODELS, LoadedUNet, UnknownModelError, WeightsUnavailableError, load_unet,
                             resolve_model, unet_model_fn)
from srds_trt.models.loading import random_weights_config
from tiny_sd import TEXT_DIM, TEXT_LENGTH, build_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def tiny_pixel_folder(tmp_path_factory):
    """A bare UNet2DModel folder, the layout of the embedded digits model."""
    from diffusers import DDIMScheduler, UNet2DModel

    folder = tmp_path_factory.mktemp("pixel")
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                num_class_embeds=4).save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(dict(DDIMScheduler(prediction_type="v_prediction").config)))
    return folder


def test_known_models():
    assert list(KNOWN_MODELS) == ["digits", "digits-flow", "sd2", "sd2.1", "sd1.5", "sd3", "flux"]
    assert (KNOWN_MODELS["digits"].family, KNOWN_MODELS["digits"].resolution) == ("digits", 16)
    assert KNOWN_MODELS["sd2"].source == "stabilityai/stable-diffusion-2-1-base"
    assert (KNOWN_MODELS["sd2"].resolution, KNOWN_MODELS["sd2"].prediction_type) == (512, "epsilon")
    assert (KNOWN_MODELS["sd2.1"].resolution, KNOWN_MODELS["sd2.1"].prediction_type) == (768, "v_prediction")
    assert KNOWN_MODELS["sd1.5"].resolution == 512
    assert resolve_model("sd2") is KNOWN_MODELS["sd2"]


@pytest.mark.parametrize("name", ["nope", "./missing/folder", "/no/such/dir"])
def test_unknown_model_lists_known_names(name):
    with pytest.raises(UnknownModelError) as info:
        resolve_model(name)
    assert all(known in str(info.value) for known in KNOWN_MODELS)
    assert isinstance(info.value, ValueError)


def test_hub_id_resolves_cheaply_and_fails_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = resolve_model("someone/some-model")
    assert (spec.family, spec.source) == ("sd", "someone/some-model")
    with pytest.raises(WeightsUnavailableError, match="huggingface-cli download someone/some-model"):
        load_unet("someone/some-model")


def test_sd2_offline_says_how_to_get_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        load_unet("sd2")
    message = str(info.value)
    assert "huggingface-cli download stabilityai/stable-diffusion-2-1-base" in message
    assert "--random-weights" in message


@pytest.mark.parametrize("name, params, cross_dim, latent", [
    ("sd2", 865_910_724, 1024, 64), ("sd2.1", 865_910_724, 1024, 96), ("sd1.5", 859_520_964, 768, 64)])
def test_random_weight_configs_are_the_real_architectures(name, params, cross_dim, latent):
    from diffusers import UNet2DConditionModel

    configs = random_weights_config(KNOWN_MODELS[name])
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
    assert sum(p.numel() for p in unet.parameters()) == params
    assert unet.config.cross_attention_dim == cross_dim and unet.config.sample_size == latent
    assert configs["scheduler"]["prediction_type"] == KNOWN_MODELS[name].prediction_type
    assert configs["scheduler"]["set_alpha_to_one"] is True


def test_local_pixel_folder(tiny_pixel_folder):
    spec = resolve_model(str(tiny_pixel_folder))
    assert (spec.family, spec.resolution, spec.prediction_type) == ("digits", 8, "v_prediction")
    loaded = load_unet(str(tiny_pixel_folder))
    assert isinstance(loaded, LoadedUNet)
    assert (loaded.conditioning, loaded.sample_shape, loaded.cond_shape, loaded.null_class) == ("class", (1, 8, 8), (), 3)
    assert loaded.scheduler_config["set_alpha_to_one"] is True and not loaded.unet.training
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert len(loaded.weights_id) == 64 and loaded.weights_id == load_unet(str(tiny_pixel_folder)).weights_id
    out = unet_model_fn(loaded)(torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 1]), torch.tensor([0, 3, 1]))
    assert out.shape == (3, 1, 8, 8)


def test_random_weights_are_seeded_and_leave_global_rng_alone(tiny_pixel_folder):
    state = torch.random.get_rng_state()
    a = load_unet(str(tiny_pixel_folder), random_weights=True, seed=1)
    b = load_unet(str(tiny_pixel_folder), random_weights=True, seed=1)
    c = load_unet(str(tiny_pixel_folder), random_weights=True, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.unet.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.weights_id.startswith("random-seed-1-") and a.weights_id == b.weights_id != c.weights_id


def test_local_sd_folder(tiny_sd_folder):
    spec = resolve_model(str(tiny_sd_folder))
    assert (spec.family, spec.resolution, spec.prediction_type) == ("sd", 32, "epsilon")
    loaded = load_unet(str(tiny_sd_folder), dtype=torch.float64)
    assert (loaded.conditioning, loaded.sample_shape, loaded.cond_shape) == ("text", (4, 16, 16), (TEXT_LENGTH, TEXT_DIM))
    assert loaded.vae_scaling_factor == pytest.approx(0.18215) and loaded.null_class is None
    assert loaded.scheduler_config["set_alpha_to_one"] is True  # the folder's own config says False
    assert loaded.unet.dtype == torch.float64
    out = unet_model_fn(loaded)(torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.tensor([900, 10]),
                                torch.randn(2, TEXT_LENGTH, TEXT_DIM, dtype=torch.float64))
    assert out.shape == (2, 4, 16, 16)
    assert load_unet(str(tiny_sd_folder), resolution=64).sample_shape == (4, 32, 32)


def test_embedded_digits_model():
    loaded = load_unet("digits")
    assert (loaded.conditioning, loaded.sample_shape, loaded.null_class) == ("class", (1, 16, 16), 10)
    config = loaded.scheduler_config
    assert (config["prediction_type"], config["timestep_spacing"], config["set_alpha_to_one"],
            config["clip_sample"]) == ("epsilon", "leading", True, False)
    assert sum(p.numel() for p in loaded.unet.parameters()) < 2_000_000
