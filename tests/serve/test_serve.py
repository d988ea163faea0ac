"""python -m srds_trt.serve: the Open Inference Protocol over HTTP, checked with tritonclient.http (the protocol's
own client) against a server on 127.0.0.1. Images are compared with the pipeline's own output for the same seed:
the pixels `generate` saves as PNG."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

tritonclient_http = pytest.importorskip("tritonclient.http")
uvicorn = pytest.importorskip("uvicorn")
from tritonclient.utils import InferenceServerException  # noqa: E402

from srds_trt import SRDSPipeline  # noqa: E402
from srds_trt.serve import BatchConfig, ServeConfig, build_app  # noqa: E402

STEPS = 4  # 2 SRDS blocks: a few seconds per test on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(pipe, batch: BatchConfig):
    port = _free_port()
    app = build_app(pipe, ServeConfig(model="digits", batch=batch, default_steps=STEPS, warmup_steps=2))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{port}", concurrency=16, network_timeout=120)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if client.is_server_ready():
                break
        time.sleep(0.1)
    else:
        raise TimeoutError("the server did not become ready in 120 s")
    try:
        yield client, port, app
    finally:
        client.close()
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return SRDSPipeline.from_pretrained("digits")


@pytest.fixture(scope="module")
def served(pipe):
    served_pipe = pipe
    with _serve(served_pipe, BatchConfig(window_s=0.2, max_batch_images=16, max_queue=64, timeout_s=120)) as s:
        yield s


def _inputs(prompts, seed=None, steps=STEPS, tol=None, sampler=None):
    def tensor(name, array, datatype):
        t = tritonclient_http.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("prompt", np.array([p.encode() for p in prompts], dtype=object), "BYTES")]
    if seed is not None:
        inputs.append(tensor("seed", np.array([seed], dtype=np.int64), "INT64"))
    if steps is not None:
        inputs.append(tensor("steps", np.array([steps], dtype=np.int32), "INT32"))
    if tol is not None:
        inputs.append(tensor("tol", np.array([tol], dtype=np.float64), "FP64"))
    if sampler is not None:
        inputs.append(tensor("sampler", np.array([sampler.encode()], dtype=object), "BYTES"))
    return inputs


def _solo(pipe, prompts, seed, *, levels=False, **kwargs):
    """What `generate --seed` writes for these prompts, as uint8 [n, H, W, 1] (and, with levels=True, the
    unrounded pixel values (x + 1) * 127.5 that images.to_pil rounds)."""
    out = pipe(list(prompts), num_inference_steps=STEPS, generator=seed, progress_bar=False, **kwargs)
    image = np.stack([np.asarray(image) for image in out.images])[..., None]
    if not levels:
        return image
    return image, ((out.samples.double().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()


def assert_equal_up_to_rounding(image, solo, levels, what):
    """Pixels equal, except where the solo run's value sits within 1e-3 of a rounding boundary (x.5 levels):
    float rounding across batch sizes (~1e-6) may flip those by one level, and nothing else."""
    differ = image != solo
    near_half = np.abs(levels - np.floor(levels) - 0.5) < 1e-3
    assert np.abs(image.astype(int) - solo.astype(int)).max() <= 1, what
    assert not (differ & ~near_half).any(), f"{what}: {int((differ & ~near_half).sum())} pixels differ away from a rounding boundary"


def test_single_request_equals_generate_image(served, pipe):
    client, _, _ = served
    result = client.infer("digits", _inputs(["3", "7"], seed=5))
    image = result.as_numpy("image")
    assert image.dtype == np.uint8 and image.shape == (2, 16, 16, 1)
    np.testing.assert_array_equal(image, _solo(pipe, ["3", "7"], 5))
    stats = json.loads(result.as_numpy("stats")[0])
    assert stats["prompts"] == ["3", "7"] and stats["seed"] == 5 and stats["steps"] == STEPS
    # another seed gives other pixels: the seed reaches the noise
    assert not np.array_equal(client.infer("digits", _inputs(["3", "7"], seed=6)).as_numpy("image"), image)


def test_concurrent_requests_batch_and_each_equals_its_solo_run(served, pipe):
    """16 requests at once run as one sampling job (or a few), each with its own seed's noise. tol=0 runs SRDS to
    the serial fixed point, where rows are independent: pixels equal the solo run's up to float rounding across
    batch sizes (a pixel at a x.5 boundary may flip one level). At tol > 0 the stopping rule is batch-wide, so a
    batched image may be a later iterate than its solo run (both within tol of serial)."""
    client, _, _ = served
    seeds = list(range(40, 56))
    requests = [client.async_infer("digits", _inputs([str(s % 10)], seed=s, tol=0.0)) for s in seeds]
    results = [r.get_result() for r in requests]
    batch_sizes = [json.loads(r.as_numpy("stats")[0])["batch_requests"] for r in results]
    assert max(batch_sizes) > 1, f"no request was batched: {batch_sizes}"
    for seed, result in zip(seeds, results):
        solo, levels = _solo(pipe, [str(seed % 10)], seed, tol=0.0, levels=True)
        assert_equal_up_to_rounding(result.as_numpy("image"), solo, levels, f"seed {seed}")


def test_bad_input_gets_400_and_the_server_keeps_serving(served, pipe):
    client, port, _ = served
    cases = [(_inputs(["x"]), "digits prompts must be digits"), (_inputs(["1"], steps=0), "input 'steps'"),
             (_inputs(["1"], sampler="nope"), "input 'sampler'"), (_inputs(["1"], tol=-1.0), "input 'tol'")]
    for inputs, message in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", inputs)
        assert err.value.status() == "400" and message in err.value.message(), err.value
    bad_json = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad_json, timeout=30)
    assert err.value.code == 400 and "JSON" in json.loads(err.value.read())["error"]
    with pytest.raises(InferenceServerException) as err:
        client.infer("nosuchmodel", _inputs(["1"]))
    assert err.value.status() == "404"
    np.testing.assert_array_equal(client.infer("digits", _inputs(["4"], seed=1)).as_numpy("image"), _solo(pipe, ["4"], 1))


def test_json_tensors_like_curl(served):
    """The plain JSON form (what the README's curl sends) gives the same pixels as the binary extension."""
    client, port, _ = served
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["2"]},
                       {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]},
                       {"name": "steps", "datatype": "INT32", "shape": [1], "data": [STEPS]}],
            "outputs": [{"name": "image"}, {"name": "stats"}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
    image = next(o for o in reply["outputs"] if o["name"] == "image")
    assert image["datatype"] == "UINT8" and image["shape"] == [1, 16, 16, 1]
    binary = client.infer("digits", _inputs(["2"], seed=3)).as_numpy("image")
    np.testing.assert_array_equal(np.array(image["data"], dtype=np.uint8).reshape(image["shape"]), binary)


def test_health_metadata_and_metrics(served):
    client, port, _ = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert not client.is_model_ready("nosuchmodel")
    meta = client.get_model_metadata("digits")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        "prompt": "BYTES", "seed": "INT64", "steps": "INT32", "guidance_scale": "FP32", "sampler": "BYTES", "tol": "FP64"}
    assert [o["name"] for o in meta["outputs"]] == ["image", "stats"]
    client.infer("digits", _inputs(["1"]))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    for name in ("srds_request_latency_seconds_bucket", "srds_queue_depth", "srds_batch_images_count",
                 "srds_batch_requests_count", "srds_sampler_iterations_count"):
        assert name in text, name
    assert 'srds_requests_total{code="200",model="digits"}' in text


