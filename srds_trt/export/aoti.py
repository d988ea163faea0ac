"""What the C/C++ runtime (cpp/, libsrds_trt) loads from an export: the UNet as an AOTInductor package with a
dynamic row dimension, and `sampler.json` (noise schedule, timestep spacing, conditioning spec, stopping-rule
constants). Both are listed and hashed in the manifest like the ONNX model and the TensorRT plan.

The C++ side builds the timestep grid and the SRDS tick plan itself (for any N the caller asks, no Python at run
time) from these inputs; tests/cpp/test_c_abi.py proves its grids and plans equal noise_schedule.py's and
schedule.py's over many (N, blocks). What would otherwise be a second copy of a Python constant (alphas_cumprod,
the stopping rule's constants, the guidance row layout) is read from sampler.json instead.

Compiling the package takes minutes on a small CPU (the digits UNet: ~5 min on 2 busy cores), so packages are
cached under SRDS_TRT_AOTI_CACHE (default ~/.cache/srds_trt/aoti), keyed by everything that changes the compiled
code: weights id, dtype, shapes, row range, torch version, the CPU's vector ISA and this module's format number.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..samplers.stopping import DEFAULT_TOL, FAST_CONTRACTION, INTERIOR_CONTRACTION, INTERIOR_WEIGHT, WINDOW_ACCEPT
from .manifest import artifact_key

AOTI_NAME = "unet.pt2"
SAMPLER_NAME = "sampler.json"
SAMPLER_SCHEMA = "srds_trt.sampler/1"
# One package covers 1..MAX_ROWS engine rows; a C++ call with more rows runs in chunks of at most this many.
MAX_ROWS = 256
AOTI_FORMAT = 1  # bump when the exported graph changes for the same inputs
CACHE_ENV = "SRDS_TRT_AOTI_CACHE"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class AOTIError(RuntimeError):
    """The UNet cannot be exported or compiled as an AOTInductor package; the message is one line."""


def aoti_unsupported() -> str | None:
    """Why this torch cannot build AOTInductor packages, or None when it can."""
    if not hasattr(torch._inductor, "aoti_compile_and_package") or not hasattr(torch, "export"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package (needs torch >= 2.6)"
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "srds_trt" / "aoti")


def vector_isa() -> str:
    """The CPU vector ISA inductor compiles for (a package built for avx512 does not run on an avx2 machine)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "none"


@contextmanager
def batch_oblivious_upsampling(module: torch.nn.Module) -> Iterator[None]:
    """Run diffusers' Upsample2D without its `if hidden_states.shape[0] >= 64: .contiguous()` branch.

    That Python branch on the batch size is where torch.export's `2 <= rows <= 63` guard comes from: the example
    input (< 64 rows) fixes which side of the branch the graph takes. `.contiguous()` never changes values, so
    calling it always is the same function for every row count. Only the plain path (nearest x2 interpolation,
    then the conv) is replaced; other configurations keep diffusers' forward (and then fail with the guard).
    """
    from diffusers.models.upsampling import Upsample2D

    patched = []
    for sub in module.modules():
        if (isinstance(sub, Upsample2D) and sub.norm is None and not sub.use_conv_transpose and sub.interpolate
                and "forward" not in sub.__dict__):
            sub.forward = _plain_upsample(sub)
            patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub.forward


