"""Real SD3 / Flux weights from a local diffusers folder: the folder's transformer, its text encoders (SD3: CLIP-L +
CLIP-G + T5; Flux: CLIP-L + T5) and VAE, run through SRDSPipeline and `generate`, equal diffusers' own
StableDiffusion3Pipeline / FluxPipeline on the same folder and the same noise (tiny folders written by
fixtures/tiny_flow.py in diffusers' layout; the real ones differ only in size)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from srds_trt import SRDSPipeline
from srds_trt.cli.generate import main
from srds_trt.models.registry import resolve_model
from srds_trt.models.transformers import pack_latents, unpack_latents
from tiny_flow import RESOLUTION, build_tiny_flux, build_tiny_sd3

STEPS = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_folders")
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_a_folder_is_described_by_its_pipeline_class(folders):
    sd3, flux = resolve_model(str(folders["sd3"])), resolve_model(str(folders["flux"]))
    assert (sd3.family, sd3.prediction_type, sd3.resolution) == ("sd3", "flow", RESOLUTION)
    assert (flux.family, flux.prediction_type, flux.resolution) == ("flux", "flow", 1024)  # FluxPipeline's default


def diffusers_sample(kind, folder, prompt, latents, **kwargs):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if kind == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
        run = lambda output_type: pipe(prompt, latents=latents, num_inference_steps=STEPS,  # noqa: E731
                                       output_type=output_type, **kwargs).images
        return run("latent"), run("np")
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    run = lambda output_type: pipe(prompt, latents=pack_latents(latents), height=RESOLUTION,  # noqa: E731
                                   width=RESOLUTION, num_inference_steps=STEPS, output_type=output_type, **kwargs).images
    return unpack_latents(run("latent"), 8, 8), run("np")


@pytest.mark.parametrize("kind, ours, theirs", [
    ("sd3", {}, {"guidance_scale": 7.0}),  # the pipelines' defaults
    ("sd3", {"guidance_scale": 4.0, "negative_prompt": "blurry"}, {"guidance_scale": 4.0, "negative_prompt": "blurry"}),
    ("flux", {}, {"guidance_scale": 3.5}),
    ("flux", {"guidance_scale": 2.0}, {"guidance_scale": 2.0}),
])
def test_serial_sample_and_image_equal_diffusers_pipeline(folders, kind, ours, theirs):
    pipe = SRDSPipeline.from_pretrained(str(folders[kind]), resolution=RESOLUTION)
    assert "T5" in pipe.text.description
    out = pipe("a cat", num_inference_steps=STEPS, latents=noise(), sampler="serial", progress_bar=False, **ours)
    latents, image = diffusers_sample(kind, folders[kind], "a cat", noise(), **theirs)
    assert float((out.samples - latents).abs().max()) <= 1e-5
    mine = np.asarray(out.images[0], dtype=np.int16)
    theirs_u8 = (np.clip(image[0], 0, 1) * 255).round().astype(np.int16)
    assert mine.shape == theirs_u8.shape and np.abs(mine - theirs_u8).max() <= 1


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_parallel_samplers_at_tol_zero_are_the_serial_sample(folders, kind):
    pipe = SRDSPipeline.from_pretrained(str(folders[kind]), resolution=RESOLUTION)
    for sampler in ("srds", "eps-picard"):
        out = pipe("a dog", num_inference_steps=STEPS, generator=3, sampler=sampler, tol=0.0, compare_serial=True,
                   progress_bar=False)
        assert out.stats["max_abs_diff_vs_serial"] <= 1e-5, sampler


def test_flux_refuses_a_negative_prompt(folders):
    pipe = SRDSPipeline.from_pretrained(str(folders["flux"]), resolution=RESOLUTION)
    with pytest.raises(ValueError, match="distilled"):
        pipe("a cat", negative_prompt="blurry", num_inference_steps=2, progress_bar=False)


def test_a_cached_flux_schnell_hub_id_loads_as_a_flux_pipeline_without_guidance_input(folders, tmp_path, monkeypatch):
    """A hub id that is no registry name, found in the HF cache, is described by its snapshot's model_index.json
    (here FLUX.1-schnell's layout: no guidance embedding): called with guidance=None and 256 T5 tokens."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell"
    snapshot = shutil.copytree(folders["flux"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    config_file = snapshot / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "guidance_embeds": False}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    pipe = SRDSPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", resolution=RESOLUTION)
    assert pipe.family == "flux" and pipe.loaded.cond_shape[0] == 256 + 1
    seen = []
    pipe.loaded.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    pipe("a cat", num_inference_steps=2, sampler="serial", progress_bar=False, generator=0)
    assert seen and all(g is None for g in seen)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_runs_a_local_folder(folders, tmp_path, capsys, kind):
    rc = main(["--model", str(folders[kind]), "--prompt", "a cat", "--steps", "4", "--resolution", str(RESOLUTION),
               "--compare-serial", "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["max_abs_diff_vs_serial"] <= 1e-2 and (tmp_path / "000.png").is_file()


def test_sd3_and_flux_default_to_their_pipelines_28_steps(folders, tmp_path):
    """Unset steps: 28 for SD3 / Flux (StableDiffusion3Pipeline's and FluxPipeline's default), 100 otherwise; the
    pipeline, generate and the server agree."""
    from srds_trt.cli.generate import build_parser, check_args
    from srds_trt.serve import BatchConfig, ServeConfig, build_app

    pipe = SRDSPipeline.from_pretrained(str(folders["sd3"]))
    assert pipe.default_steps == 28
    assert pipe("a cat", sampler="serial", progress_bar=False).stats["steps"] == 28
    args = build_parser().parse_args(["--model", str(folders["flux"]), "--out", str(tmp_path / "o")])
    check_args(args)
    assert args.steps == 28
    args = build_parser().parse_args(["--model", "digits", "--out", str(tmp_path / "o")])
    check_args(args)
    assert args.steps == 100
    app = build_app(pipe, ServeConfig(model="tiny-sd3", batch=BatchConfig()))
    assert app.state.service.config.default_steps == 28

