"""The Open Inference Protocol (KServe v2) infer request and response, JSON and the binary tensor extension.

Only the body's tensor layout lives here (HTTP itself is Starlette's and uvicorn's). A request is turned into an
`InferRequest` (validated settings, ready to batch) or refused with `ProtocolError` (HTTP 400, message for the
client). The binary extension (`Inference-Header-Content-Length`, `binary_data_size`, 4-byte-length-prefixed
BYTES) is what tritonclient sends by default; tritonclient.utils encodes and decodes BYTES tensors for us.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

HEADER_LENGTH = "Inference-Header-Content-Length"

# name -> (datatype, shape), shape -1 = any length; the server's model metadata lists exactly these
INPUTS = {
    "prompt": ("BYTES", [-1]),
    "seed": ("INT64", [1]),
    "steps": ("INT32", [1]),
    "guidance_scale": ("FP32", [1]),
    "sampler": ("BYTES", [1]),
    "tol": ("FP64", [1]),
}
OPTIONAL_INPUTS = ("seed", "steps", "guidance_scale", "sampler", "tol")


class ProtocolError(ValueError):
    """A malformed or invalid request: HTTP 400 with this message."""


@dataclass(frozen=True)
class Settings:
    """What a sampling job shares: requests batch together only when these are equal."""

    steps: int
    guidance_scale: float | None
    sampler: str
    tol: float


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    prompts: tuple[str, ...]
    seed: int
    settings: Settings
    binary_output: bool
    outputs: tuple[str, ...]


# integer datatypes' ranges: a JSON number outside them is the client's error (numpy would raise OverflowError)
INT_RANGES = {"INT32": (-2**31, 2**31 - 1), "INT64": (-2**63, 2**63 - 1)}


def load_json(raw: bytes | str):
    """json.loads for client bytes: malformed text and nesting deeper than the interpreter's recursion limit
    (the C decoder raises RecursionError, ~1000 levels) are ProtocolErrors. Run it off the event loop."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ProtocolError("the request body's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request body is not valid JSON: {exc}") from None


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(JSON header, binary tail) of a request body."""
    if header_length is None:
        return load_json(body), b""
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}") from None
    if not 0 <= n <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {n} exceeds the body ({len(body)} bytes)")
    return load_json(body[:n]), body[n:]


def _dict_or_empty(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def decode_inputs(header: dict, tail: bytes) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays (BYTES as an object array of bytes)."""
    if not isinstance(header, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(header).__name__}")
    if not isinstance(header.get("inputs"), list):
        raise ProtocolError("the request needs an 'inputs' list")
    tensors, offset = {}, 0
    for spec in header["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("every input needs a 'name'")
        name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
        if name not in INPUTS:
            raise ProtocolError(f"unknown input {name!r}; the inputs are {', '.join(INPUTS)}")
        if name in tensors:
            raise ProtocolError(f"input {name!r} given twice")
        want_type, want_shape = INPUTS[name]
        if datatype != want_type:
            raise ProtocolError(f"input {name!r} must be {want_type}, got {datatype!r}")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)
                and not isinstance(shape[0], bool) and shape[0] >= 1 and want_shape[0] in (-1, shape[0])):
            raise ProtocolError(f"input {name!r} must have shape {want_shape} (rows >= 1), got {shape!r}")
        size = _dict_or_empty(spec.get("parameters"), f"input {name!r}: 'parameters'").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} exceeds the binary data")
            raw, offset = tail[offset:offset + size], offset + size
            try:
                array = deserialize_bytes_tensor(raw) if datatype == "BYTES" else \
                    np.frombuffer(raw, dtype=triton_to_np_dtype(datatype))
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's malformed data
                raise ProtocolError(f"input {name!r}: bad binary data ({exc})") from None
        else:
            array = _json_data(name, datatype, spec.get("data"))
        if array.size != shape[0]:
            raise ProtocolError(f"input {name!r}: shape {shape} but {array.size} elements")
        tensors[name] = array.reshape(shape)
    if offset != len(tail):
        raise ProtocolError(f"{len(tail) - offset} bytes of binary data belong to no input")
    return tensors


def _json_data(name: str, datatype: str, data) -> np.ndarray:
    flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else None
    if flat is None:
        raise ProtocolError(f"input {name!r} needs 'data' (a list) or binary_data_size")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input {name!r}: BYTES data must be strings")
        return np.array([v.encode() for v in flat], dtype=object)
    kind = int if datatype.startswith("INT") else float
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or _integral(v))
               for v in flat):
        raise ProtocolError(f"input {name!r}: {datatype} data must be {'integers' if kind is int else 'numbers'}")
    if kind is int:
        low, high = INT_RANGES[datatype]
        if not all(low <= int(v) <= high for v in flat):
            raise ProtocolError(f"input {name!r}: {datatype} data must be integers in [{low}, {high}]")
        return np.array([int(v) for v in flat], dtype=triton_to_np_dtype(datatype))
    with np.errstate(over="ignore"):  # 1e300 as FP32 is inf: the setting's own check refuses it by name
        return np.array(flat.tolist(), dtype=triton_to_np_dtype(datatype))


