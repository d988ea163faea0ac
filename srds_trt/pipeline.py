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
from .paradigms import WINDOW_SAMPLERS  # sliding-window samplers: runtime.window_runner on the runtime
from .sampling import DEFAULT_TOL, SAMPLERS as REFERENCE_SAMPLERS, serial_sample
from .schedule import default_num_blocks
from .stopping import NonFiniteError

# every sampler of sampling.SAMPLERS, plus "auto" (srds_trt.autotune chooses from the measured latency curve)
SAMPLERS = (*REFERENCE_SAMPLERS, "auto")
# what the runtime (GPU, exported engines) runs: runnable_samplers(); the window samplers on runtime.window_runner
RUNTIME_SAMPLERS = ("serial", "srds", "eps-picard", "paradigms")
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
                 backend: str = "torch", engine_dir: str | Path | None = None, process_group=None):
        if loaded.conditioning == "text" and text is None:
            raise ValueError("a text-conditioned UNet needs a TextStack (text encoder and VAE)")
        self.loaded = loaded
        self.text = text
        self.cond_model = unet_model_fn(loaded)
        self.process_group = process_group  # torch.distributed: each model call's rows split across ranks
        if process_group is not None:
            from .distributed import ShardedModel

            self.cond_model = ShardedModel(self.cond_model, process_group)
        self.default_guidance_scale = default_guidance_scale or DEFAULT_GUIDANCE[loaded.spec.family]
        param = next(loaded.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.backend = backend
        # torch on a CPU keeps the pure reference sampler (the runtime gives the same samples there, tested);
        # everything else samples through the runtime: static buffers, per-bucket programs, CUDA graphs.
        self.runtime = None
        self._auto_cache: dict[tuple, Any] = {}  # --sampler auto: curves, all-gather times (per pipeline)
        # --sampler auto learns: (steps, tol, guided, autotune.candidate_key) -> iterations / sweeps per chunk of
        # this pipeline's converged runs (_observe), newest last, at most autotune.OBSERVED_RUNS kept
        self._auto_observed: dict[tuple, list[int]] = {}
        if backend != "torch" or self.device.type == "cuda":
            from .runtime.sampler import RuntimeSampler

            self.runtime = RuntimeSampler(backend, loaded, device=self.device, dtype=self.dtype, engine_dir=engine_dir,
                                          process_group=process_group)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "digits", *, device="cpu", dtype=torch.float32,
                        random_weights: bool = False, seed: int = 0, resolution: int | None = None,
                        backend: str = "torch", engine_dir: str | Path | None = None,
                        process_group=None) -> "SRDSPipeline":
        """Load a registry model, local diffusers folder or cached hub id (see srds_trt.models).

        backend: "torch" (the PyTorch UNet; on a GPU through the CUDA-graph runtime), "onnxruntime" (the exported
        ONNX, CPU) or "tensorrt" (the exported plan, GPU); engine_dir holds `python -m srds_trt.export` output.
        """
        loaded = load_unet(name_or_path, device=device, dtype=dtype, random_weights=random_weights, seed=seed,
                           resolution=resolution)
        options = dict(backend=backend, engine_dir=engine_dir, process_group=process_group)
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
                 pipelined: bool = True, max_iters: int | None = None, num_images_per_prompt: int = 1,
                 negative_prompt: str = "", compare_serial: bool = False, max_rows: int | None = None,
                 latents: Tensor | None = None, progress_bar: bool = True, window: int | None = None) -> SRDSPipelineOutput:
        """Sample one image per prompt (times num_images_per_prompt) with SRDS, serial DDIM or another sampler
        of sampling.SAMPLERS ("auto": srds_trt.autotune chooses the sampler and its num_blocks/pipelined or window
        from this pipeline's measured latency curve, replacing those arguments; stats["auto"] says what and why).
        window: points per sweep of the sliding-window samplers (paradigms, eps-picard; None: their default).

        Images are processed in chunks whose widest model call fits `max_rows` rows (default MAX_ROWS), so
        memory stays bounded whatever the image count; the first call of a (steps, blocks, images) shape builds
        and captures its runner, later calls replay it (stats: first_call, setup_s, wall_time_s).
        Raises ValueError on bad settings (before any model work) and NonFiniteError when NaN/Inf reach a sample.
        """
        prompts = self.check_prompts(prompt)
        check_run_args(num_inference_steps, tol, num_blocks, sampler, num_images_per_prompt)
        scale = self.default_guidance_scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        if negative_prompt and self.family == "digits":
            raise ValueError("negative_prompt has no meaning for the digits model (its unconditional row is the null class)")
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = check_seed(generator)
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(0 if generator is None else generator)
        auto = None
        if sampler == "auto":  # the choice's options (num_blocks/pipelined or window) replace the caller's
            decide_start = time.perf_counter()  # a first auto call builds the engine and times its buckets here
            auto = self._auto_sampler(num_inference_steps, len(prompts) * num_images_per_prompt, scale, tol,
                                      max_rows or MAX_ROWS, max_iters)
            auto["decide_s"] = time.perf_counter() - decide_start  # outside wall_time_s: reported on its own
            sampler, options = auto["sampler"], auto["options"]
            num_blocks, pipelined = options.get("num_blocks", num_blocks), options.get("pipelined", pipelined)
            window = options.get("window", window)
        if sampler not in self.runnable_samplers():
            raise ValueError(f"sampler {sampler!r} does not run on this path (backend {self.backend} on {self.device}); "
                             f"it runs {', '.join(self.runnable_samplers())} (the reference path, torch on a CPU, "
                             "runs every sampler)")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        guided = scale != 1.0
        per_image = chunk_rows_per_image(sampler, num_inference_steps, guided, num_blocks=num_blocks,
                                         pipelined=pipelined, max_iters=max_iters, window=window)
        chunk = max(1, (max_rows or MAX_ROWS) // per_image)
        # latents: the starting noise x_T itself (a server batching requests of different seeds draws each
        # request's noise as this call would and passes the stack); None draws it from the generator.
        expected = (len(prompts), *self.loaded.sample_shape)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
        x_all = latents.cpu() if latents is not None else torch.randn(expected, generator=generator, device=generator.device)
        timesteps, alphas_cumprod, prediction_type = solver_grid(self.loaded, num_inference_steps, self.device)

        stats: dict[str, Any] = {
            "model": self.loaded.spec.name, "weights_id": self.loaded.weights_id, "sampler": sampler,
            "steps": num_inference_steps, "images": len(prompts), "prompts": prompts, "guidance_scale": scale,
            "cfg_rows_per_image": 2 if guided else 1, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "torch": torch.__version__, "backend": self.backend,
            "chunks": math.ceil(len(prompts) / chunk), "images_per_chunk": min(chunk, len(prompts)),
        }
        if auto is not None:
            stats["auto"] = auto
        counter = self._rank_counts()  # None until a runtime's first call builds its (sharded) engine
        counts_before = counter.snapshot() if counter is not None else None
        samples, chunk_stats = [], []
        with _bar(progress_bar and len(prompts) > chunk, total=len(prompts), desc="images", unit="image") as images_bar:
            for start in range(0, len(prompts), chunk):
                part = prompts[start:start + chunk]
                cond, uncond = self.encode(part, negative_prompt)
                x = x_all[start:start + chunk].to(self.device, self.dtype)
                model = classifier_free_guidance(check_batch(self.cond_model), cond, uncond, scale)
                run = dict(model=model, x=x, timesteps=timesteps, alphas_cumprod=alphas_cumprod,
                           prediction_type=prediction_type)
                if self.runtime is not None:
                    run["engine_inputs"] = dict(x=x, cond=cond, uncond=uncond, scale=scale, timesteps=timesteps,
                                                alphas_cumprod=alphas_cumprod, prediction_type=prediction_type)
                part_stats: dict[str, Any] = {}
                if sampler == "serial":
                    sample, part_stats = self._serial(run, progress_bar)
                    part_stats.update(blocks=1, iterations=None, model_evals=num_inference_steps * len(part),
                                      sequential_calls=num_inference_steps, converged=True, residuals=[])
                else:
                    sample, part_stats = self._sampler(sampler, run, tol, num_blocks, pipelined, max_iters, progress_bar,
                                                       window)
                if compare_serial and sampler != "serial":
                    reference, serial_stats = self._serial(run, progress_bar)
                    part_stats["serial"] = {**serial_stats, "model_evals": num_inference_steps * len(part),
                                            "sequential_calls": num_inference_steps}
                    part_stats["max_abs_diff_vs_serial"] = float((sample.double() - reference.double()).abs().max())
                samples.append(sample.detach().cpu())
                chunk_stats.append(part_stats)
                images_bar.update(len(part))
        stats.update(_merge_chunks(chunk_stats))
        self._observe(sampler, num_inference_steps, tol, guided, pipelined, max_iters, chunk_stats)
        counts = self._rank_counts()
        if counts is not None:  # world_size and every rank's engine calls and rows in THIS call (all ranks agree)
            # on the runtime path a first call's warm-up/capture calls are in it (stats "first_call" says so); an
            # engine built (or rebuilt larger) during this call counted from zero
            stats.update((counts.since(counts_before) if counts is counter else counts).as_stats())
        samples_cpu = _check_finite(torch.cat(samples), sampler)  # whatever a sampler checks, no NaN leaves here
        pixels = torch.cat([self.decode(s.to(self.device)) .cpu() for s in samples])
        return SRDSPipelineOutput(images=to_pil(pixels), stats=stats, samples=samples_cpu)

    def _rank_counts(self):
        """Every rank's engine calls and rows so far (distributed.RankCounts), None when not sharded."""
        if self.process_group is None:
            return None
        engine = self.runtime.engine if self.runtime is not None else None
        if hasattr(engine, "counts"):  # runtime: the ShardedEngine (None until the first call builds it)
            return engine.counts
        if self.runtime is not None:
            return None
        return self.cond_model.counts

    def runnable_samplers(self) -> tuple[str, ...]:
        """The samplers this pipeline's path runs: all of sampling.SAMPLERS on the reference path (torch on a CPU),
        RUNTIME_SAMPLERS on the runtime. `sampler=` outside them is refused; --sampler auto falls back to the best
        of them (autotune.runnable_choice) and says so in stats["auto"]["fallback"]."""
        return tuple(REFERENCE_SAMPLERS) if self.runtime is None else RUNTIME_SAMPLERS

    def _auto_sampler(self, steps: int, images: int, scale: float, tol: float, max_rows: int,
                      max_iters: int | None) -> dict:
        """sampler="auto": srds_trt.autotune's choice for this model, engine, device, world size, N and tol, as the
        stats record it: Choice.as_dict() (every candidate's predicted ms, the reason, any fallback) plus where the
        latency curve came from and what a tick's all-gather costs. Every rank of a process group gets rank 0's
        curve and all-gather time, so all ranks choose the same sampler (they must run the same schedule).
        Each candidate is priced as the image chunks __call__ would run it in (max_rows, sized as __call__ sizes
        them)."""
        from . import autotune
        from .runtime.latency import bucketed

        guided = scale != 1.0
        widest = autotune.widest_rows(steps=steps, images=images, guided=guided)
        world = self._world_size()
        curve, source, buckets, capacity = self._latency_curve(widest, world)
        allgather_ms, allgather = self._allgather_cost(widest, world)
        if self.process_group is not None and world > 1:  # agree on rank 0's numbers (timings differ a little per rank; all must run one schedule)
            import torch.distributed as dist

            shared = [curve, source, allgather_ms]
            dist.broadcast_object_list(shared, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
            curve, source, allgather_ms = shared
        if source == "engine warm-up":  # after every rank has read the manifest: none sees it change mid-decision
            self._record_curve(curve)
        latency = bucketed(curve, buckets) if buckets else curve  # a call pads to its bucket: price it there
        overhead = autotune.GPU_SWEEP_OVERHEAD_MS if self.device.type == "cuda" else None

        def per_image(sampler: str, options: dict) -> int:  # as __call__ sizes its chunks
            return chunk_rows_per_image(sampler, steps, guided, max_iters=max_iters, **options)

        observed = {cand: autotune.observed_iterations(history) for (n, t, g, cand), history in self._auto_observed.items()
                    if (n, t, g) == (steps, tol, guided)}
        key = ("choice", steps, images, guided, world, allgather_ms, tuple(sorted(curve.items())), buckets, tol,
               max_rows, max_iters)
        seen = tuple(sorted(observed.items()))
        cached = self._auto_cache.get(key)
        if cached is None or cached[0] != seen:  # pricing N = 1024's candidates is milliseconds of Python per request;
            # one entry per settings, replaced when the observations change (a server's cache stays bounded)
            self._auto_cache[key] = (seen, autotune.choose(steps=steps, images=images, guided=guided, latency_ms=latency,
                                                           world_size=world, allgather_ms=allgather_ms,
                                                           sweep_overhead_ms=overhead, tol=tol, max_rows=max_rows,
                                                           rows_per_image=per_image, observed=observed))
        choice = self._auto_cache[key][1]
        runnable = self.runnable_samplers()

        def why_not(candidate) -> str | None:
            if capacity is not None and candidate.rows_per_call > capacity:
                return f"its widest call needs {candidate.rows_per_call} rows, the export holds {capacity}"
            if candidate.sampler not in runnable:
                return f"this path ({self.backend} on {self.device.type}) runs {', '.join(runnable)}"
            return None

        choice = autotune.runnable_choice(choice, why_not)
        return {**choice.as_dict(), "tol": tol, "curve_source": source,
                "latency_per_rows_ms": {int(r): round(float(ms), 4) for r, ms in curve.items()},
                "world_size": world, "allgather_ms": allgather_ms, "allgather": allgather,
                "curve_recorded": self._auto_cache.get(("recorded", str(getattr(self.runtime, "artifacts", None))))}

    def _observe(self, sampler: str, steps: int, tol: float, guided: bool, pipelined: bool, max_iters: int | None,
                 chunks: list[dict]) -> None:
        """Remember what this run's chunks needed (SRDS: Parareal iterations; windows: sweeps), for --sampler auto's
        next choice at the same (N, tol, guidance). Only complete runs count: converged, not cut by max_iters."""
        from . import autotune

        if sampler not in ("srds", *WINDOW_SAMPLERS) or max_iters is not None:
            return
        for part in chunks:
            if not part.get("converged") or part.get("iterations") is None:
                continue
            options = {"num_blocks": part["blocks"], "pipelined": pipelined} if sampler == "srds" \
                else {"window": part["window"]}
            history = self._auto_observed.setdefault((steps, tol, guided, autotune.candidate_key(sampler, options)), [])
            history.append(int(part["iterations"]))
            del history[:-autotune.OBSERVED_RUNS]

    def _world_size(self) -> int:
        from .distributed import group_size

        return group_size(self.process_group)

    def _latency_curve(self, widest: int, world: int = 1):
        """(curve {rows: ms}, source, the engine's buckets or None, rows the export can hold or None) for auto;
        cached per pipeline and engine (measured once, reused by every later call that needs no wider rows).

        Sources, first that applies: "manifest" (the export's latency_per_rows, measured earlier on the GPU that
        serves its plan); "engine warm-up" (the runtime's engine, every bucket, runtime.latency); "reference model"
        (the PyTorch model this pipeline samples with on a CPU). Per-rank rows: a sharded engine's inner engine is
        what one rank runs, and autotune splits each call's rows over the ranks itself.
        """
        per_rank = -(-widest // world)
        if self.runtime is None:
            key = ("reference", per_rank)
            if key not in self._auto_cache:
                self._auto_cache[key] = self._measure_reference_curve(per_rank)
            return self._auto_cache[key], "reference model", None, None
        capacity = None
        if self.runtime.artifacts is not None:  # an export: its manifest may hold the curve, its profile bounds rows
            max_batch, stored = self._manifest_curve()
            capacity = max_batch * world
            if stored:
                return stored, "manifest", None, capacity
        engine = self.runtime.engine_for(min(widest, capacity or widest))  # built as a run would build it, then kept
        local = getattr(engine, "inner", engine)  # a ShardedEngine's own engine: one rank's share of a call
        key = ("engine", id(local), local.buckets)
        if key not in self._auto_cache:
            self._auto_cache[key] = self._measure_engine_curve(local)
        return self._auto_cache[key], "engine warm-up", local.buckets, capacity

    def _manifest_curve(self) -> tuple[int, dict[int, float] | None]:
        """(the export's max_batch, its latency_per_rows or None), read once per manifest version: a server's auto
        requests do not re-parse the JSON (its modification time keys the cache, so a recorded curve is seen)."""
        from .export.artifacts import MANIFEST_NAME, read_manifest

        path = Path(self.runtime.artifacts)
        key = ("manifest", str(path), (path / MANIFEST_NAME).stat().st_mtime_ns)
        if key not in self._auto_cache:
            manifest = read_manifest(path)
            stored = manifest.get("latency_per_rows")
            self._auto_cache[key] = (int(manifest["request"]["max_batch"]),
                                     {int(r): float(ms) for r, ms in stored.items()} if stored else None)
        return self._auto_cache[key]

    def _measure_reference_curve(self, widest: int) -> dict[int, float]:
        """ms per conditional model call of this rank's model vs rows: 1, 2, 4, ... below `widest`, and `widest`
        (at most 64: wider calls extrapolate with the last slope); one warm-up, then the best of three rounds
        (runtime.latency.best_ms_interleaved: a shared CPU's load bursts must not flatten the curve)."""
        from .runtime.latency import best_ms_interleaved

        model = self.cond_model.model if self.process_group is not None else self.cond_model  # unsharded
        top = min(widest, 64)
        calls = {}
        for r in sorted({*(2**k for k in range(7) if 2**k < top), top}):
            x = torch.zeros((r, *self.loaded.sample_shape), device=self.device, dtype=self.dtype)
            t = torch.full((r,), 500, device=self.device)
            cond, _ = self.encode(["0" if self.family == "digits" else ""] * r)
            calls[r] = lambda x=x, t=t, cond=cond: model(x, t, cond)
        return best_ms_interleaved(calls, self.device, 3)

    def _measure_engine_curve(self, engine) -> dict[int, float]:
        from .runtime.latency import measure_engine_curve

        return measure_engine_curve(engine)

    def _record_curve(self, curve: dict[int, float]) -> None:
        """Store a measured engine curve in the export's manifest when it has none (rank 0 only; atomic). Only a
        TensorRT plan's: a plan is built for one GPU target, so its curve belongs to it. An ONNX export is device-
        neutral and serves CPUs of any size and load: a curve measured on one would mislead a run on another."""
        folder = getattr(self.runtime, "artifacts", None)
        key = ("recorded", str(folder))
        if folder is None or key in self._auto_cache:
            return
        if self.backend != "tensorrt":
            self._auto_cache[key] = f"not recorded: an {self.backend} export is not tied to one device"
            return
        if self.process_group is not None:
            import torch.distributed as dist

            if dist.get_rank(self.process_group) != 0:
                return
        from .export.artifacts import ArtifactError, record_latency

        try:
            record_latency(folder, curve)
            self._auto_cache[key] = f"recorded in {folder}/manifest.json"
        except (ArtifactError, OSError) as exc:  # a read-only export still runs: say why, go on
            self._auto_cache[key] = f"not recorded: {exc}"

    def _allgather_cost(self, widest: int, world: int) -> tuple[float, str | None]:
        """ms of one all-gather of a tick's state on this pipeline's group (the widest candidate's rows per rank),
        measured once per pipeline at warm-up; (0, None) on one rank."""
        if world == 1:
            return 0.0, None
        from .runtime.latency import measure_allgather_ms

        per_rank = -(-widest // world)
        key = ("allgather", per_rank)
        if key not in self._auto_cache:
            ms = measure_allgather_ms(self.process_group, per_rank, self.loaded.sample_shape, self.dtype, self.device)
            self._auto_cache[key] = (ms, f"measured at warm-up: one all-gather of {per_rank} rows x "
                                         f"{tuple(self.loaded.sample_shape)} per rank, best of 3")
        return self._auto_cache[key]

    def _sampler(self, name: str, run: dict, tol, num_blocks, pipelined, max_iters, progress_bar,
                 window: int | None = None) -> tuple[Tensor, dict]:
        steps = len(run["timesteps"]) - 1
        blocks = num_blocks or default_num_blocks(steps)
        if name in WINDOW_SAMPLERS:  # sweeps until the window has slid past N: known only at the end
            from .runtime.window_runner import resolve_window

            width = resolve_window(name, steps, window)
            total, desc, unit = max_iters, f"{name} {steps} steps / window {width}", "sweep"
        else:
            total, desc, unit = min(blocks, max_iters or blocks), f"{name} {steps} steps / {blocks} blocks", "iter"
        with _bar(progress_bar, total=total, desc=desc, unit=unit) as bar:
            def progress(iteration: int, residual: float) -> None:
                bar.set_postfix(residual=f"{residual:.2e}", refresh=False)
                bar.update(1)

            extra: dict[str, Any] = {}
            if self.runtime is not None:
                start = _now(self.device)
                window_stats = {}
                if name in WINDOW_SAMPLERS:  # one captured sweep, one host read per sweep (window_runner.py)
                    result, timing = self.runtime.window(name, **run["engine_inputs"], tol=tol, window=window,
                                                         max_iters=max_iters, progress=progress)
                    reads = self.runtime.last_window_stats
                    window_stats = {"slides": result.slides, "host_reads": reads.host_reads,
                                    "host_read_ms": 1e3 * reads.host_read_s}
                else:
                    result, timing = self.runtime.srds(**run["engine_inputs"], tol=tol, num_blocks=num_blocks,
                                                       max_iters=max_iters, pipelined=pipelined, progress=progress)
                elapsed = _now(self.device) - start
                extra = {"engine": self.runtime.engine.name,
                         "engine_dtype": str(self.runtime.engine.spec.dtype).replace("torch.", ""),
                         "engine_noise_floor": self.runtime.noise_floor,
                         "engine_noise_floor_rows": self.runtime.noise_floor_rows,
                         "tol_used": result.tol, "ticks_launched": result.ticks_launched,
                         **window_stats, **_timing(timing, elapsed)}
            else:
                options = dict(max_iters=max_iters, progress=progress)
                if name == "srds":
                    options.update(num_blocks=num_blocks, pipelined=pipelined)
                elif window is not None:  # the sliding-window samplers (paradigms, eps-picard)
                    options.update(window=window)
                reference = {k: v for k, v in run.items() if k != "engine_inputs"}
                start = _now(self.device)
                result = REFERENCE_SAMPLERS[name](**reference, tol=tol, **options)
                elapsed = _now(self.device) - start
                extra = {"first_call": True, "setup_s": 0.0, "wall_time_s": elapsed}
        return result.sample, {**extra,
            "blocks": result.num_blocks, "iterations": result.iterations, "model_evals": result.model_evals,
            "sequential_calls": result.sequential_calls, "converged": result.converged,
            "residuals": [_finite_or_none(r) for r in result.residuals],
            "error_estimates": [_finite_or_none(e) for e in result.error_estimates],
            "tol": tol, "accept_tol": result.accept_tol, "pipelined": pipelined if name == "srds" else None,
            "window": getattr(result, "window", None),
        }

    def _serial(self, run: dict, progress_bar: bool) -> tuple[Tensor, dict]:
        steps = len(run["timesteps"]) - 1
        with _bar(progress_bar, total=steps, desc=f"serial {steps} steps", unit="step") as bar:
            model = run["model"]

            def counted(x: Tensor, t: Tensor) -> Tensor:
                out = model(x, t)
                bar.update(1)
                return out

            if self.runtime is not None:
                start = _now(self.device)
                sample, timing = self.runtime.serial(**run["engine_inputs"])
                elapsed = _now(self.device) - start
                bar.update(steps)
                return _check_finite(sample, "serial"), _timing(timing, elapsed)
            start = _now(self.device)
            sample = serial_sample(**{**{k: v for k, v in run.items() if k != "engine_inputs"}, "model": counted})
            elapsed = _now(self.device) - start
            return _check_finite(sample, "serial"), {"first_call": True, "setup_s": 0.0, "wall_time_s": elapsed}


# Widest model call (rows) one chunk of images may make: bounds memory for any --num-images (digits: ~26 images
# of an N=100 guided pipelined SRDS run per chunk; a 16x16 UNet's activations at 512 rows are ~0.3 GB).
MAX_ROWS = 512
MAX_STEPS = 8192  # grids finer than the training schedule use fractional timesteps (solvers.alphas_at)
MAX_GUIDANCE = 1e3  # far beyond any useful scale; larger ones overflow fp16 (and soon fp32) outright
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def window_rows(sampler: str, steps: int, window: int | None, images: int, guided: bool) -> int:
    """Rows of one sweep of a sliding-window sampler: window x images x (2 under guidance)."""
    from .runtime.window_runner import window_rows as rows

    return rows(sampler, steps, window, images, guided)


def chunk_rows_per_image(sampler: str, steps: int, guided: bool, *, num_blocks: int | None = None,
                         pipelined: bool = True, max_iters: int | None = None, window: int | None = None) -> int:
    """The widest call's rows for ONE image of `sampler` at these settings: what __call__ sizes its image chunks by
    (and --sampler auto prices them by)."""
    if sampler == "srds":
        return rows_per_image(steps, num_blocks, guided, pipelined, max_iters)
    if sampler in WINDOW_SAMPLERS:
        return window_rows(sampler, steps, window, 1, guided)
    return 2 if guided else 1


def rows_per_image(steps: int, num_blocks: int | None, guided: bool, pipelined: bool, max_iters: int | None) -> int:
    from .runtime.sampler import rows_needed

    return rows_needed(steps, num_blocks, 1, guided, pipelined, max_iters)


def check_batch(cond_model: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A model whose output does not match its input's shape is an error, never silently broadcast
    (shape metadata only: no host sync)."""

    def checked(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        out = cond_model(x, t, cond)
        if out.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for an input of {tuple(x.shape)}")
        return out

    return checked


def _check_finite(sample: Tensor, sampler: str) -> Tensor:
    """Once per call, after sampling (one host sync, off the critical path): NaN/Inf is NonFiniteError."""
    if not bool(torch.isfinite(sample).all()):
        raise NonFiniteError(f"{sampler}: NaN/Inf in the sample (a model returning NaN, fp16 overflow, an extreme "
                             "--guidance-scale); no image written")
    return sample


def _timing(timing, elapsed: float) -> dict:
    return {"first_call": timing.first_call, "setup_s": timing.setup_s, "wall_time_s": elapsed}


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def _merge_chunks(parts: list[dict]) -> dict:
    """One chunk's stats as they are; several: counts summed, sequential calls and times per chunk summed,
    iterations the max, converged only if every chunk did."""
    if len(parts) == 1:
        return parts[0]
    merged = dict(parts[0])
    for key in ("model_evals", "sequential_calls", "wall_time_s", "setup_s"):
        if key in merged:
            merged[key] = sum(p[key] for p in parts)
    if merged.get("iterations") is not None:
        merged["iterations"] = max(p["iterations"] for p in parts)
    merged["converged"] = all(p["converged"] for p in parts)
    merged["first_call"] = any(p.get("first_call") for p in parts)
    if "max_abs_diff_vs_serial" in merged:
        merged["max_abs_diff_vs_serial"] = max(p["max_abs_diff_vs_serial"] for p in parts)
        merged["serial"] = {k: sum(p["serial"][k] for p in parts) if isinstance(v, (int, float)) and not isinstance(v, bool)
                            else v for k, v in parts[0]["serial"].items()}
    merged["residuals"] = [p["residuals"] for p in parts]
    merged["error_estimates"] = [p.get("error_estimates", []) for p in parts]
    return merged


def check_guidance_scale(scale) -> float:
    """A finite scale in [0, MAX_GUIDANCE]: NaN/Inf/1e30 make overflow certain, negative ones invert guidance."""
    scale = float(scale)
    if not (math.isfinite(scale) and 0 <= scale <= MAX_GUIDANCE):
        raise ValueError(f"--guidance-scale must be a finite number in [0, {MAX_GUIDANCE:g}], got {scale}")
    return scale


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, 2^64 - 1], got {seed}")
    return seed


def check_run_args(steps: int, tol: float, num_blocks: int | None, sampler: str, per_prompt: int) -> None:
    """Reject bad settings before any model work (the CLI calls this too, to fail fast with exit code 2).
    Messages name the CLI flags; the API raises ValueError with the same text."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be an integer >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"--steps must be <= {MAX_STEPS}, got {steps}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"--tol must be a finite number >= 0, got {tol}")
    if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int)
                                   or not 1 <= num_blocks <= steps):
        raise ValueError(f"--blocks must be in [1, --steps={steps}], got {num_blocks}")
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise ValueError(f"--num-images must be an integer >= 1, got {per_prompt}")


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


def solver_grid(loaded: LoadedUNet, steps: int, device) -> tuple[Tensor, Any, str]:
    """(grid, schedule, prediction_type) the samplers run: DDIM timesteps + alphas_cumprod, or for a flow model the
    scheduler's sigma grid + the flow Euler solver (samplers/flow.py)."""
    if loaded.spec.prediction_type == "flow":
        from .samplers.flow import FLOW_PREDICTION, FlowMatchEuler, flow_sigmas

        seq = (loaded.sample_shape[1] // 2) * (loaded.sample_shape[2] // 2)  # the pipelines' image_seq_len
        return flow_sigmas(loaded.scheduler_config, steps, image_seq_len=seq), FlowMatchEuler(), FLOW_PREDICTION
    timesteps, alphas_cumprod = ddim_grid(loaded.scheduler_config, steps)
    prediction_type = loaded.scheduler_config.get("prediction_type", loaded.spec.prediction_type)
    return timesteps, alphas_cumprod.to(device), prediction_type
