"""The artifact key: a hash of everything that makes a plan valid.

Two exports with the same key produce interchangeable artifacts, so the second one reuses the first. Anything
that changes the ONNX graph or the plan (weights, dtype, shapes, profiles, exporter, TensorRT flavour/version,
target GPUs) belongs in the key; anything that does not (output folder, log verbosity) must stay out of it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_LENGTH = 16  # hex digits: 64 bits is plenty for a folder of builds and keeps paths short


def artifact_key(fields: dict[str, Any]) -> str:
    """Stable hash of a JSON-serialisable dict (key order does not matter)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]