def _plain_upsample(sub: torch.nn.Module):
    def forward(hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = torch.nn.functional.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = torch.nn.functional.interpolate(hidden_states, size=output_size, mode="nearest")
        if sub.use_conv:
            hidden_states = sub.conv(hidden_states) if sub.name == "conv" else sub.Conv2d_0(hidden_states)
        return hidden_states

    return forward


@dataclass(frozen=True)
class PackageSpec:
    """Everything that changes the compiled package (its cache key)."""

    weights_id: str
    dtype: str  # fp32 | fp16
    conditioning: str  # class | text
    sample_shape: tuple[int, ...]  # (C, H, W)
    cond_shape: tuple[int, ...]  # () for class ids, (L, D) for text
    max_rows: int = MAX_ROWS

    def key(self) -> str:
        return artifact_key({"weights_id": self.weights_id, "dtype": self.dtype, "conditioning": self.conditioning,
                             "sample_shape": list(self.sample_shape), "cond_shape": list(self.cond_shape),
                             "max_rows": self.max_rows, "torch": torch.__version__, "isa": vector_isa(),
                             "format": AOTI_FORMAT})

    def example(self, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = TORCH_DTYPES[self.dtype]
        sample = torch.randn(rows, *self.sample_shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        timestep = torch.linspace(999.0, 0.0, rows)
        if self.conditioning == "class":
            cond = torch.zeros(rows, dtype=torch.long)
        else:
            cond = torch.zeros(rows, *self.cond_shape, dtype=dtype)
        return sample, timestep, cond


def compile_package(module: torch.nn.Module, spec: PackageSpec, dest: Path, *,
                    cache_dir: Path | None = None) -> tuple[float, bool]:
    """Write the AOTInductor package of `module` (sample, timestep, cond) -> output to `dest`.

    Returns (seconds, from_cache). The package is taken from `cache_dir` when one with the same key exists
    (pass cache_dir=None for default_cache_dir()); a fresh compile is stored there atomically.
    """
    reason = aoti_unsupported()
    if reason:
        raise AOTIError(reason)
    cache = (cache_dir or default_cache_dir()) / f"{spec.key()}.pt2"
    start = time.perf_counter()
    if cache.is_file():
        shutil.copyfile(cache, dest)
        return time.perf_counter() - start, True
    rows = torch.export.Dim("rows", min=1, max=spec.max_rows)
    try:
        with batch_oblivious_upsampling(module), torch.no_grad():
            program = torch.export.export(module, spec.example(), dynamic_shapes=({0: rows}, {0: rows}, {0: rows}))
        built = torch._inductor.aoti_compile_and_package(program, package_path=str(dest))
    except (OSError, KeyboardInterrupt):
        raise
    except Exception as exc:  # torch.export / inductor raise many types; one line with the cause
        first = str(exc).strip().splitlines()
        raise AOTIError(f"AOTInductor export of the UNet failed: {type(exc).__name__}: "
                        f"{' '.join(first[:2]) if first else ''}") from None
    if Path(built) != dest:
        shutil.move(built, dest)
    seconds = time.perf_counter() - start
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, prefix=".tmp-", suffix=".pt2", delete=False) as tmp:
            pass
        shutil.copyfile(dest, tmp.name)
        os.replace(tmp.name, cache)
    except OSError:  # a read-only cache is a slower next export, not a failure
        pass
    return seconds, False


def sampler_spec(*, scheduler_config: dict[str, Any], prediction_type: str, conditioning: str,
                 sample_shape: tuple[int, ...], cond_shape: tuple[int, ...], null_class: int | None,
                 class_names: list[str] | None, default_guidance_scale: float | None, dtype: str,
                 max_rows: int = MAX_ROWS) -> dict[str, Any]:
    """sampler.json: what the C++ runtime needs beyond the package to run the samplers exactly as Python does."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config)
    alphas = scheduler.alphas_cumprod.to(torch.float64).tolist()
    return {
        "schema": SAMPLER_SCHEMA,
        "package": {"file": AOTI_NAME, "min_rows": 1, "max_rows": max_rows, "dtype": dtype,
                    "inputs": ["sample", "timestep", "cond"], "torch": torch.__version__, "isa": vector_isa()},
        "prediction_type": prediction_type,
        "sample_shape": list(sample_shape),
        "schedule": {
            "num_train_timesteps": int(scheduler.config.num_train_timesteps),
            "timestep_spacing": str(scheduler.config.timestep_spacing),
            "steps_offset": int(scheduler.config.steps_offset),
            "set_alpha_to_one": bool(scheduler.config.set_alpha_to_one),
            "alphas_cumprod": alphas,  # float64, written with repr precision: read back bit for bit
        },
        "conditioning": {"kind": conditioning, "cond_shape": list(cond_shape), "null_class": null_class,
                         "num_classes": (null_class + 1) if conditioning == "class" and null_class is not None else None,
                         "class_names": class_names,
                         "note": "class: one int64 class id per image (null_class = unconditional); text: the "
                                 "prompt embeddings [L, D] per image, encoded by the caller"},
        "guidance": {"row_layout": ["uncond", "cond"], "default_scale": default_guidance_scale},
        "stopping": {"default_tol": DEFAULT_TOL, "interior_contraction": INTERIOR_CONTRACTION,
                     "fast_contraction": FAST_CONTRACTION, "interior_weight": INTERIOR_WEIGHT,
                     # sliding-window samplers: per-point threshold = min(fraction * tol, cap) (window_accept_tol)
                     "window_accept": {name: list(v) for name, v in WINDOW_ACCEPT.items()}},
    }


def write_sampler_spec(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / SAMPLER_NAME
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def check_runtime_supports(loaded: Any) -> None:
    """The C/C++ runtime runs DDIM grids only (sampler.json carries alphas_cumprod): refuse flow models up front."""
    if getattr(loaded.spec, "prediction_type", None) == "flow":
        raise AOTIError(f"{loaded.spec.name} is a flow-matching model: the C/C++ runtime runs DDIM grids only; "
                        "export it without --aoti")


def write_runtime_files(module: torch.nn.Module, loaded: Any, dtype: str, folder: Path, *,
                        sample_shape: tuple[int, ...] | None = None,
                        cache_dir: Path | None = None) -> tuple[list[Path], dict[str, Any]]:
    """Write unet.pt2 and sampler.json for a loaded registry UNet into `folder`; ([paths], manifest section).
    sample_shape: the exported (C, H, W) when --height/--width differ from the model's own."""
    check_runtime_supports(loaded)
    sample_shape = tuple(int(s) for s in (sample_shape or loaded.sample_shape))
    cond_shape = tuple(int(s) for s in loaded.cond_shape)
    spec = PackageSpec(loaded.weights_id, dtype, loaded.conditioning, sample_shape, cond_shape)
    seconds, cached = compile_package(module, spec, folder / AOTI_NAME, cache_dir=cache_dir)
    meta = _digits_meta(loaded)
    sampler = sampler_spec(
        scheduler_config=dict(loaded.scheduler_config),
        prediction_type=getattr(loaded.spec, "prediction_type", None) or "epsilon",
        conditioning=loaded.conditioning, sample_shape=sample_shape, cond_shape=cond_shape,
        null_class=loaded.null_class, class_names=meta.get("class_names"),
        default_guidance_scale=meta.get("default_guidance_scale"), dtype=dtype)
    path = write_sampler_spec(folder, sampler)
    section = {"package": AOTI_NAME, "sampler": SAMPLER_NAME, "dtype": dtype, "min_rows": 1,
               "max_rows": spec.max_rows, "torch": torch.__version__, "isa": vector_isa(), "cache_key": spec.key(),
               "compile_seconds": round(seconds, 3), "from_cache": cached}
    return [folder / AOTI_NAME, path], section


def _digits_meta(loaded: Any) -> dict[str, Any]:
    source = Path(str(getattr(loaded.spec, "source", "")))
    meta = source / "digits_meta.json" if source.is_dir() else None
    if meta is not None and meta.is_file():
        return json.loads(meta.read_text())
    return {}
