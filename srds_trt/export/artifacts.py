"""Loading side: find an export and check it before anything is deserialised.

A TensorRT plan is native code and data for one TensorRT build and a set of GPUs; deserialising a tampered or
mismatched plan is at best a crash. So `verify_artifacts` checks every file's sha256, the TensorRT flavour,
version and target, and that ONNX external data stays inside the artifact folder (the class of CVE-2024-27318 /
CVE-2024-5187: `../x`, absolute paths, symlinks) — all before a plan or ONNX weights are read by anyone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import importlib
from types import ModuleType

from .manifest import MANIFEST_NAME, SCHEMA, safe_folder_name, sha256_file, validate_manifest

__all__ = ["ArtifactError", "read_manifest", "verify_artifacts", "find_artifacts", "load_engine", "tensorrt_module",
           "TensorRTUnavailableError", "check_external_data", "check_files", "normalise_capability",
           "cond_input_name", "verify_onnx", "record_latency", "check_engine_files", "engine_files"]

# `tensorrt` (TensorRT 11, a GPU machine) is preferred over `tensorrt_rtx` (TensorRT-RTX, which builds plans on a
# CPU-only machine but runs them only on RTX-class GPUs). Both expose the builder/runtime API the code here uses.
FLAVOURS = ("tensorrt", "tensorrt_rtx")


class ArtifactError(RuntimeError):
    """Artifacts missing, unreadable, tampered with, or built for another TensorRT / GPU."""


class TensorRTUnavailableError(ImportError):
    """Neither TensorRT flavour can be imported."""


def tensorrt_module() -> tuple[ModuleType, str]:
    """Import whichever TensorRT flavour is installed: (module, "tensorrt" or "tensorrt_rtx")."""
    failures = []
    for name in FLAVOURS:
        try:
            return importlib.import_module(name), name
        except ImportError as exc:  # a broken install is as unusable as a missing one
            failures.append(f"{name}: {exc}")
    raise TensorRTUnavailableError(
        "no TensorRT installed: pip install 'srds_trt[tensorrt]' (TensorRT 11, NVIDIA GPU) or "
        "'srds_trt[tensorrt-rtx]' (TensorRT-RTX, builds on CPU) (" + "; ".join(failures) + ")"
    )


def read_manifest(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(artifact_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"no {MANIFEST_NAME} in {artifact_dir}: not an export folder (or an unfinished one)") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: schema {found!r}, this srds_trt reads {SCHEMA!r}; re-export")
    problem = validate_manifest(manifest)
    if problem is not None:
        raise ArtifactError(f"{path}: malformed manifest: {problem}; re-export")
    return manifest


def normalise_capability(target: str) -> str:
    """'sm_90', 'sm90', 'SM90', '9.0' → '9.0'."""
    text = target.strip().lower().removeprefix("sm").lstrip("_")
    if "." in text:
        return text
    if not text.isdigit() or len(text) < 2:
        raise ArtifactError(f"cannot read compute capability {target!r} (expected e.g. '8.9' or 'sm_89')")
    return f"{text[:-1]}.{text[-1]}"


def _inside(folder: Path, candidate: Path) -> bool:
    return os.path.commonpath([folder, candidate]) == str(folder)


def check_external_data(onnx_path: Path, artifact_dir: Path, allowed: set[str]) -> None:
    """Refuse external-data locations that leave `artifact_dir` or name files the manifest does not list."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    root = Path(os.path.realpath(artifact_dir))
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        unsafe = (not location or os.path.isabs(location) or Path(location).drive
                  or ".." in Path(location).parts or location.startswith(("/", "\\")))
        target = Path(os.path.realpath(root / location)) if not unsafe else None
        if unsafe or not _inside(root, target) or (root / location).is_symlink():
            raise ArtifactError(f"{onnx_path.name}: external data location {location!r} leaves {artifact_dir}; refused")
        if location not in allowed:
            raise ArtifactError(f"{onnx_path.name}: external data {location!r} is not listed in the manifest; refused")


