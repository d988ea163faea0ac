"""SRDSPipeline: a diffusers-shaped façade over the models, the samplers and the runtime.

    pipe = SRDSPipeline.from_pretrained("digits")
    out = pipe(["3", "7"], num_inference_steps=100, generator=torch.Generator().manual_seed(0))
    out.images, out.stats, out.report

Everything a call needs lives on the pipeline instance or in the call: two pipelines in one process never
interfere. Noise is drawn on the generator's device (CPU by default) and then moved, so a seed gives the same
images on every device; `generator=None` means seed 0 (reproducible by default, unlike diffusers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .autotune.planner import AutoPlanner
from .execution import (Chunk, ChunkOutput, ReferencePath, RuntimePath, check_batch, check_finite,
                        chunk_rows_per_image, sample_chunk, sample_serial)
from .images import to_pil
from .models import LoadedUNet, load_unet, unet_model_fn
from .models.registry import read_json
from .models.text import TextStack, random_text_stack, text_stack
from .report import ConvergenceReport, convergence_report, merge_chunks, warnings_for
from .samplers import Cancelled  # noqa: F401  (srds_trt.Cancelled)
from .samplers.guidance import classifier_free_guidance
from .samplers.solver import as_solver, solver_grid
from .samplers.window import WINDOW_SAMPLERS
from .settings import GenerationSettings, check_guidance_scale, check_seed, default_steps
from .samplers.stopping import DEFAULT_TOL

DIGIT_PROMPTS = tuple(str(d) for d in range(10))
DEFAULT_GUIDANCE = {"digits": 4.0, "sd": 7.5, "sd3": 7.0, "flux": 3.5}  # sd3 / flux: their pipelines' defaults
# Widest model call (rows) one chunk of images may make: bounds memory for any image count (digits: ~26 images
# of an N=100 guided pipelined SRDS run per chunk; a 16x16 UNet's activations at 512 rows are ~0.3 GB).
MAX_ROWS = 512
LISTED_PROMPTS = 4096  # stats["prompts"] lists every image's prompt up to this many images


@dataclass
class SRDSPipelineOutput:
    images: list  # PIL images, one per generated sample
    stats: dict[str, Any]
    samples: Tensor = field(repr=False)  # the sampler's output on CPU: pixels in [-1, 1] (digits) or SD latents
    report: ConvergenceReport | None = None


class SRDSPipeline:
    def __init__(self, loaded: LoadedUNet, *, text: TextStack | None = None, default_guidance_scale: float | None = None,
                 backend: str = "torch", engine_dir: str | Path | None = None, process_group=None):
        if loaded.conditioning == "text" and text is None:
            raise ValueError("a text-conditioned UNet needs a TextStack (text encoder and VAE)")
        self.loaded, self.text, self.backend, self.process_group = loaded, text, backend, process_group
        self.cond_model = unet_model_fn(loaded)
        if process_group is not None:  # torch.distributed: each model call's rows split across ranks
            from .runtime.distributed import ShardedModel

            self.cond_model = ShardedModel(self.cond_model, process_group)
        self.default_guidance_scale = default_guidance_scale or DEFAULT_GUIDANCE[loaded.spec.family]
        self.default_steps = default_steps(loaded.spec.family)  # 100; SD3 / Flux: their pipelines' 28
        param = next(loaded.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.auto = AutoPlanner(self)  # sampler="auto": measured curves, choices, what past runs needed
        # torch on a CPU runs the pure reference samplers (the runtime gives the same samples there, tested);
        # everything else samples through the runtime: static buffers, per-bucket programs, CUDA graphs.
        self.path: ReferencePath | RuntimePath = ReferencePath(self.device)
        if backend != "torch" or self.device.type == "cuda":
            from .runtime.executor import RuntimeSampler

            self.runtime = RuntimeSampler(backend, loaded, device=self.device, dtype=self.dtype, engine_dir=engine_dir,
                                          process_group=process_group)

    @property
    def runtime(self):
        """The runtime (runtime.executor.RuntimeSampler) this pipeline samples through, or None (reference path)."""
        return self.path.runtime

    @runtime.setter
    def runtime(self, runtime) -> None:
        self.path = ReferencePath(self.device) if runtime is None else RuntimePath(runtime)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "digits", *, device="cpu", dtype=torch.float32,
                        random_weights: bool = False, seed: int = 0, resolution: int | None = None,
                        backend: str = "torch", engine_dir: str | Path | None = None,
                        process_group=None) -> "SRDSPipeline":
        """Load a registry model, local diffusers folder or cached hub id (see srds_trt.models). backend: "torch",
        "onnxruntime" (the exported ONNX) or "tensorrt" (the exported plan); engine_dir holds `export` output."""
        loaded = load_unet(name_or_path, device=device, dtype=dtype, random_weights=random_weights, seed=seed,
                           resolution=resolution)
        options = dict(backend=backend, engine_dir=engine_dir, process_group=process_group)
        if loaded.spec.family == "digits":
            meta_file = Path(loaded.spec.source) / "digits_meta.json"
            scale = read_json(meta_file).get("default_guidance_scale") if meta_file.is_file() else None
            return cls(loaded, default_guidance_scale=scale, **options)
        return cls(loaded, text=random_text_stack(loaded, seed) if random_weights else text_stack(loaded), **options)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images this pipeline returns."""
        height, width = self.loaded.sample_shape[-2:]
        factor = 1 if self.text is None else self.text.pixels_per_latent
        return height * factor, width * factor

    @property
    def family(self) -> str:
        return self.loaded.spec.family

    @property
    def world_size(self) -> int:
        from .runtime.distributed import group_size

        return group_size(self.process_group)

    def runnable_samplers(self) -> tuple[str, ...]:
        """The samplers this pipeline's path runs (the reference path: all; the runtime: serial, srds, windows)."""
        return self.path.samplers

    def check_prompts(self, prompt: str | int | Sequence[str | int] | None) -> list[str]:
        """The prompts as a list of strings; digits accepts "0".."9" (or ints) and defaults to all ten."""
        if prompt is None:
            prompts = list(DIGIT_PROMPTS) if self.family == "digits" else [""]
        else:
            prompts = [str(prompt)] if isinstance(prompt, (str, int)) else [str(p) for p in prompt]
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
        if self.family == "flux":  # distilled guidance: no unconditional row to encode
            return cond.to(self.device, self.dtype), cond.to(self.device, self.dtype)
        uncond = self.text.encode([negative_prompt]).expand_as(cond)
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype).contiguous()

    def decode(self, samples: Tensor) -> Tensor:
        return samples if self.text is None else self.text.decode(samples)

    def __call__(self, prompt: str | int | Sequence[str | int] | None = None, **kwargs) -> SRDSPipelineOutput:
        """Sample one image per prompt (times num_images_per_prompt) with SRDS, serial or another sampler of
        srds_trt.samplers.SAMPLERS ("auto": srds_trt.autotune chooses the sampler and its options from this
        pipeline's measured latency curve; stats["auto"] says what and why). Keywords as iter_chunks.
        Raises ValueError (SettingError) on bad settings before any model work, NonFiniteError when NaN/Inf reach a
        sample, srds_trt.Cancelled when cancel() returned True."""
        chunks = list(self.iter_chunks(prompt, **kwargs))
        stats, report = self.summarize(chunks, max_iters=kwargs.get("max_iters"))
        return SRDSPipelineOutput(images=[im for c in chunks for im in c.images], stats=stats,
                                  samples=torch.cat([c.samples for c in chunks]), report=report)

    def summarize(self, chunks: list["ChunkOutput"], *, max_iters: int | None = None) -> tuple[dict, ConvergenceReport]:
        """The call's stats and convergence report from its chunks (iter_chunks' outputs; their images may have
        been dropped already); what past runs needed is remembered for sampler="auto"."""
        parts = [c.stats["chunk"] for c in chunks]
        stats = {k: v for k, v in chunks[-1].stats.items() if k != "chunk"}
        stats.update(merge_chunks(parts))
        self.auto.observe(stats["sampler"], stats["steps"], stats["tol"], stats["cfg_rows_per_image"] == 2,
                          stats.get("pipelined"), max_iters, parts)
        counts = self._rank_counts()
        if counts is not None:  # world_size and every rank's engine calls and rows in THIS call (all ranks agree)
            stats.update((counts.since(chunks[0].counts_before) if counts is chunks[0].counter else counts).as_stats())
        stats["warnings"] = warnings_for(stats)
        report = convergence_report(stats)
        stats["report"] = report.as_dict()
        return stats, report

    @torch.inference_mode()
    def iter_chunks(self, prompt=None, *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    generator: torch.Generator | int | None = None, sampler: str = "srds", tol: float = DEFAULT_TOL,
                    num_blocks: int | None = None, pipelined: bool = True, max_iters: int | None = None,
                    num_images_per_prompt: int = 1, negative_prompt: str = "", compare_serial: bool = False,
                    max_rows: int | None = None, latents: Tensor | None = None, progress_bar: bool = True,
                    window: int | None = None, cancel: Callable[[], bool] | None = None) -> Iterator["ChunkOutput"]:
        """The call as a stream of image chunks (memory bounded whatever the image count): each chunk's widest model
        call fits `max_rows` rows; a first call of a shape builds and captures its runner, later calls replay it.
        cancel() is polled at every iteration, sweep and serial step; True raises srds_trt.Cancelled."""
        # 1. Check everything before any model work.
        prompts = self.check_prompts(prompt)
        num_inference_steps = self.default_steps if num_inference_steps is None else num_inference_steps
        GenerationSettings(steps=num_inference_steps, sampler=sampler, tol=tol, blocks=num_blocks, window=window,
                           num_images=num_images_per_prompt).validate()
        scale = self.default_guidance_scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        if negative_prompt and self.family == "digits":
            raise ValueError("negative_prompt has no meaning for the digits model (its unconditional row is the null class)")
        if negative_prompt and self.family == "flux":
            raise ValueError("negative_prompt has no meaning for Flux (its guidance is distilled: one call, no "
                             "unconditional row)")
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(0 if generator is None else check_seed(generator))
        # Flux-dev's guidance is distilled: the scale is an input of one call, never a doubled call
        distilled = self.family == "flux"
        call_scale = 1.0 if distilled else scale  # the guidance the model call itself combines
        total, guided, max_rows = len(prompts) * num_images_per_prompt, scale != 1.0 and not distilled, max_rows or MAX_ROWS
        expected = (total, *self.loaded.sample_shape)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
        # 2. sampler="auto": the choice's options (num_blocks/pipelined or window) replace the caller's.
        auto = None
        if sampler == "auto":
            start = time.perf_counter()  # a first auto call builds the engine and times its buckets here
            auto = self.auto.choose(num_inference_steps, total, scale, tol, max_rows, max_iters, lambda name, options:
                                    chunk_rows_per_image(name, num_inference_steps, guided, max_iters=max_iters, **options))
            auto["decide_s"] = time.perf_counter() - start  # outside wall_time_s: reported on its own
            sampler, chosen = auto["sampler"], auto["options"]
            num_blocks, pipelined = chosen.get("num_blocks", num_blocks), chosen.get("pipelined", pipelined)
            window = chosen.get("window", window)
        if sampler not in self.runnable_samplers():
            raise ValueError(f"sampler {sampler!r} does not run on this path (backend {self.backend} on {self.device}); "
                             f"it runs {', '.join(self.runnable_samplers())} (the reference path, torch on a CPU, "
                             "runs every sampler)")
        # 3. Chunks sized by the widest call of one image.
        per_image = chunk_rows_per_image(sampler, num_inference_steps, guided, num_blocks=num_blocks,
                                         pipelined=pipelined, max_iters=max_iters, window=window)
        chunk = max(1, self.path.row_budget(per_image, max_rows) // per_image)
        timesteps, alphas_cumprod, prediction_type = solver_grid(  # DDIM, or flow Euler on the sigma grid
            self.loaded.scheduler_config, num_inference_steps, self.loaded.spec.prediction_type, self.loaded.sample_shape,
            self.family)
        image_prompt = lambda i: prompts[i // num_images_per_prompt]  # noqa: E731
        stats: dict[str, Any] = {
            "model": self.loaded.spec.name, "weights_id": self.loaded.weights_id, "sampler": sampler,
            "steps": num_inference_steps, "images": total, "num_images_per_prompt": num_images_per_prompt,
            "prompts": [image_prompt(i) for i in range(total)] if total <= LISTED_PROMPTS else prompts,
            "solver": as_solver(alphas_cumprod, prediction_type).name,  # "ddim" | "flow-euler"
            "guidance_scale": scale, "cfg_rows_per_image": 2 if guided else 1, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "torch": torch.__version__, "backend": self.backend,
            "chunks": math.ceil(total / chunk), "images_per_chunk": min(chunk, total), "tol": tol,
            **({"auto": auto} if auto is not None else {}),
        }
        options = {"num_blocks": num_blocks, "pipelined": pipelined} if sampler == "srds" else \
            ({"window": window} if sampler in WINDOW_SAMPLERS and window is not None else {})
        counter = self._rank_counts()  # None until a runtime's first call builds its (sharded) engine
        before = counter.snapshot() if counter is not None else None
        # 4. Sample chunk by chunk; noise drawn per chunk equals one draw of every image (sequential generator).
        for start in range(0, total, chunk):
            part = [image_prompt(i) for i in range(start, min(start + chunk, total))]
            noise = latents[start:start + len(part)] if latents is not None else \
                torch.randn((len(part), *self.loaded.sample_shape), generator=generator, device=generator.device)
            cond, uncond = self.encode(part, negative_prompt)
            if distilled:  # the scale rides in the conditioning (models/transformers.py), one unguided call
                from .models.transformers import with_distilled_guidance

                cond = uncond = with_distilled_guidance(self.loaded, cond, scale)
            model = classifier_free_guidance(check_batch(self.cond_model), cond, uncond, call_scale)
            run = Chunk(model, noise.to(self.device, self.dtype), cond, uncond, call_scale, timesteps, alphas_cumprod,
                        prediction_type)
            sample, part_stats = sample_chunk(self.path, sampler, run, tol, options, max_iters, progress_bar, cancel)
            if compare_serial and sampler != "serial":
                reference, serial_stats = sample_serial(self.path, run, progress_bar, cancel)
                part_stats["serial"] = {**serial_stats, "model_evals": num_inference_steps * len(part),
                                        "sequential_calls": num_inference_steps}
                part_stats["max_abs_diff_vs_serial"] = float((sample.double() - reference.double()).abs().max())
            sample = check_finite(sample.detach().cpu(), sampler)  # whatever a sampler checks, no NaN leaves here
            pixels = self.decode(sample.to(self.device)).cpu()
            yield ChunkOutput(start, part, sample, to_pil(pixels), {**stats, "chunk": part_stats}, counter, before)

    def _rank_counts(self):
        """Every rank's engine calls and rows so far (runtime.distributed.RankCounts), None when not sharded."""
        if self.process_group is None:
            return None
        if self.runtime is not None:  # the ShardedEngine (None until the first call builds it)
            return getattr(self.runtime.engine, "counts", None)
        return self.cond_model.counts


__all__ = ["Cancelled", "ConvergenceReport", "SRDSPipeline", "SRDSPipelineOutput"]
