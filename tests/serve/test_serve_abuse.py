"""Abusive and unlucky traffic against python -m srds_trt.serve: every bad request is a 4xx with a JSON error,
counted in srds_requests_total, and the server keeps serving; bodies over the limit get 413 before they are read;
deep JSON is refused without a traceback."""

from __future__ import annotations

import http.client
import json

import pytest
import torch

pytest.importorskip("uvicorn")

from serve_helpers import metric, post, serve, v2_body  # noqa: E402

from srds_trt import SRDSPipeline  # noqa: E402

LIMIT = 64 * 1024
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server():
    from srds_trt.serve import BatchConfig

    torch.set_num_threads(1)
    pipe = SRDSPipeline.from_pretrained("digits")
    with serve(pipe, BatchConfig(window_s=0.0, max_batch_images=8, max_queue=16, timeout_s=120),
               max_body_bytes=LIMIT) as (port, app):
        yield port


def _with(body: dict, **changes) -> dict:
    body = json.loads(json.dumps(body))
    for path, value in changes.items():
        target = body
        *keys, last = path.split("__")
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        target[int(last) if last.isdigit() else last] = value
    return body


BAD = {  # name -> (body, words the error must contain)
    "steps 1e10 as INT32": (_with(v2_body(["1"]), inputs__2__data=[10**10]), "INT32 data must be integers in"),
    "seed 2^70": (_with(v2_body(["1"]), inputs__1__data=[2**70]), "INT64 data must be integers in"),
    "seed 1e300": (_with(v2_body(["1"]), inputs__1__data=[1e300]), "INT64 data must be integers in"),
    "seed inf-ish float": (_with(v2_body(["1"]), inputs__1__data=[1.5]), "INT64 data must be integers"),
    "parameters as a list": (_with(v2_body(["1"]), parameters=[1, 2]), "'parameters' must be a JSON object"),
    "outputs as an int": (_with(v2_body(["1"]), outputs=7), "'outputs' must be a list"),
    "outputs of ints": (_with(v2_body(["1"]), outputs=[1]), "'outputs' must be a list of objects"),
    "input parameters as a string": (_with(v2_body(["1"]), inputs__0__parameters="x"), "'parameters' must be a JSON"),
    "output parameters as a string": (_with(v2_body(["1"]), outputs=[{"name": "image", "parameters": "x"}]),
                                      "'parameters' must be a JSON"),
    "body a list": ([1, 2], "must be a JSON object"),
    "shape of a bool": (_with(v2_body(["1"]), inputs__0__shape=[True]), "must have shape"),
    "guidance 1e300 as FP32": (v2_body(["1"], guidance_scale=1e300), "input 'guidance_scale'"),
    "tol as a string": (v2_body(["1"], tol="x"), "FP64 data must be numbers"),
    "ragged data": (_with(v2_body(["1"]), inputs__1__data=[[1], [2, 3]]), "INT64"),
    "binary size a bool": (_with(v2_body(["1"]), inputs__0__parameters={"binary_data_size": True}), "binary_data_size"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_a_counted_400_with_a_json_error(server, case):
    body, words = BAD[case]
    before = metric(server, 'srds_requests_total{code="400",model="digits"}')
    status, reply = post(server, INFER, body if isinstance(body, dict) else json.dumps(body).encode())
    assert status == 400 and words in reply["error"], (status, reply)
    assert metric(server, 'srds_requests_total{code="400",model="digits"}') == before + 1


def test_json_nested_100000_deep_is_a_400_and_the_server_serves_on(server):
    status, reply = post(server, INFER, b"[" * 30_000 + b"]" * 30_000)  # 60 kB: under the body limit
    assert status == 400 and "nested too deeply" in reply["error"], reply
    status, reply = post(server, INFER, b'{"inputs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")
    assert status == 400 and "nested too deeply" in reply["error"], reply
    assert post(server, INFER, v2_body(["2"]))[0] == 200


def test_body_over_the_limit_is_413_before_reading(server):
    """Content-Length over the limit: 413 answered while the client has sent only the headers."""
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    conn.putrequest("POST", INFER)
    conn.putheader("Content-Length", str(100 * 1024 * 1024))
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()  # no body byte sent
    reply = conn.getresponse()
    assert reply.status == 413 and "--max-body-mb" in json.loads(reply.read())["error"]
    conn.close()


def test_chunked_body_over_the_limit_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    chunks = (b"x" * 16384 for _ in range(8))  # 128 kB, no Content-Length
    conn.request("POST", INFER, body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
    reply = conn.getresponse()
    assert reply.status == 413, reply.status
    conn.close()
    before = metric(server, 'srds_requests_total{code="413",model="digits"}')
    assert before >= 1


def test_bad_headers_and_routes(server):
    status, reply = post(server, INFER, v2_body(["1"]), headers={"Inference-Header-Content-Length": "abc"})
    assert status == 400 and "Inference-Header-Content-Length" in reply["error"]
    status, reply = post(server, "/v2/models/digits/versions/7/infer", v2_body(["1"]))
    assert status == 404 and "version" in reply["error"]
    assert metric(server, 'srds_requests_total{code="404",model="digits"}') >= 1
