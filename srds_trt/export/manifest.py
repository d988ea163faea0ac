"""The manifest: everything a runtime (ours or a C++ service) needs to load and drive the artifacts.

Written last into the temporary folder, so a folder with a manifest is a finished export. Schema-versioned:
readers refuse a schema they do not know rather than guess.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

SCHEMA = "srds_trt.unet-artifacts/1"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "unet.plan"


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
