"""The manifest: everything a runtime (ours or a C++ service) needs to load and drive the artifacts, its schema,
and the artifact key that names its folder.

Written last into the temporary folder, so a folder with a manifest is a finished export. Schema-versioned:
readers refuse a schema they do not know rather than guess, and check the fields they read (`validate_manifest`)
before using any, so a hand-edited or truncated manifest is an ArtifactError naming the field, never a KeyError.

The key is a hash of everything that makes a plan valid: two exports with the same key produce interchangeable
artifacts, so the second one reuses the first. Anything that changes the ONNX graph or the plan (weights, dtype,
shapes, profiles, exporter, TensorRT flavour/version, target GPUs) belongs in the key; anything that does not
(output folder, log verbosity, measured latencies) stays out of it.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

SCHEMA = "srds_trt.unet-artifacts/1"  # unchanged by `latency_per_rows`: optional, and old readers ignore it
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "unet.plan"


KEY_LENGTH = 16  # hex digits: 64 bits is plenty for a folder of builds and keeps paths short


def artifact_key(fields: dict[str, Any]) -> str:
    """Stable hash of a JSON-serialisable dict (key order does not matter)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(paths: list[Path]) -> dict[str, dict[str, Any]]:
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}


def safe_folder_name(name: str) -> str:
    """A model name or local path as one folder name (no separators, no dot-only names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name).strip("._")
    return cleaned or "model"


def to_json(value: Any) -> Any:
    """Scheduler configs hold tuples, numpy scalars and FrozenDicts; make them plain JSON."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


# The fields readers use, as {field: type or nested schema}; "?" marks an optional field, None in a type tuple
# allows null. Hand-written rather than JSON Schema (jsonschema): some twenty fields, one 25-line walker, no new
# dependency on the loading side, and the error names the field the way our messages do (`request.max_batch`).
_INT, _STR, _NUM = (int,), (str,), (int, float)
_SHAPE = [int]
_TENSOR = {"name": _STR, "shape": list, "dtype": _STR}
MANIFEST_FIELDS: dict[str, Any] = {
    "schema": _STR, "key": _STR, "created?": _STR,
    "model": {"name": _STR, "conditioning": _STR, "sample_shape": _SHAPE, "cond_shape": _SHAPE,
              "null_class?": (int, type(None)), "prediction_type?": (str, type(None))},
    "request": {"dtype": _STR, "min_batch": _INT, "opt_batch": _INT, "max_batch": _INT, "height": _INT,
                "width": _INT, "profiles": _INT, "weights_id": _STR, "flavour": _STR, "version": _STR,
                "random_weights?": (bool,)},
    "io": {"inputs": [_TENSOR], "outputs": [_TENSOR]},
    "num_profiles": _INT,
    "onnx": {"file": _STR, "external_data?": (str, type(None))},
    "tensorrt": {"flavour": _STR, "version": _STR, "plan": _STR, "target": {"compute_capabilities": [str]}},
    "files": dict,  # {name: {"sha256": str, "bytes": int}}, checked below
    # the C/C++ runtime's files (export --aoti): the AOTInductor package and sampler.json, both listed in files
    "aoti?": {"package": _STR, "sampler": _STR},
    # rows -> ms of one engine call, measured at warm-up on a GPU (None: never measured). Read by --sampler auto.
    "latency_per_rows?": (dict, type(None)),
}
_FILE_ENTRY = {"sha256": _STR, "bytes": _INT}


def validate_manifest(manifest: Any) -> str | None:
    """The first problem found, as 'field: what is wrong', or None when every field readers use is well-typed."""
    problem = _check(manifest, MANIFEST_FIELDS, "")
    if problem is None:
        for name, entry in manifest["files"].items():
            problem = problem or _check(entry, _FILE_ENTRY, f"files.{name}")
    if problem is None and manifest.get("latency_per_rows") is not None:
        for rows, ms in manifest["latency_per_rows"].items():
            if not (rows.isdigit() and isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0):
                return f"latency_per_rows.{rows}: expected a row count mapping to milliseconds >= 0, got {ms!r}"
    return problem


def _check(value: Any, schema: Any, where: str) -> str | None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where or 'manifest'}: expected an object, got {type(value).__name__}"
        for field, sub in schema.items():
            name = field.rstrip("?")
            path = f"{where}.{name}" if where else name
            if name not in value:
                if not field.endswith("?"):
                    return f"{path}: missing"
                continue
            problem = _check(value[name], sub, path)
            if problem:
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where}: expected a list, got {type(value).__name__}"
        for index, item in enumerate(value):
            problem = _check(item, schema[0], f"{where}[{index}]")
            if problem:
                return problem
        return None
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:  # True is an int to Python, never a row count to us
        return f"{where}: expected {'/'.join(t.__name__ for t in types)}, got bool"
    if not isinstance(value, types):
        return f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}"
    return None
