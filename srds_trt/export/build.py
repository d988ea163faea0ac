"""The export pipeline: reference → ONNX → parity gate → TensorRT plan → manifest, into a temporary folder that is
renamed to `out/<model>/<key>/` only when everything succeeded. An existing folder with the same key is verified
and reused instead of rebuilt. Two processes exporting the same key at once are not coordinated: the later one
replaces the earlier one's folder, or fails with one line (its temporary folder removed) if the renames collide.

A temporary folder is held by an advisory lock (fcntl.flock on `.tmp-*/.lock`) for the life of its export; the
kernel drops the lock when the process dies, even by SIGKILL. Each export removes the unlocked `.tmp-*` folders
it finds beside its own (left by killed exports) and leaves locked ones (a concurrent export) alone.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import os
import sys
import time
from contextlib import contextmanager
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, TextIO

import numpy as np
import torch

from . import aoti, model_source
from .artifacts import ArtifactError, tensorrt_module, verify_artifacts
from .config import ExportConfig
from .io_contract import IOContract, io_contract, sample_inputs
from .manifest import PLAN_NAME, SCHEMA, artifact_key, file_entries, safe_folder_name, to_json, write_manifest
from .onnx_export import DATA_NAME, ONNX_NAME, decompose_rms_norm, export_module, export_onnx, use_upcasting_attention
from .parity import ParityError, check_parity, parity_rows, reference_outputs
from .trt_build import BuildTarget, build_tensorrt_plan, build_target, capture_flag

# Bump when the exported graph changes for the same inputs (e.g. the attention implementation), so old keys miss.
EXPORT_FORMAT = 2  # 2: plans built with REQUIRE_USER_ALLOCATION where the flavour has it
GUIDANCE_NOTE = ("classifier-free guidance runs in one call of 2n rows: rows [0, n) unconditional (null class / "
                 "empty-prompt embeddings), rows [n, 2n) conditional; guided = uncond + s * (cond - uncond)")


class ExportError(RuntimeError):
    """An export that cannot proceed; the message is one line for the user."""


@dataclass
class StageLog:
    """A staged log with times: `[export] 2/5 onnx ... done in 1.3 s`, to stderr, silenced by quiet=True."""

    total: int
    quiet: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    times: dict[str, float] = field(default_factory=dict)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"[export] {text}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[list[str]]:
        """Time a stage; details appended to the yielded list are printed on its line."""
        index = len(self.times) + 1
        self.note(f"{index}/{self.total} {name} ...")
        start = time.perf_counter()
        self.times[name] = float("nan")  # claims the index even if the stage fails
        details: list[str] = []
        yield details
        self.times[name] = time.perf_counter() - start
        self.note(f"{index}/{self.total} {name} done in {self.times[name]:.1f} s{': ' + ', '.join(details) if details else ''}")


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    manifest: dict[str, Any]
    reused: bool


def export_model(config: ExportConfig, *, quiet: bool = False) -> ExportResult:
    """Export a registry model; cheap checks (TensorRT present, name known, out writable) precede weight loading."""
    trt = tensorrt_module()
    check_opset(config.onnx_opset)
    model_source.check_model(config.model)  # cheap: an unknown name fails before any weights are read
    ensure_writable(config.out)
    return export_unet(model_source.load_model(config), config, quiet=quiet, trt=trt)


def check_opset(opset: int) -> None:
    """Refuse an opset newer than the installed onnx knows (torch.onnx would fail after the model loaded)."""
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ExportError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} supports "
                          f"(at most {newest})")


def ensure_writable(out: Path) -> None:
    """Fail with one line if `out` cannot hold an export; leaves no folder it created behind."""
    created = _missing_parents(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ExportError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
    finally:
        _remove_empty(created)


def pixels_per_sample(loaded: Any) -> int:
    """1 for pixel-space models (digits), the VAE's downsampling (8) for latent ones."""
    return max(1, loaded.spec.resolution // loaded.sample_shape[1])


def spatial_shape(loaded: Any, config: ExportConfig) -> tuple[int, ...]:
    """UNet input (C, H, W) for the requested image size; SD latents are the image size / the VAE factor."""
    channels, height, width = loaded.sample_shape
    if config.height is None:
        return channels, height, width
    # Every UNet down-sampling halves the size, and the skip connections need it to halve exactly.
    blocks = getattr(loaded.unet.config, "block_out_channels", None)  # a transformer: patches of 2 latents
    step = pixels_per_sample(loaded) * (2 ** (len(blocks) - 1) if blocks else 2)
    if config.height % step or config.width % step:
        raise ExportError(f"--height/--width must be multiples of {step} for {loaded.spec.name}")
    factor = pixels_per_sample(loaded)
    return channels, config.height // factor, config.width // factor


def export_unet(
    loaded: Any, config: ExportConfig, *, quiet: bool = False, trt: tuple[ModuleType, str] | None = None
) -> ExportResult:
    """Export an already loaded UNet (a registry `LoadedUNet` or anything with its fields).

    Takes ownership of `loaded.unet`: its attention processor is replaced, for fp16 it is cast in place after
    the fp32 reference outputs are computed (holding two copies of an SD UNet would cost 5 GB), and its weights
    are released once the ONNX files are written (unless --aoti compiles them after the plan): the parity gate
    holds an ONNX Runtime session and the plan build the parsed ONNX and the plan, and SD3-medium's fp32 export
    was killed at 24 GB with the PyTorch copy still alive.
    """
    trt_module, flavour = trt or tensorrt_module()
    target = build_target(trt_module, flavour)
    sample_shape = spatial_shape(loaded, config)
    contract = io_contract(loaded.conditioning, sample_shape, tuple(loaded.cond_shape), config.dtype)
    factor = pixels_per_sample(loaded)
    image_size = (sample_shape[1] * factor, sample_shape[2] * factor)  # pixels, as --height/--width take them
    min_b, opt_b, max_b = config.batch_range
    request = {
        "dtype": config.dtype, "min_batch": min_b, "opt_batch": opt_b, "max_batch": max_b,
        "height": image_size[0], "width": image_size[1], "profiles": config.profiles,
        "opset": config.onnx_opset, "exporter": config.exporter, "random_weights": config.random_weights,
        "weights_id": loaded.weights_id, "flavour": flavour, "version": trt_module.__version__,
    }
    if config.aoti:  # only then, so keys of exports without the C++ runtime's files stay what they were
        aoti.check_runtime_supports(loaded)  # before any export work
        request["aoti"] = True
    key = artifact_key({**request, "io": [s.as_json() for s in contract.all], "target": target.as_json(),
                        "export_format": EXPORT_FORMAT})
    model_dir = config.out / safe_folder_name(loaded.spec.name)
    final = model_dir / key
    log = StageLog(total=5 + config.aoti, quiet=quiet)

    reused = _reuse(final, flavour, trt_module.__version__, log)
    if reused is not None:
        return ExportResult(final, reused, True)

    created = _missing_parents(model_dir)
    lock = None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(model_dir)
        if removed:
            log.note(f"removed {len(removed)} temporary folder(s) of killed exports: {', '.join(removed)}")
        tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".tmp-{key}-"))
        lock = _hold_lock(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the published folder private to this user
    except OSError as exc:
        _remove_empty(created)
        raise ExportError(f"output folder {config.out} is not writable: {exc.strerror or exc}") from None
    try:
        manifest = _build(loaded, config, contract, request, key, target, (trt_module, flavour), tmp, log)
        (tmp / LOCK_NAME).unlink()  # the lock stays held on the open descriptor until the rename is done
        if final.exists():  # a stale or damaged folder with our key (a good one was reused above)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:  # full disk, a rename collision with a concurrent export, a vanished folder
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise ExportError(f"cannot write the export under {model_dir}: {exc.strerror or exc}"
                          f"{' (' + str(exc.filename) + ')' if exc.filename else ''}; nothing was kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    finally:
        os.close(lock)
    log.note(f"artifacts in {final}")
    return ExportResult(final, manifest, False)


LOCK_NAME = ".lock"
UNLOCKED_GRACE_S = 600  # a folder without a lock file is another version's or one being created: wait this long


def _hold_lock(tmp: Path) -> int:
    fd = os.open(tmp / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new folder: never contended
    return fd


def remove_stale_temporaries(model_dir: Path) -> list[str]:
    """Remove `.tmp-*` folders under `model_dir` whose export is gone (lock free); return their names."""
    removed = []
    for tmp in sorted(model_dir.glob(".tmp-*")):
        lock_path = tmp / LOCK_NAME
        try:
            if not lock_path.exists():
                if time.time() - tmp.stat().st_mtime < UNLOCKED_GRACE_S:
                    continue
            else:
                fd = os.open(lock_path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live export holds it
                finally:
                    os.close(fd)
        except FileNotFoundError:
            continue  # its export just finished or cleaned up
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp.name)
    return removed


def _reuse(final: Path, flavour: str, version: str, log: StageLog) -> dict[str, Any] | None:
    if not (final / "manifest.json").exists():
        return None
    try:
        manifest = verify_artifacts(final, flavour=flavour, version=version, target=None)
    except ArtifactError as exc:
        log.note(f"existing artifacts unusable, rebuilding: {exc}")
        return None
    log.note(f"reusing {final} (same key, files verified)")
    return manifest


def release_weights(module: torch.nn.Module) -> None:
    """Free a module's parameters and buffers (moved to the meta device: any later call raises at once)."""
    import gc

    torch.nn.Module.to(module, "meta")  # not diffusers' override (it refuses some devices, warns on others)
    gc.collect()


def _build(
    loaded: Any, config: ExportConfig, contract: IOContract, request: dict[str, Any], key: str,
    target: BuildTarget, trt: tuple[ModuleType, str], tmp: Path, log: StageLog,
) -> dict[str, Any]:
    unet = loaded.unet.eval()
    use_upcasting_attention(unet)  # before the reference, so reference and export share the attention code
    decompose_rms_norm(unet)  # likewise (Flux's q/k norms)
    module = export_module(loaded)
    num_classes = (loaded.null_class or 0) + 1 if loaded.conditioning == "class" else 0
    t_max = 1.0 if loaded.spec.prediction_type == "flow" else 999.0  # flow models take sigma
    feeds = [sample_inputs(contract, rows, seed=config.seed, num_classes=num_classes, timestep_max=t_max)
             for rows in parity_rows(request["min_batch"], request["max_batch"])]

    with log.stage("reference (PyTorch fp32)") as info:
        references = reference_outputs(module.float(), feeds)
        info.append(f"rows {[f['sample'].shape[0] for f in feeds]}")
    with log.stage(f"onnx ({config.dtype}, opset {config.onnx_opset}, {config.exporter} exporter)") as info:
        if config.dtype == "fp16":
            module.half()
        example = {k: torch.from_numpy(v) for k, v in sample_inputs(contract, 2, seed=config.seed, num_classes=num_classes,
                                                                      timestep_max=t_max).items()}
        try:
            onnx_files = export_onnx(module, contract, example, tmp, opset=config.onnx_opset, exporter=config.exporter)
        except (OSError, KeyboardInterrupt):
            raise
        except Exception as exc:  # torch.onnx's errors are many types; the user needs the flags and the cause
            raise ExportError(f"ONNX export failed (--opset {config.onnx_opset}, --exporter {config.exporter}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        info.append(", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in onnx_files))
    if not config.aoti:  # the gate compares with the references, the plan reads the ONNX: the weights would
        release_weights(unet)  # only add their size to ONNX Runtime's and TensorRT's peaks (--aoti compiles them later)
    with log.stage("parity (ONNX Runtime vs PyTorch)") as info:
        try:
            parity = check_parity(tmp / ONNX_NAME, feeds, references, config.tolerance)
        except (ParityError, OSError, KeyboardInterrupt):
            raise
        except Exception as exc:  # ONNX Runtime's own errors (Fail, InvalidGraph, NotImplemented, ...)
            raise ParityError(f"ONNX Runtime could not run the export (--opset {config.onnx_opset}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        info.append(f"max abs {parity.max_abs:.3g}, rel {parity.max_rel:.3g} <= {parity.tolerance:.3g}")
    trt_module, flavour = trt
    with log.stage(f"TensorRT plan ({flavour} {trt_module.__version__})") as info:
        cache = config.out / ".timing-cache" / f"{flavour}-{trt_module.__version__}-{'_'.join(target.compute_capabilities)}.cache"
        built = build_tensorrt_plan(trt_module, flavour, tmp / ONNX_NAME, contract, config.batch_range,
                           profiles=config.profiles, target=target, timing_cache=cache)
        (tmp / PLAN_NAME).write_bytes(built.plan)
        info.append(f"build {built.seconds:.1f} s, {len(built.plan) / 2**20:.1f} MiB")
        built = dataclasses.replace(built, plan=b"")  # written: free TensorRT's host copy before hashing
    runtime_files, aoti_section = [], None
    if config.aoti:
        with log.stage("AOTInductor package (C/C++ runtime)") as info:
            runtime_files, aoti_section = aoti.write_runtime_files(
                module, loaded, config.dtype, tmp, sample_shape=tuple(contract.inputs[0].shape[1:]))
            info.append(f"{'cached' if aoti_section['from_cache'] else 'compiled'} in {aoti_section['compile_seconds']:.1f} s")
    published = onnx_files + [tmp / PLAN_NAME] + runtime_files
    for path in published:  # onnx writes external data 0600: a service running as another user must read what
        path.chmod(0o644)  # the manifest lists, like the folder
    with log.stage("manifest") as info:
        manifest = _manifest(loaded, config, contract, request, key, target, trt, parity.as_json(), built,
                             published, log.times)
        if aoti_section is not None:
            manifest["aoti"] = aoti_section
        write_manifest(tmp, manifest)
    return manifest


def _manifest(
    loaded: Any, config: ExportConfig, contract: IOContract, request: dict[str, Any], key: str, target: BuildTarget,
    trt: tuple[ModuleType, str], parity: dict[str, Any], built: Any, files: list[Path], times: dict[str, float],
) -> dict[str, Any]:
    import diffusers
    import onnx
    import onnxruntime

    trt_module, flavour = trt
    spec = loaded.spec
    ranges = {s.name: {"min": list(s.concrete(request["min_batch"])), "opt": list(s.concrete(request["opt_batch"])),
                       "max": list(s.concrete(request["max_batch"]))} for s in contract.inputs}
    return {
        "schema": SCHEMA,
        "key": key,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": spec.name, "family": getattr(spec, "family", None), "source": str(getattr(spec, "source", "")),
            "weights_id": loaded.weights_id, "random_weights": config.random_weights,
            "prediction_type": getattr(spec, "prediction_type", None), "conditioning": loaded.conditioning,
            "null_class": loaded.null_class, "vae_scaling_factor": loaded.vae_scaling_factor,
            "sample_shape": list(contract.inputs[0].shape[1:]), "cond_shape": list(loaded.cond_shape),
        },
        "request": request,
        "io": {"dynamic_axis": "rows", "inputs": [s.as_json() for s in contract.inputs],
               "outputs": [s.as_json() for s in contract.outputs]},
        "num_profiles": config.profiles,
        "profiles": [ranges for _ in range(config.profiles)],
        "profiles_note": "identical profiles; N concurrent execution contexts need N profiles, one each",
        "guidance": {"row_layout": ["uncond", "cond"], "note": GUIDANCE_NOTE},
        "scheduler_config": to_json(dict(loaded.scheduler_config)),
        "onnx": {"file": ONNX_NAME, "external_data": DATA_NAME if any(p.name == DATA_NAME for p in files) else None,
                 "opset": config.onnx_opset,
                 "exporter": config.exporter, "fp16_attention": "upcast to fp32 (classic processor)"
                 if config.dtype == "fp16" else None},
        "parity": parity,
        "tensorrt": {
            "flavour": flavour, "version": trt_module.__version__, "plan": PLAN_NAME, "target": target.as_json(),
            "builder_flags": ["REQUIRE_USER_ALLOCATION"] if capture_flag(trt_module) is not None else [],
            "build_seconds": round(built.seconds, 3), "device_memory_bytes": built.device_memory_bytes,
            "device_memory_note": "activation memory of one execution context (ICudaEngine.device_memory_size_v2); "
                                  "null when the build machine could not deserialise the plan (no supported GPU)",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "stage_seconds": {k: round(v, 3) for k, v in times.items() if v == v},
        # rows -> ms per engine call; filled in by a runtime that measures at warm-up on a GPU (see README).
        "latency_per_rows": None,
        "files": file_entries(files),
    }


def _missing_parents(path: Path) -> list[Path]:
    """The folders `mkdir(parents=True)` would create for `path`, deepest first."""
    missing = []
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return
