"""A server on 127.0.0.1 in a thread, for the serve tests (free ports, ready wait, clean stop)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request

STEPS = 4  # 2 SRDS blocks: a fraction of a second per request on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(pipe, batch, **config):
    """(port, app) of a running server; config: ServeConfig fields beyond batch (grpc_port=True picks a port)."""
    import uvicorn

    from srds_trt.serve import ServeConfig, build_app

    port = free_port()
    if config.get("grpc_port") is True:
        config["grpc_port"] = free_port()
    config.setdefault("default_steps", STEPS)
    config.setdefault("warmup_steps", 2)
    app = build_app(pipe, ServeConfig(model="digits", batch=batch, **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status == 200:
                break
        time.sleep(0.1)
    else:
        raise TimeoutError("the server did not become ready in 120 s")
    try:
        yield port, app
    finally:
        server.should_exit = True
        thread.join(60)


def metric(port: int, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with line_start (0 if absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def post(port: int, path: str, body: bytes | dict, headers: dict | None = None, timeout: float = 120):
    """(status, parsed JSON body) of a POST; error statuses are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def v2_body(prompts, seed=0, steps=STEPS, **extra_inputs) -> dict:
    inputs = [{"name": "prompt", "datatype": "BYTES", "shape": [len(prompts)], "data": list(prompts)},
              {"name": "seed", "datatype": "INT64", "shape": [1], "data": [seed]},
              {"name": "steps", "datatype": "INT32", "shape": [1], "data": [steps]}]
    types = {"sampler": "BYTES", "tol": "FP64", "guidance_scale": "FP32"}
    for name, value in extra_inputs.items():
        inputs.append({"name": name, "datatype": types[name], "shape": [1], "data": [value]})
    return {"inputs": inputs, "outputs": [{"name": "image"}, {"name": "stats"}]}
