"""SRDSPipeline: a diffusers-shaped façade over the registry, guidance and the samplers.

    pipe = SRDSPipeline.from_pretrained("digits")
    out = pipe(["3", "7"], num_inference_steps=100, generator=torch.Generator().manual_seed(0))
    out.images, out.stats

Everything a call needs lives on the pipeline instance or in the call, so two pipelines in one process never
interfere. Noise is drawn on the generator's device (CPU by default) and then moved, so a seed gives the same
images on every device. `generator=None` means seed 0: reproducible by default, unlike diffusers.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .guidance import classifier_free_guidance
from .images import to_pil
from .models import LoadedUNet, load_unet, unet_model_fn
from .models.loading import random_weights_config, sd_folder, seeded_init
from .models.registry import read_json
from .noise_schedule import ddim_grid
from .sampling import DEFAULT_TOL, serial_sample, srds_sample
from .schedule import default_num_blocks

SAMPLERS = ("srds", "serial")
DIGIT_PROMPTS = tuple(str(d) for d in range(10))
DEFAULT_STEPS = 100  # 10 blocks of 10 steps: enough fine work per block for SRDS's parallelism to show
DEFAULT_GUIDANCE = {"digits": 4.0, "sd": 7.5}


@dataclass
class SRDSPipelineOutput:
    images: list  # PIL images, one per generated sample
    stats: dict[str, Any]
    samples: Tensor = field(repr=False)  # the sampler's output on CPU: pixels in [-1, 1] (digits) or SD latents


@dataclass
class TextStack:
    """How an SD pipeline turns prompts into encoder_hidden_states and latents into pixels."""

    encode: Callable[[list[str]], Tensor]  # prompts -> [n, L, D]
    decode: Callable[[Tensor], Tensor]  # latents -> pixels in [-1, 1]
    description: str


class SRDSPipeline:
    def __init__(self, loaded: LoadedUNet, *, text: TextStack | None = None, default_guidance_scale: float | None = None,
                 backend: str = "torch", engine_dir: str | Path | None = None):
        if loaded.conditioning == "text" and text is None:
            raise ValueError("a text-conditioned UNet needs a TextStack (text encoder and VAE)")
        self.loaded = loaded
        self.text = text
        self.cond_model = unet_model_fn(loaded)
        self.default_guidance_scale = default_guidance_scale or DEFAULT_GUIDANCE[loaded.spec.family]
        param = next(loaded.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.backend = backend
        # torch on a CPU keeps the pure reference sampler (the runtime gives the same samples there, tested);
        # everything else samples through the runtime: static buffers, per-bucket programs, CUDA graphs.
        self.runtime = None
        if backend != "torch" or self.device.type == "cuda":
            from .runtime.sampler import RuntimeSampler

            self.runtime = RuntimeSampler(backend, loaded, device=self.device, dtype=self.dtype, engine_dir=engine_dir)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "digits", *, device="cpu", dtype=torch.float32,
                        random_weights: bool = False, seed: int = 0, resolution: int | None = None,
                        backend: str = "torch", engine_dir: str | Path | None = None) -> "SRDSPipeline":
        """Load a registry model, local diffusers folder or cached hub id (see srds_trt.models).

        backend: "torch" (the PyTorch UNet; on a GPU through the CUDA-graph runtime), "onnxruntime" (the exported
        ONNX, CPU) or "tensorrt" (the exported plan, GPU); engine_dir holds `python -m srds_trt.export` output.
        """
        loaded = load_unet(name_or_path, device=device, dtype=dtype, random_weights=random_weights, seed=seed,
                           resolution=resolution)
        options = dict(backend=backend, engine_dir=engine_dir)
        if loaded.spec.family == "digits":
            meta_file = Path(loaded.spec.source) / "digits_meta.json"
            scale = read_json(meta_file).get("default_guidance_scale") if meta_file.is_file() else None
            return cls(loaded, default_guidance_scale=scale, **options)
        text = _random_text_stack(loaded, seed) if random_weights else _text_stack(loaded)
        return cls(loaded, text=text, **options)

    @property
    def family(self) -> str:
        return self.loaded.spec.family

    def check_prompts(self, prompt: str | int | Sequence[str | int] | None) -> list[str]:
        """The prompts as a list of strings; digits accepts "0".."9" (or ints) and defaults to all ten."""
        if prompt is None:
            prompts = list(DIGIT_PROMPTS) if self.family == "digits" else [""]
        elif isinstance(prompt, (str, int)):
            prompts = [str(prompt)]
        else:
            prompts = [str(p) for p in prompt]
        if not prompts:
            raise ValueError("no prompts given")
        if self.family == "digits":
            bad = [p for p in prompts if p.strip() not in DIGIT_PROMPTS]
            if bad:
                raise ValueError(f"digits prompts must be digits 0..9, got {bad[0]!r}")
            prompts = [p.strip() for p in prompts]
        return prompts

    def encode(self, prompts: list[str], negative_prompt: str = "") -> tuple[Tensor, Tensor]:
        """(cond, uncond), one row per image: class labels and the null class, or text embeddings."""
        if self.family == "digits":
            cond = torch.tensor([int(p) for p in prompts], dtype=torch.long, device=self.device)
            return cond, torch.full_like(cond, self.loaded.null_class)
        cond = self.text.encode(prompts)
        uncond = self.text.encode([negative_prompt]).expand_as(cond)
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype).contiguous()

    def noise(self, count: int, generator: torch.Generator) -> Tensor:
        x = torch.randn((count, *self.loaded.sample_shape), generator=generator, device=generator.device)
        return x.to(self.device, self.dtype)

    def decode(self, samples: Tensor) -> Tensor:
        return samples if self.text is None else self.text.decode(samples)

    @torch.inference_mode()
    def __call__(self, prompt: str | int | Sequence[str | int] | None = None, *, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float | None = None, generator: torch.Generator | int | None = None,
                 sampler: str = "srds", tol: float = DEFAULT_TOL, num_blocks: int | None = None,
                 pipelined: bool = False, max_iters: int | None = None, num_images_per_prompt: int = 1,
                 negative_prompt: str = "", compare_serial: bool = False,
                 progress_bar: bool = True) -> SRDSPipelineOutput:
        """Sample one image per prompt (times num_images_per_prompt) with SRDS or the serial DDIM sampler."""
        prompts = self.check_prompts(prompt)
        check_run_args(num_inference_steps, tol, num_blocks, sampler, num_images_per_prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(0 if generator is None else int(generator))

        cond, uncond = self.encode(prompts, negative_prompt)
        x = self.noise(len(prompts), generator)
        model = classifier_free_guidance(self.cond_model, cond, uncond, scale)
        timesteps, alphas_cumprod = ddim_grid(self.loaded.scheduler_config, num_inference_steps)
        alphas_cumprod = alphas_cumprod.to(self.device)
        prediction_type = self.loaded.scheduler_config.get("prediction_type", self.loaded.spec.prediction_type)
        run = dict(model=model, x=x, timesteps=timesteps, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type)
        if self.runtime is not None:
            run["engine_inputs"] = dict(x=x, cond=cond, uncond=uncond, scale=scale, timesteps=timesteps,
                                        alphas_cumprod=alphas_cumprod, prediction_type=prediction_type)

        stats: dict[str, Any] = {
            "model": self.loaded.spec.name, "weights_id": self.loaded.weights_id, "sampler": sampler,
            "steps": num_inference_steps, "images": len(prompts), "prompts": prompts, "guidance_scale": scale,
            "cfg_rows_per_image": 1 if scale == 1.0 else 2, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "torch": torch.__version__, "backend": self.backend,
        }
        if sampler == "srds":
            samples, srds_stats = self._srds(run, tol, num_blocks, pipelined, max_iters, progress_bar)
            stats.update(srds_stats)
        else:
            samples, stats["wall_time_s"] = self._serial(run, progress_bar)
            stats.update(blocks=1, iterations=None, model_evals=num_inference_steps * len(prompts),
                         sequential_calls=num_inference_steps, converged=True, residuals=[])
        if compare_serial and sampler == "srds":
            reference, serial_time = self._serial(run, progress_bar)
            stats["serial"] = {"wall_time_s": serial_time, "model_evals": num_inference_steps * len(prompts),
                               "sequential_calls": num_inference_steps}
            stats["max_abs_diff_vs_serial"] = float((samples.double() - reference.double()).abs().max())
        pixels = self.decode(samples)
        return SRDSPipelineOutput(images=to_pil(pixels), stats=stats, samples=samples.detach().cpu())

    def _srds(self, run: dict, tol, num_blocks, pipelined, max_iters, progress_bar) -> tuple[Tensor, dict]:
        steps = len(run["timesteps"]) - 1
        blocks = num_blocks or default_num_blocks(steps)
        with _bar(progress_bar, total=min(blocks, max_iters or blocks), desc=f"SRDS {steps} steps / {blocks} blocks",
                  unit="iter") as bar:
            def progress(iteration: int, residual: float) -> None:
                bar.set_postfix(residual=f"{residual:.2e}", refresh=False)
                bar.update(1)

            extra = {}
            if self.runtime is not None:
                engine_run = run["engine_inputs"]
                self.runtime.srds(**engine_run, tol=tol, num_blocks=num_blocks, max_iters=max_iters,
                                  pipelined=pipelined, progress=None)  # warm-up: builds the engine, captures graphs
                bar.reset()
                start = _now(self.device)
                result = self.runtime.srds(**engine_run, tol=tol, num_blocks=num_blocks, max_iters=max_iters,
                                           pipelined=pipelined, progress=progress)
                elapsed = _now(self.device) - start
                extra = {"engine": self.runtime.engine.name, "engine_dtype": str(self.runtime.engine.spec.dtype).replace("torch.", ""),
                         "engine_noise_floor": self.runtime.noise_floor,
                         "tol_used": result.tol, "ticks_launched": result.ticks_launched}
            else:
                start = _now(self.device)
                result = srds_sample(**{k: v for k, v in run.items() if k != "engine_inputs"}, tol=tol,
                                     num_blocks=num_blocks, pipelined=pipelined, max_iters=max_iters, progress=progress)
                elapsed = _now(self.device) - start
        return result.sample, {**extra,
            "blocks": result.num_blocks, "iterations": result.iterations, "model_evals": result.model_evals,
            "sequential_calls": result.sequential_calls, "converged": result.converged, "residuals": result.residuals,
            "error_estimates": [e if math.isfinite(e) else None for e in result.error_estimates],
            "tol": tol, "pipelined": pipelined, "wall_time_s": elapsed,
        }

    def _serial(self, run: dict, progress_bar: bool) -> tuple[Tensor, float]:
        steps = len(run["timesteps"]) - 1
        with _bar(progress_bar, total=steps, desc=f"serial {steps} steps", unit="step") as bar:
            model = run["model"]

            def counted(x: Tensor, t: Tensor) -> Tensor:
                out = model(x, t)
                bar.update(1)
                return out

            if self.runtime is not None:
                self.runtime.serial(**run["engine_inputs"])  # warm-up: builds the engine, captures the step graph
                start = _now(self.device)
                sample = self.runtime.serial(**run["engine_inputs"])
                elapsed = _now(self.device) - start
                bar.update(steps)
                return sample, elapsed
            start = _now(self.device)
            sample = serial_sample(**{**{k: v for k, v in run.items() if k != "engine_inputs"}, "model": counted})
            return sample, _now(self.device) - start


def check_run_args(steps: int, tol: float, num_blocks: int | None, sampler: str, per_prompt: int) -> None:
    """Reject bad settings before any model work (the CLI calls this too, to fail fast with exit code 2)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if steps > 1000:
        raise ValueError(f"steps must be <= 1000 (the training schedule's length), got {steps}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if num_blocks is not None and not 1 <= num_blocks <= steps:
        raise ValueError(f"blocks must be in [1, steps={steps}], got {num_blocks}")
    if per_prompt < 1:
        raise ValueError(f"num-images must be >= 1, got {per_prompt}")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _bar(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, **kwargs)


def _text_stack(loaded: LoadedUNet) -> TextStack:
    """CLIP text encoder, tokenizer and VAE of a diffusers SD folder (local or HF cache)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = sd_folder(loaded.spec)
    device, dtype = next(loaded.unet.parameters()).device, next(loaded.unet.parameters()).dtype
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).to(device, dtype).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, low_cpu_mem_usage=False)
    vae = torch.nn.Module.to(vae, device, dtype).eval()
    length = loaded.cond_shape[0]

    def encode(prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return encoder(ids.input_ids.to(device))[0]

    return TextStack(encode, _vae_decoder(vae, loaded.vae_scaling_factor), f"CLIP + VAE from {folder}")


def _random_text_stack(loaded: LoadedUNet, seed: int) -> TextStack:
    """For timing without weights: the real VAE architecture with seeded random weights, and seeded random
    text embeddings of the right shape instead of a text encoder (no tokenizer vocabulary ships offline; the
    text encoder runs once per call and does not affect the sampler's timing)."""
    from diffusers import AutoencoderKL

    source = Path(loaded.spec.source)
    vae_config = read_json(source / "vae" / "config.json") if source.is_dir() else random_weights_config(loaded.spec)["vae"]
    device, dtype = next(loaded.unet.parameters()).device, next(loaded.unet.parameters()).dtype
    vae = torch.nn.Module.to(seeded_init(lambda: AutoencoderKL.from_config(vae_config), seed), device, dtype).eval()

    def encode(prompts: list[str]) -> Tensor:
        rows = [torch.randn(loaded.cond_shape, generator=torch.Generator().manual_seed(seed ^ zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows)

    return TextStack(encode, _vae_decoder(vae, loaded.vae_scaling_factor), "random VAE + seeded random text embeddings")


def _vae_decoder(vae, scaling_factor: float) -> Callable[[Tensor], Tensor]:
    def decode(latents: Tensor) -> Tensor:
        return vae.decode(latents.to(vae.dtype) / scaling_factor).sample.clamp(-1, 1)

    return decode
