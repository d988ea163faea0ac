"""Three protocols, one queue, checked with their real clients: the official `openai` client (images API),
tritonclient.grpc (KServe v2 gRPC) and tritonclient.http (KServe v2 REST). Every image equals the pipeline's own
output for the same seed (what `generate` writes), every response carries the convergence report, and requests
from different protocols with equal settings share one sampling job."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from PIL import Image  # noqa: E402
from serve_helpers import STEPS, serve  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from srds_trt import SRDSPipeline  # noqa: E402
from srds_trt.serve.report import FIELDS  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return SRDSPipeline.from_pretrained("digits")


@pytest.fixture(scope="module")
def server(pipe):
    from srds_trt.serve import BatchConfig

    with serve(pipe, BatchConfig(window_s=0.3, max_batch_images=16, max_queue=32, timeout_s=120),
               grpc_port=True) as (port, app):
        yield port, app.state.service.config.grpc_port


def _solo(pipe, prompts, seed) -> np.ndarray:
    out = pipe(list(prompts), num_inference_steps=STEPS, generator=seed, progress_bar=False)
    return np.stack([np.asarray(image) for image in out.images])[..., None]


def _report_ok(report: dict, sampler="srds"):
    assert set(report) == set(FIELDS), report
    assert report["sampler"] == sampler and report["iteration_unit"] == "iterations"
    assert report["iterations"] >= 1 and report["sequential_calls"] >= 1 and report["converged"] is True
    assert report["tol"] == report["tol_used"] and report["cut"] is False and report["noise_floor"] is None


def _openai(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def _grpc_inputs(prompts, seed):
    prompt = grpcclient.InferInput("prompt", [len(prompts)], "BYTES")
    prompt.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=object))
    seed_in = grpcclient.InferInput("seed", [1], "INT64")
    seed_in.set_data_from_numpy(np.array([seed], dtype=np.int64))
    steps = grpcclient.InferInput("steps", [1], "INT32")
    steps.set_data_from_numpy(np.array([STEPS], dtype=np.int32))
    return [prompt, seed_in, steps]


def _openai_images(response) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in response.data])[..., None]


def test_openai_client_generates_generate_images(server, pipe):
    port, _ = server
    client = _openai(port)
    assert [m.id for m in client.models.list()] == ["digits"]
    response = client.images.generate(model="digits", prompt="3", n=2, response_format="b64_json",
                                      extra_body={"seed": 5, "steps": STEPS, "sampler": "srds", "tol": 0.01})
    np.testing.assert_array_equal(_openai_images(response), _solo(pipe, ["3", "3"], 5))
    _report_ok(response.model_extra["convergence"])


def test_openai_client_sees_bad_input_as_400(server):
    client = _openai(server[0])
    for extra, words in (({"steps": 0}, "'steps'"), ({"seed": 2**70}, "'seed'"), ({"sampler": "nope"}, "'sampler'"),
                         ({"colour": 1}, "unknown field 'colour'")):
        with pytest.raises(openai.BadRequestError) as err:
            client.images.generate(model="digits", prompt="3", response_format="b64_json", extra_body=extra)
        assert words in err.value.body["message"], err.value.body
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="digits", prompt="3", response_format="url")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="3", response_format="b64_json")


def test_grpc_client_infers_generate_images_with_the_report(server, pipe):
    _, grpc_port = server
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    meta = client.get_model_metadata("digits", as_json=True)
    assert [i["name"] for i in meta["inputs"]][:2] == ["prompt", "seed"]
    result = client.infer("digits", _grpc_inputs(["3", "7"], 5))
    np.testing.assert_array_equal(result.as_numpy("image"), _solo(pipe, ["3", "7"], 5))
    params = result.get_response().parameters
    report = json.loads(params["convergence"].string_param)
    _report_ok(report)
    assert params["sequential_calls"].int64_param == report["sequential_calls"]
    assert json.loads(result.as_numpy("stats")[0])["report"] == report
    bad = _grpc_inputs(["3"], 5)
    bad[2].set_data_from_numpy(np.array([0], dtype=np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits", bad)
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "input 'steps'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("nosuchmodel", _grpc_inputs(["3"], 5))
    assert "NOT_FOUND" in str(err.value.status())
    client.close()


def _http_inputs(prompt, seed):
    inputs = []
    for name, array, dtype in (("prompt", np.array([prompt.encode()], dtype=object), "BYTES"),
                               ("seed", np.array([seed], dtype=np.int64), "INT64"),
                               ("steps", np.array([STEPS], dtype=np.int32), "INT32")):
        t = httpclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def test_http_client_gets_the_report_as_response_parameters(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server[0]}")
    result = client.infer("digits", _http_inputs("4", 1))
    report = json.loads(result.as_numpy("stats")[0])["report"]
    _report_ok(report)
    assert result.get_response()["parameters"] == {k: v for k, v in report.items() if v is not None}
    client.close()


def test_three_protocols_share_one_sampling_job(server, pipe):
    """Equal settings from REST, gRPC and OpenAI at once: one batching queue runs them as one job, each request
    still gets its own seed's pixels."""
    port, grpc_port = server
    results = {}

    def via_openai():
        r = _openai(port).images.generate(model="digits", prompt="1", n=1, response_format="b64_json",
                                          extra_body={"seed": 11, "steps": STEPS})
        results["openai"] = (_openai_images(r), r.model_extra)

    def via_grpc():
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        r = c.infer("digits", _grpc_inputs(["2"], 12))
        results["grpc"] = (r.as_numpy("image"), json.loads(r.as_numpy("stats")[0]))

    def via_http():
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        inputs = _http_inputs("3", 13)
        r = c.infer("digits", inputs)
        results["http"] = (r.as_numpy("image"), json.loads(r.as_numpy("stats")[0]))

    threads = [threading.Thread(target=f) for f in (via_openai, via_grpc, via_http)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["grpc"][1]["batch_requests"] >= 2 or results["http"][1]["batch_requests"] >= 2, results
    for key, prompt, seed in (("openai", "1", 11), ("grpc", "2", 12), ("http", "3", 13)):
        solo = _solo(pipe, [prompt], seed)
        assert np.abs(results[key][0].astype(int) - solo.astype(int)).max() <= 1, key  # batch rounding (test_serve)


def test_grpc_deadline_abandons_the_job(server):
    """A gRPC client whose deadline passes cancels the RPC: the job stops (all its requests gone)."""
    from serve_helpers import metric

    port, grpc_port = server
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inputs = _grpc_inputs([str(i) for i in range(8)], 1)
    inputs[2].set_data_from_numpy(np.array([4096], dtype=np.int32))
    sampler = grpcclient.InferInput("sampler", [1], "BYTES")
    sampler.set_data_from_numpy(np.array([b"serial"], dtype=object))
    before = metric(port, 'srds_cancelled_jobs_total{model="digits"}')
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits", [*inputs, sampler], client_timeout=1.0)
    assert "DEADLINE" in str(err.value.status()) or "Deadline" in err.value.message(), err.value
    import time

    deadline = time.monotonic() + 10  # minutes of work without cancellation; one step with it
    while metric(port, 'srds_cancelled_jobs_total{model="digits"}') < before + 1:
        assert time.monotonic() < deadline, "the abandoned gRPC request's job kept running"
        time.sleep(0.05)
    np.testing.assert_array_equal(client.infer("digits", _grpc_inputs(["1"], 0)).as_numpy("image").shape, (1, 16, 16, 1))
    client.close()
