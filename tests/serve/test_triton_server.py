"""A real Triton server (the tritonserver binary that the nvidia-pytriton wheel bundles, Python backend only) serves
the repository `python -m srds_trt.export --triton-repo` writes, and a request through it gives `generate`'s
pixels. The repository's UNet model is a TensorRT plan, which this machine cannot run (no GPU, and the bundled
server has no TensorRT backend): the test swaps in an ONNX Runtime stand-in, a Python-backend model with the same
name, inputs and outputs that runs the same export's model.onnx. The sampler model is the repository's own.

Skipped unless a tritonserver is found: SRDS_TRITONSERVER_DIR (the wheel's pytriton/tritonserver folder) or an
installed `pytriton` package (nvidia-pytriton pins numpy 1.x, so it is not in the dev extra); its Python-backend
stub needs NumPy 1.x on its path (SRDS_TRITON_STUB_PATH, see below) where the environment has NumPy 2."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.http")
from serve_helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow

UNET_STAND_IN = '''"""ONNX Runtime stand-in for the TensorRT UNet model: same name, inputs and outputs (test only)."""
import json

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.session = ort.InferenceSession(config["parameters"]["onnx"]["string_value"],
                                            providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.names}
            (out,) = self.session.run(["model_output"], feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("model_output", out)]))
        return responses
'''


def _tritonserver() -> Path | None:
    folder = os.environ.get("SRDS_TRITONSERVER_DIR")
    if folder is None and importlib.util.find_spec("pytriton") is not None:
        folder = str(Path(importlib.util.find_spec("pytriton").origin).parent / "tritonserver")
    return Path(folder) if folder and (Path(folder) / "bin" / "tritonserver").is_file() else None


def _onnx_stand_in(repo: Path, folder: Path, unet: str) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((repo / unet / "config.pbtxt").read_text(), mc.ModelConfig())
    stand_in = mc.ModelConfig(name=unet, backend="python", max_batch_size=0)
    stand_in.input.extend(config.input)
    stand_in.output.extend(config.output)
    stand_in.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    onnx = next(folder.glob("*.onnx"))
    stand_in.parameters["onnx"].string_value = str(onnx)
    shutil.rmtree(repo / unet)
    (repo / unet / "1").mkdir(parents=True)
    (repo / unet / "config.pbtxt").write_text(text_format.MessageToString(stand_in))
    (repo / unet / "1" / "model.py").write_text(UNET_STAND_IN)


def test_real_triton_serves_the_repository_and_matches_generate(tmp_path):
    server = _tritonserver()
    if server is None:
        pytest.skip("no tritonserver (set SRDS_TRITONSERVER_DIR or install nvidia-pytriton)")
    if sys.version_info[:2] != (3, 11) and not (server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}").is_dir():
        pytest.skip("no Python-backend stub for this Python")
    import tritonclient.http as http

    from srds_trt import SRDSPipeline
    from srds_trt.export.build import export_unet
    from srds_trt.export.config import ExportConfig
    from srds_trt.models import load_unet
    from srds_trt.serve.triton.repo import write_triton_repo

    torch.set_num_threads(1)
    result = export_unet(load_unet("digits"), ExportConfig(model="digits", out=tmp_path / "engines", dtype="fp32",
                                                           min_batch=1, max_batch=64), quiet=True)
    repo = tmp_path / "repo"
    write_triton_repo(result.folder, repo)
    _onnx_stand_in(repo, result.folder, "digits_unet")
    # the Python-backend stub starts its interpreter without reading PYTHONPATH: "srds_trt installed in the backend's
    # env" is, here, this checkout and this virtualenv put on sys.path first thing in each model.py
    root = Path(__file__).resolve().parents[2]
    # The bundled stub is built against NumPy 1.x (nvidia-pytriton pins numpy<2): under NumPy 2 it decodes a BYTES
    # tensor's buffer wrongly and aborts. SRDS_TRITON_STUB_PATH puts e.g. a numpy 1.26 folder first on its path.
    extra = [p for p in os.environ.get("SRDS_TRITON_STUB_PATH", "").split(os.pathsep) if p]
    if not extra and np.__version__.startswith("2"):
        pytest.skip("the tritonserver stub needs NumPy 1.x: set SRDS_TRITON_STUB_PATH to a folder holding numpy<2")
    prefix = f"import sys\nsys.path[:0] = {[*extra, str(root), sysconfig.get_paths()['purelib']]!r}\n"
    for model in ("digits", "digits_unet"):
        path = repo / model / "1" / "model.py"
        path.write_text(prefix + path.read_text())
    stub = server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    backends = tmp_path / "backends"
    shutil.copytree(server / "backends", backends)
    shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    for binary in (server / "bin" / "tritonserver", backends / "python" / "triton_python_backend_stub"):
        binary.chmod(0o755)
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    libs = server.parent.parent / "nvidia_pytriton.libs"  # the stub's libcudart (its rpath is relative to the wheel)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), sysconfig.get_paths()["purelib"]]),
           "OMP_NUM_THREADS": "1",
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))}
    log = (tmp_path / "tritonserver.log").open("w")
    proc = subprocess.Popen([str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={backends}", f"--http-port={port}", f"--grpc-port={grpc_port}",
                             f"--metrics-port={metrics_port}", "--allow-gpu-metrics=false"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                index = client.get_model_repository_index()
            except Exception:  # noqa: BLE001 - not listening yet
                index = []
            states = {m.get("name"): m for m in index}
            if all(states.get(n, {}).get("state") == "READY" for n in ("digits", "digits_unet")):
                break
            failed = [m for m in index if m.get("state") == "UNAVAILABLE"]
            assert not failed, (failed, (tmp_path / "tritonserver.log").read_text()[-3000:])
            assert proc.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("Triton did not load the models in 240 s:\n" + (tmp_path / "tritonserver.log").read_text()[-3000:])
        inputs = []
        for name, array, dtype in (("prompt", np.array([b"3", b"7"], dtype=object), "BYTES"),
                                   ("seed", np.array([5], dtype=np.int64), "INT64"),
                                   ("steps", np.array([8], dtype=np.int32), "INT32")):
            tensor = http.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        reply = client.infer("digits", inputs)
        image = reply.as_numpy("image")
        stats = json.loads(reply.as_numpy("stats")[0])
        out = SRDSPipeline.from_pretrained("digits")(["3", "7"], num_inference_steps=8, generator=5, progress_bar=False)
        expected = np.stack([np.asarray(i) for i in out.images])[..., None]
        # ONNX Runtime vs torch kernels differ by ~1e-6: a pixel at a rounding boundary may move one level
        assert image.shape == expected.shape and np.abs(image.astype(int) - expected.astype(int)).max() <= 1
        assert (image != expected).mean() < 0.01, (image != expected).mean()
        assert stats["sampler"] == "srds" and stats["steps"] == 8
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        log.close()
