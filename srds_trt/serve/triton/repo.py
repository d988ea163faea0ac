"""A Triton Inference Server model repository from an export (`python -m srds_trt.export ... --triton-repo DIR`).

    DIR/<name>_unet/config.pbtxt   platform tensorrt_plan, max_batch_size 0, dims [-1, ...] (rows), one instance
                                   per optimization profile, CUDA graph specs for the row buckets
    DIR/<name>_unet/1/model.plan   the export's TensorRT plan
    DIR/<name>/config.pbtxt        backend python: the sampler, same inputs/outputs as `python -m srds_trt.serve`
    DIR/<name>/1/model.py          SRDS over the UNet model, called through BLS

Why BLS rather than an engine held inside the Python model: Triton then owns the GPU side (one copy of the plan,
an instance per profile, its CUDA graphs, its memory and metrics) and other models can share the UNet; the
sampler is the project's own pure sampler over `model(x, t)` (sampling.SAMPLERS), each model call one BLS request
of all live rows. The price is a BLS round trip (and host copies) per model call: SRDS makes few sequential calls,
but for a small UNet the in-process runtime (`python -m srds_trt.serve --backend tensorrt`) is faster.
config.pbtxt is written as protobuf text by protobuf itself (tritonclient's model_config_pb2), so it parses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# the export's numpy-style dtypes -> Triton's
TRITON_TYPES = {"float16": "TYPE_FP16", "float32": "TYPE_FP32", "int64": "TYPE_INT64"}
# the server's protocol tensors (srds_trt.serve.protocol.INPUTS) as Triton config types
SAMPLER_INPUTS = {"prompt": ("TYPE_STRING", [-1]), "seed": ("TYPE_INT64", [1]), "steps": ("TYPE_INT32", [1]),
                  "guidance_scale": ("TYPE_FP32", [1]), "sampler": ("TYPE_STRING", [1]), "tol": ("TYPE_FP64", [1])}


class TritonRepoError(ValueError):
    pass


def row_buckets(min_rows: int, max_rows: int) -> list[int]:
    """Powers of two within [min_rows, max_rows], plus max_rows: the row counts CUDA graphs are captured for."""
    buckets, rows = [], 1
    while rows <= max_rows:
        if rows >= min_rows:
            buckets.append(rows)
        rows *= 2
    if max_rows not in buckets:
        buckets.append(max_rows)
    return buckets


def unet_config(manifest: dict[str, Any], name: str):
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc

    request, io = manifest["request"], manifest["io"]

    def tensor(spec):
        if spec["dtype"] not in TRITON_TYPES:
            raise TritonRepoError(f"tensor {spec['name']}: dtype {spec['dtype']} has no Triton type")
        return {"name": spec["name"], "data_type": TRITON_TYPES[spec["dtype"]],
                "dims": [-1 if d == io.get("dynamic_axis", "rows") else int(d) for d in spec["shape"]]}

    graph_specs = [{"input": {s["name"]: {"dim": [rows, *s["shape"][1:]]} for s in io["inputs"]}}
                   for rows in row_buckets(request["min_batch"], request["max_batch"])]
    config = {
        "name": name, "platform": "tensorrt_plan", "max_batch_size": 0,
        "input": [tensor(s) for s in io["inputs"]], "output": [tensor(s) for s in io["outputs"]],
        # one execution context per profile: N concurrent requests need N profiles (manifest profiles_note)
        "instance_group": [{"count": 1, "kind": "KIND_GPU", "profile": [str(p)]}
                           for p in range(manifest["num_profiles"])],
        "optimization": {"cuda": {"graphs": True, "graph_spec": graph_specs}},
        "default_model_filename": "model.plan",
    }
    return json_format.ParseDict(config, mc.ModelConfig())


def sampler_config(manifest: dict[str, Any], name: str, unet_name: str, *, channels: int):
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = {
        "name": name, "backend": "python", "max_batch_size": 0,
        "input": [{"name": n, "data_type": t, "dims": d, "optional": n != "prompt"}
                  for n, (t, d) in SAMPLER_INPUTS.items()],
        "output": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [-1, -1, -1, channels]},
                   {"name": "stats", "data_type": "TYPE_STRING", "dims": [1]}],
        # the sampler loop is host work; the GPU work happens in the UNet model's instances
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {"unet_model": {"string_value": unet_name},
                       "registry_model": {"string_value": manifest["model"]["name"]},
                       "max_rows": {"string_value": str(manifest["request"]["max_batch"])},
                       "unet_dtype": {"string_value": manifest["io"]["inputs"][0]["dtype"]}},
    }
    return json_format.ParseDict(config, mc.ModelConfig())


MODEL_PY = '''"""Triton Python-backend model: SRDS (or serial) sampling over the UNet model through BLS.
Written by srds_trt.serve.triton.repo; the logic lives in srds_trt.serve.triton.sampler (installed in the backend's env)."""

from srds_trt.serve.triton.sampler import TritonPythonModel  # noqa: F401
'''


def write_triton_repo(artifact_dir: str | Path, repo: str | Path, *, name: str | None = None) -> list[Path]:
    """Write (or refresh) the two models of one export into `repo`; returns the files written."""
    from google.protobuf import text_format

    from ...export.artifacts import read_manifest

    artifact_dir, repo = Path(artifact_dir), Path(repo)
    manifest = read_manifest(artifact_dir)
    name = name or manifest["model"]["name"]
    unet_name = f"{name}_unet"
    plan = artifact_dir / manifest["tensorrt"]["plan"]
    if not plan.is_file():
        raise TritonRepoError(f"the export {artifact_dir} has no plan file {plan.name}")
    channels = 3 if manifest["model"]["conditioning"] == "text" else int(manifest["model"]["sample_shape"][0])
    written = []
    for model, config in ((unet_name, unet_config(manifest, unet_name)),
                          (name, sampler_config(manifest, name, unet_name, channels=channels))):
        (repo / model / "1").mkdir(parents=True, exist_ok=True)
        path = repo / model / "config.pbtxt"
        path.write_text(text_format.MessageToString(config))
        written.append(path)
    shutil.copyfile(plan, repo / unet_name / "1" / "model.plan")
    (repo / name / "1" / "model.py").write_text(MODEL_PY)
    (repo / name / "1" / "export_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    written += [repo / unet_name / "1" / "model.plan", repo / name / "1" / "model.py",
                repo / name / "1" / "export_manifest.json"]
    return written