def check_files(folder: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Each named file is listed in the manifest, a regular file inside `folder`, and matches its sha256."""
    for name in names:
        entry = manifest["files"].get(name)
        path = folder / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{folder}: manifest lists {name!r}, which is not a file of this folder; refused")
        if entry is None:
            raise ArtifactError(f"{folder}: {name} is not listed in the manifest; refused")
        if path.is_symlink() or not path.is_file():
            raise ArtifactError(f"{folder}: {name} is missing or not a regular file")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{folder}: {name} does not match its sha256 in the manifest (modified?); refused")


def engine_files(manifest: dict[str, Any]) -> list[str]:
    """Every file an engine loads: the TensorRT plan, the ONNX model and its external data, the AOTInductor package
    and the sampler spec the C++ runtime reads."""
    names = [manifest["tensorrt"]["plan"], manifest["onnx"]["file"]]
    names += [manifest["onnx"]["external_data"]] if manifest["onnx"].get("external_data") else []
    aoti = manifest.get("aoti")
    if isinstance(aoti, dict):
        names += [aoti.get("package"), aoti.get("sampler")]
    return names


def check_engine_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Each engine file is a plain file name of `folder` and listed (so hashed) in the manifest; checked on the
    names alone, before any file is read. The C++ runtime (cpp/src/runtime.cpp) applies the same rule."""
    for name in manifest["files"]:
        if not _plain_name(name):
            raise ArtifactError(f"{folder}: manifest lists {name!r}, which is not a file of this folder; refused")
    for name in engine_files(manifest):
        if not _plain_name(name):
            raise ArtifactError(f"{folder}: manifest names {name!r} as an engine file, which is not a file of this "
                                "folder; refused")
        if name not in manifest["files"]:
            raise ArtifactError(f"{folder}: engine file {name} is not listed in the manifest's files, so its sha256 "
                                "cannot be checked; refused")


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..") and "\\" not in name


def verify_artifacts(
    artifact_dir: str | os.PathLike, *, flavour: str, version: str, target: str | None
) -> dict[str, Any]:
    """Check an export folder against its manifest; return the manifest. Reads no plan into TensorRT.

    `target` is the compute capability of the GPU that will run the plan ('8.9', 'sm_89'); None skips that check
    (e.g. only inspecting artifacts on a machine without a GPU).
    """
    folder = Path(artifact_dir)
    manifest = read_manifest(folder)
    built = manifest["tensorrt"]
    if built["flavour"] != flavour or built["version"] != version:
        raise ArtifactError(
            f"{folder}: plan built with {built['flavour']} {built['version']}, this runtime has {flavour} {version}; re-export"
        )
    if target is not None:
        capability = normalise_capability(target)
        supported = built["target"]["compute_capabilities"]
        if capability not in supported:
            raise ArtifactError(f"{folder}: plan built for compute capabilities {supported}, this GPU is {capability}; "
                                "re-export on (or for) this GPU")
    check_engine_files(folder, manifest)  # names only: refused before any byte is read
    check_files(folder, manifest, list(manifest["files"]))
    onnx_name = manifest["onnx"]["file"]
    if onnx_name in manifest["files"]:
        check_external_data(folder / onnx_name, folder, set(manifest["files"]))
    return manifest


# What find_artifacts can match on: the manifest's "request" section, plus `rows` (the profile covers it).
MATCH_FIELDS = ("dtype", "min_batch", "opt_batch", "max_batch", "height", "width", "profiles", "opset", "exporter",
                "random_weights", "weights_id", "flavour", "version")
# The export flag that sets each request field (for the advice when nothing fits).
EXPORT_FLAGS = {"dtype": "--dtype", "min_batch": "--min-batch", "opt_batch": "--opt-batch", "max_batch": "--max-batch",
                "height": "--height", "width": "--width", "profiles": "--profiles", "opset": "--opset",
                "exporter": "--exporter", "random_weights": "--random-weights"}


def find_artifacts(engine_dir: str | os.PathLike, model: str, *, rows: int | None = None, **fields: Any) -> Path:
    """The export of `model` under `engine_dir` that fits the run: its profile covers `rows` and its request
    matches every given field (see MATCH_FIELDS). A folder may hold several exports (re-exporting with another
    --max-batch adds one); among those that fit, trained weights win over random ones, then the smallest
    --max-batch (least activation memory), then the newest. When none fits, the ArtifactError names the export command
    and flags that would build one; damaged or foreign-schema folders are skipped and counted in that message.
    """
    unknown = set(fields) - set(MATCH_FIELDS)
    if unknown:
        raise TypeError(f"find_artifacts: unknown fields {sorted(unknown)}; known: {MATCH_FIELDS + ('rows',)}")
    model_dir = Path(engine_dir) / safe_folder_name(model)
    fits, skipped = [], []
    for manifest_path in sorted(model_dir.glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest = read_manifest(manifest_path.parent)
        except ArtifactError as exc:
            skipped.append(f"{manifest_path.parent.name} ({exc})")
            continue
        request = manifest["request"]
        if rows is not None and not request["min_batch"] <= rows <= request["max_batch"]:
            continue
        if all(request.get(k) == v for k, v in fields.items()):
            # Random weights only time the architecture: never chosen over trained ones unless asked for.
            rank = (bool(request.get("random_weights")), request["max_batch"], _negated(manifest.get("created", "")))
            fits.append((rank, manifest_path.parent))
    if fits:
        return min(fits)[1]
    flags = [f"--max-batch {rows}"] if rows is not None else []
    flags += [f"{EXPORT_FLAGS[k]} {v}" if not isinstance(v, bool) else EXPORT_FLAGS[k]
              for k, v in fields.items() if k in EXPORT_FLAGS and v is not False and not (k == "max_batch" and rows)]
    wanted = " ".join(f"{k}={v}" for k, v in (({"rows": rows} if rows is not None else {}) | fields).items())
    note = f"; skipped {len(skipped)} unreadable: {'; '.join(skipped)}" if skipped else ""
    command = " ".join(["python -m srds_trt.export --model", model, "--out", str(engine_dir), *flags])
    raise ArtifactError(f"no export of {model!r} under {engine_dir} fits [{wanted}]; build one with `{command}`{note}")


def _negated(text: str) -> tuple[int, ...]:
    """Sort key putting the newest ISO timestamp first."""
    return tuple(-ord(c) for c in text)


def record_latency(artifact_dir: str | os.PathLike, latency_per_rows: dict[int, float]) -> dict[str, Any]:
    """Store measured ms per engine call by rows in the manifest's `latency_per_rows` (merged with earlier
    measurements; written atomically). The manifest is not among the checksummed files, so this keeps the
    export valid. Meant for a runtime that times its warm-up on the GPU that will serve the plan."""
    folder = Path(artifact_dir)
    manifest = read_manifest(folder)
    merged = dict(manifest.get("latency_per_rows") or {})
    merged.update({str(int(rows)): round(float(ms), 4) for rows, ms in latency_per_rows.items()})
    manifest["latency_per_rows"] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
    problem = validate_manifest(manifest)
    if problem is not None:
        raise ArtifactError(f"latency_per_rows not recorded: {problem}")
    tmp = folder / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def load_engine(artifact_dir: str | os.PathLike, *, target: str | None) -> tuple[Any, dict[str, Any]]:
    """Verify, then deserialise the plan with the installed TensorRT: (ICudaEngine, manifest).

    The order is the point: nothing reaches TensorRT's deserialiser unless `verify_artifacts` passed. Executing
    needs a GPU this TensorRT supports (TensorRT-RTX plans refuse compute capability 9.0, H100/H200).
    """
    trt, flavour = tensorrt_module()
    manifest = verify_artifacts(artifact_dir, flavour=flavour, version=trt.__version__, target=target)
    check_engine_files(Path(artifact_dir), manifest)  # verify_artifacts did; kept beside the read it guards
    plan = (Path(artifact_dir) / manifest["tensorrt"]["plan"]).read_bytes()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    if engine is None:
        raise ArtifactError(f"{artifact_dir}: TensorRT could not deserialise the plan (see its log)")
    return engine, manifest


def cond_input_name(manifest: dict[str, Any]) -> str:
    """The conditioning input of an export: class labels (digits) or text embeddings (SD)."""
    names = [t["name"] for t in manifest["io"]["inputs"]]
    return "class_labels" if "class_labels" in names else "encoder_hidden_states"


def verify_onnx(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """Check the ONNX model (and its external data) against the manifest's sha256 before ONNX Runtime reads it."""
    folder = Path(artifact_dir)
    manifest = read_manifest(folder)
    onnx_name = manifest["onnx"]["file"]
    names = [onnx_name] + ([manifest["onnx"]["external_data"]] if manifest["onnx"].get("external_data") else [])
    check_engine_files(folder, manifest)
    check_files(folder, manifest, names)
    check_external_data(folder / onnx_name, folder, set(manifest["files"]))
    return manifest