def _integral(v) -> bool:
    return isinstance(v, int) or (math.isfinite(v) and float(v).is_integer())


def parse_infer(header: dict, tail: bytes, *, default_steps: int, max_images: int,
                default_sampler: str = "srds") -> InferRequest:
    """Inputs -> InferRequest; prompts and settings are checked by the pipeline's own validators (same messages
    as `generate`, so a bad value is a 400 before the request reaches the queue)."""
    prompts, seed, settings = read_tensors(decode_inputs(header, tail), default_steps=default_steps,
                                           max_images=max_images, default_sampler=default_sampler)
    params = _dict_or_empty(header.get("parameters"), "'parameters'")
    requested = header.get("outputs")
    if requested is None:
        requested = []
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ProtocolError("'outputs' must be a list of objects ({\"name\": \"image\"})")
    names = tuple(o.get("name") for o in requested) or ("image", "stats")
    unknown = [n for n in names if n not in ("image", "stats")]
    if unknown:
        raise ProtocolError(f"unknown output {unknown[0]!r}; the outputs are image, stats")
    out_params = [_dict_or_empty(o.get("parameters"), f"output {o.get('name')!r}: 'parameters'") for o in requested]
    binary = params.get("binary_data_output") is True or any(p.get("binary_data") is True for p in out_params)
    request_id = header.get("id")
    return InferRequest(id=str(request_id) if request_id is not None else None, prompts=prompts, seed=seed,
                        settings=settings, binary_output=binary, outputs=names)


def read_tensors(tensors: dict[str, np.ndarray], *, default_steps: int, max_images: int,
                 default_sampler: str = "srds") -> tuple[tuple[str, ...], int, Settings]:
    """(prompts, seed, settings) from the input tensors; shared by the server and the Triton sampler model."""
    from ..settings import check_guidance_scale, check_run_args, check_seed

    if "prompt" not in tensors:
        raise ProtocolError("the input 'prompt' (BYTES [n]) is required")
    try:
        prompts = tuple(p.decode() if isinstance(p, bytes) else str(p) for p in tensors["prompt"].reshape(-1))
    except UnicodeDecodeError:
        raise ProtocolError("input 'prompt' must be UTF-8 text") from None
    if len(prompts) > max_images:
        raise ProtocolError(f"input 'prompt' holds {len(prompts)} prompts; this server takes at most {max_images} "
                            "per request (--max-batch-images)")

    def scalar(name, default):
        if name not in tensors:
            return default
        value = tensors[name].reshape(-1)[0]
        return value.item() if isinstance(value, np.generic) else value  # BYTES elements are plain bytes

    sampler = scalar("sampler", default_sampler.encode())
    sampler = sampler.decode(errors="replace") if isinstance(sampler, bytes) else str(sampler)
    steps, tol, seed = int(scalar("steps", default_steps)), float(scalar("tol", _default_tol())), int(scalar("seed", 0))
    scale = scalar("guidance_scale", None)
    try:
        check_run_args(steps, tol, None, sampler, 1)
        check_seed(seed)
        if scale is not None:
            scale = check_guidance_scale(scale)
    except ValueError as exc:
        raise ProtocolError(_input_names(exc)) from None
    return prompts, seed, Settings(steps=steps, guidance_scale=scale, sampler=sampler, tol=tol)


def _default_tol() -> float:
    from ..samplers import DEFAULT_TOL

    return DEFAULT_TOL


def _input_names(exc: ValueError) -> str:
    """The validators' messages start with the setting's name (settings.SettingError.setting); here the same
    checks name the protocol's input: "input 'steps' must be ..."."""
    return setting_message(exc, "input '{}'")


def setting_message(exc: ValueError, template: str) -> str:
    message, setting = str(exc), getattr(exc, "setting", None)
    if setting and message.startswith(setting):
        return template.format(setting) + message[len(setting):]
    for flag, name in (("--steps", "steps"), ("--tol", "tol"), ("--seed", "seed"), ("--sampler", "sampler"),
                       ("--guidance-scale", "guidance_scale")):  # older validators named the CLI flags
        message = message.replace(flag, template.format(name))
    return message


def encode_response(model: str, request: InferRequest, image: np.ndarray, stats: dict) -> tuple[bytes, dict]:
    """(body, extra headers) of the infer response: JSON tensors, or the binary extension when asked for."""
    tensors = {"image": ("UINT8", image), "stats": ("BYTES", np.array([json.dumps(stats).encode()], dtype=object))}
    outputs, blobs = [], []
    for name in request.outputs:
        datatype, array = tensors[name]
        out = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.binary_output:
            raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = [v.decode() for v in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
        outputs.append(out)
    body = {"model_name": model, "outputs": outputs}
    report = stats.get("report")
    if report:  # the convergence report as response parameters (KServe v2 allows string, number, bool values)
        body["parameters"] = {k: v for k, v in report.items() if v is not None}
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body).encode()
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}