def test_full_queue_gets_503_and_the_server_recovers(pipe):
    """One request runs, one waits (max_queue=1), the rest are refused at once with 503."""
    with _serve(pipe, BatchConfig(window_s=0.0, max_batch_images=1, max_queue=1, timeout_s=120)) as (client, _, _):
        pending = [client.async_infer("digits", _inputs([str(i)], seed=i)) for i in range(6)]
        codes = []
        for p in pending:
            try:
                p.get_result()
                codes.append("200")
            except InferenceServerException as exc:
                codes.append(exc.status())
                assert exc.status() != "503" or "queue is full" in exc.message()
        assert set(codes) == {"200", "503"} and codes.count("200") >= 1, codes
        assert client.infer("digits", _inputs(["9"], seed=9)).as_numpy("image").shape == (1, 16, 16, 1)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "srds_trt.serve", "--port", str(port), "--default-steps", "8",
                             "--warmup-steps", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        in_flight = client.async_infer("digits", _inputs(["5"], seed=2, steps=16))
        time.sleep(0.5)  # the request is in the worker now
        proc.send_signal(signal.SIGTERM)
        result = in_flight.get_result()
        assert result.as_numpy("image").shape == (1, 16, 16, 1)
        assert proc.wait(60) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_bad_flags_with_exit_2(capsys):
    from srds_trt.cli.serve import main

    assert main(["--max-queue", "0"]) == 2
    assert main(["--model", "nosuchmodel"]) == 2
    assert main(["--default-steps", "0"]) == 2
    assert main(["--model", "digits", "--resolution", "512"]) == 2
    assert main(["--model", "sd3", "--resolution", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("srds_trt.serve: error: ") for line in err), err
    assert "--max-queue" in err[0] and "--default-steps" in err[2]
    assert "16x16" in err[3] and "multiple of 8" in err[4]


def test_cli_without_the_serve_extra_is_one_line_and_help_shows_defaults(monkeypatch, capsys):
    import importlib.util

    from srds_trt.cli.serve import build_parser, main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prometheus_client" else real(name, *a))
    assert main(["--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'srds_trt[serve]'" in err[0] and "prometheus_client" in err[0], err
    text = build_parser().format_help()
    assert "(default: 8000)" in text and "(default: None)" not in text and "--grpc-port" in text
