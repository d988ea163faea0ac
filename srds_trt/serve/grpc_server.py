"""KServe v2 over gRPC (the GRPCInferenceService that Triton and KServe speak), on grpc.aio in the server's own
event loop, so its requests join the same batching queue as REST and OpenAI ones. The service stubs are the ones
tritonclient ships (tritonclient.grpc.service_pb2_grpc); tritonclient.grpc is then a client for free.

Inputs may come as typed `contents` or as `raw_input_contents` (what tritonclient sends); both are turned into the
REST form and checked by the same code (protocol.decode_inputs). Outputs go back as raw_output_contents. The
convergence report is in the response's parameters (one entry per field, plus "convergence" as JSON). A client
that cancels or whose deadline passes abandons its request like an HTTP client that disconnects.
"""

from __future__ import annotations

import json
import logging
import time

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import serialize_byte_tensor

from .protocol import INPUTS, ProtocolError
from .service import SERVER_NAME, SERVER_VERSION, RequestError, Service

log = logging.getLogger("srds_trt.serve")

STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
CONTENTS = {"BYTES": "bytes_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents"}


async def start_grpc(service: Service, host: str, port: int) -> grpc.aio.Server:
    limit = service.config.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 256 << 20)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(service), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    log.info("KServe v2 gRPC on %s:%d", host, port)
    return server


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service):
        self.service = service

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):
        try:
            self.service.check_model(request.name, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            self.service.check_model(request.name, request.version)
        except RequestError as exc:
            await context.abort(STATUS_CODES[exc.status], exc.message)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.service.name, versions=["1"], platform="srds_trt",
            inputs=[tensor(name=n, datatype=d, shape=s) for n, (d, s) in INPUTS.items()],
            outputs=[tensor(name="image", datatype="UINT8", shape=[-1, -1, -1, self.service.channels()]),
                     tensor(name="stats", datatype="BYTES", shape=[1])])

    async def ModelInfer(self, request, context):
        service, start, parsed, stats = self.service, time.perf_counter(), None, None
        try:
            service.check_model(request.model_name, request.model_version)
            service.check_ready()
            parsed = await service.off_loop(lambda: service.parse_tensors_header(*rest_form(request)))
            image, stats = await service.infer(parsed)  # a cancelled RPC cancels this await: the request is abandoned
            response = infer_response(service.name, request, parsed, image, stats)
            service.record("v2-grpc", 200, start, parsed, stats)
            return response
        except RequestError as exc:
            service.record("v2-grpc", exc.status, start, parsed, message=exc.message)
            await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: one status, counted and logged
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("v2-grpc: unexpected error")
            service.record("v2-grpc", 500, start, parsed, message=str(exc))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")


def rest_form(request) -> tuple[dict, bytes]:
    """A ModelInferRequest as the REST body's (JSON header, binary tail)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs, tail = [], []
    for i, tensor in enumerate(request.inputs):
        spec = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            spec["parameters"] = {"binary_data_size": len(raw[i])}
            tail.append(raw[i])
        else:
            field = CONTENTS.get(tensor.datatype)
            values = list(getattr(tensor.contents, field)) if field else []
            if tensor.datatype == "BYTES":
                try:
                    values = [v.decode() for v in values]
                except UnicodeDecodeError:
                    raise ProtocolError(f"input {tensor.name!r} must be UTF-8 text") from None
            spec["data"] = values
        inputs.append(spec)
    header = {"inputs": inputs, "outputs": [{"name": o.name} for o in request.outputs]}
    return header, b"".join(tail)


def infer_response(model: str, request, parsed, image, stats: dict):
    response = pb.ModelInferResponse(model_name=model, model_version="1", id=request.id)
    tensors = {"image": ("UINT8", image),
               "stats": ("BYTES", serialize_byte_tensor(_bytes_array(json.dumps(stats).encode())))}
    for name in parsed.outputs:
        datatype, array = tensors[name]
        shape = list(image.shape) if name == "image" else [1]
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(array.tobytes() if name == "image" else array.item())
    for key, value in report_parameters(stats["report"]).items():
        response.parameters[key].CopyFrom(value)
    return response


def report_parameters(report: dict) -> dict:
    params = {"convergence": pb.InferParameter(string_param=json.dumps(report))}
    for key, value in report.items():
        if value is None:
            continue
        if isinstance(value, bool):
            params[key] = pb.InferParameter(bool_param=value)
        elif isinstance(value, int):
            params[key] = pb.InferParameter(int64_param=value)
        elif isinstance(value, float):
            params[key] = pb.InferParameter(double_param=value)
        else:
            params[key] = pb.InferParameter(string_param=str(value))
    return params


def _bytes_array(raw: bytes):
    import numpy as np

    return np.array([raw], dtype=object)
