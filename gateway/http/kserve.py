"""KServe v2 REST (the Open Inference Protocol over HTTP), with Triton's binary tensor extension.

A REST request becomes the gRPC `ModelInferRequest` it stands for (every input as raw bytes), and
goes through the gateway's Open Inference servicer, so both fronts share one translation to the
families' Predict messages, one path through the cache and one set of errors. The reply comes back
as JSON, or as a JSON header followed by the binary outputs the caller asked for
(`Inference-Header-Content-Length` says where the header ends).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from gateway.auth import current_tenant
from gateway.http.context import HttpCallContext, TooLargeError
from gateway.http.schemas import (
    InferenceRequest,
    InferenceResponse,
    KServeError,
    Liveness,
    ModelConfig,
    ModelMetadata,
    ModelReadiness,
    Readiness,
    ServerMetadata,
)
from gateway.open_inference import (
    READY,
    SERVER_NAME,
    SERVER_VERSION,
    decode_bytes_elements,
    default_version,
    encode_bytes_elements,
)
from inference import open_inference_pb2 as oip
from shared.errors import InvalidArgumentError
from shared.tensors import DTYPE_CODES, NUMPY_DTYPES, check_shape

HEADER_LENGTH = "inference-header-content-length"
CACHE_HEADER = "maas-cache"
# Bodies and replies larger than this are parsed and encoded off the event loop.
OFF_LOOP_BYTES = 256 * 1024
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
NUMERIC = sorted(name for name in DTYPE_CODES if name != "STRING")
DATATYPES = [*NUMERIC, "BYTES"]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": KServeError, "description": description}
    for status, description in (
        (400, "A bad request: the message names the field"),
        (401, "Missing or unknown API key"),
        (403, "The API key lacks the role this needs"),
        (404, "No such model or version (or another tenant's private model)"),
        (413, "The request body is over the gateway's limit"),
        (429, "Rate limit reached, or a queue is full"),
        (503, "Not ready, or a backend is down; retry"),
        (504, "The deadline passed"),
    )
}
TIMEOUT_DOC = "Deadline in seconds; without it the gateway's default deadline (30 s) applies."


# --- requests -------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes; gzip or deflate are undone."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"request body of {declared} bytes; the gateway takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"request body over {limit} bytes, the most the gateway takes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidArgumentError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    return await _off_loop(len(body), _decompress, body, encoding, limit)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=(16 if encoding == "gzip" else 0) + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgumentError(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLargeError(f"decompressed request body over {limit} bytes, the most the gateway takes")
    return out


async def _off_loop(size: int, function, *args):
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(function, *args)
    return function(*args)


@dataclass
class OutputChoice:
    """Which outputs come back as binary: all of them (`binary_data_output`), or those named."""

    binary_default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def parse_infer_request(
    body: bytes, header_length: str | None, model: str, version: str, max_elements: int
) -> tuple[oip.ModelInferRequest, OutputChoice]:
    """The ModelInferRequest a REST body stands for: JSON, or a JSON header and the inputs' bytes."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidArgumentError(
                f"Inference-Header-Content-Length: must be a whole number of bytes up to the body's {len(body)}, "
                f"got {header_length[:40]!r}"
            )
        header, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"request body: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidArgumentError("request body: must be a JSON object with 'inputs'")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgumentError("inputs: required, a non-empty list of tensors")
    message = oip.ModelInferRequest(model_name=model, model_version=version, id=_string(doc.get("id", ""), "id"))
    _copy_parameters(doc.get("parameters"), message.parameters, "parameters")
    offset = 0
    for i, spec in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(spec, dict):
            raise InvalidArgumentError(f"{where}: must be an object with name, shape, datatype and data")
        name = _string(spec.get("name"), f"{where}.name", required=True)
        where = f"inputs[{i}] ({name!r})"
        datatype = spec.get("datatype")
        if datatype not in DATATYPES:
            raise InvalidArgumentError(f"{where}.datatype: must be one of {DATATYPES}, got {str(datatype)[:40]!r}")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgumentError(f"{where}.shape: must be a list of whole numbers")
        elements = check_shape(shape, f"{where}.shape", max_elements)
        parameters = spec.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgumentError(f"{where}.parameters: must be an object")
        if "shared_memory_region" in parameters:
            raise InvalidArgumentError(f"{where}: shared memory is not supported; send the data in the request")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgumentError(f"{where}.parameters.binary_data_size: must be a whole number of bytes")
            if offset + size > len(binary):
                raise InvalidArgumentError(
                    f"{where}: binary_data_size {size} runs past the {len(binary) - offset} bytes of binary data left"
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
            if "data" in spec:
                raise InvalidArgumentError(f"{where}: has both binary_data_size and data; send one")
        else:
            raw = _json_to_raw(spec.get("data"), datatype, elements, where)
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidArgumentError(f"{len(binary) - offset} bytes of binary data follow that no input's "
                                   "binary_data_size claims")  # fmt: skip
    choice = OutputChoice(binary_default=_flag(message.parameters, "binary_data_output"))
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgumentError("outputs: must be a list")
    for i, spec in enumerate(outputs):
        if not isinstance(spec, dict):
            raise InvalidArgumentError(f"outputs[{i}]: must be an object with a name")
        name = _string(spec.get("name"), f"outputs[{i}].name", required=True)
        parameters = spec.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgumentError(f"outputs[{i}].parameters: must be an object")
        if "classification" in parameters or "shared_memory_region" in parameters:
            raise InvalidArgumentError(f"outputs[{i}]: the classification and shared memory extensions are not "
                                       "supported; classifiers return label and class_name outputs")  # fmt: skip
        if "binary_data" in parameters:
            if not isinstance(parameters["binary_data"], bool):
                raise InvalidArgumentError(f"outputs[{i}].parameters.binary_data: must be true or false")
            choice.binary[name] = parameters["binary_data"]
        message.outputs.add(name=name)
    return message, choice


def _string(value: Any, where: str, required: bool = False) -> str:
    if not isinstance(value, str) or (required and not value):
        raise InvalidArgumentError(f"{where}: must be a{' non-empty' if required else ''} string")
    return value


def _flag(parameters, name: str) -> bool:
    return name in parameters and parameters[name].WhichOneof("parameter_choice") == "bool_param" and \
        parameters[name].bool_param  # fmt: skip


def _copy_parameters(parameters: Any, target, where: str) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise InvalidArgumentError(f"{where}: must be an object")
    for key, value in parameters.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise InvalidArgumentError(f"{where}[{key!r}]: must be a string, number or boolean")


def _flatten(data: Any, where: str, limit: int) -> list:
    """Row-major elements of a flat or nested JSON list, refusing more than `limit` of them."""
    out: list = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 8:
                raise InvalidArgumentError(f"{where}.data: nested deeper than a tensor's 8 dimensions")
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > limit:
                raise InvalidArgumentError(f"{where}.data: more than the {limit} elements its shape declares")
    return out


_END = object()


def _json_to_raw(data: Any, datatype: str, elements: int, where: str) -> bytes:
    if not isinstance(data, list):
        raise InvalidArgumentError(f"{where}: needs data (a list) or parameters.binary_data_size")
    values = _flatten(data, where, elements)
    if len(values) != elements:
        raise InvalidArgumentError(f"{where}.data: the shape needs {elements} elements, got {len(values)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgumentError(f"{where}.data: BYTES elements must be strings")
        return encode_bytes_elements([v.encode("utf-8") for v in values])
    if not all(isinstance(v, bool | int | float) for v in values):
        raise InvalidArgumentError(f"{where}.data: {datatype} elements must be numbers")
    if datatype == "BOOL" and not all(isinstance(v, bool) for v in values):
        raise InvalidArgumentError(f"{where}.data: BOOL elements must be true or false")
    try:
        array = np.asarray(values, dtype=NUMPY_DTYPES[DTYPE_CODES[datatype]])
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgumentError(f"{where}.data: not {datatype} values ({exc})") from None
    return array.tobytes()


# --- responses ------------------------------------------------------------------------------------


def render_infer_response(reply: oip.ModelInferResponse, choice: OutputChoice) -> tuple[bytes, int | None]:
    """The REST body of a reply, and the JSON header's length when binary outputs follow it."""
    outputs, blobs = [], []
    for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if choice.is_binary(tensor.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode("utf-8", "replace") for item in decode_bytes_elements(raw, tensor.name)]
        else:
            entry["data"] = np.frombuffer(raw, NUMPY_DTYPES[DTYPE_CODES[tensor.datatype]]).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": reply.model_name, "model_version": reply.model_version, "outputs": outputs}
    if reply.id:
        doc["id"] = reply.id
    if reply.parameters:
        doc["parameters"] = {name: getattr(value, value.WhichOneof("parameter_choice"))
                             for name, value in reply.parameters.items()}  # fmt: skip
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def tensor_metadata(specs) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


# --- routes ---------------------------------------------------------------------------------------

router = APIRouter(tags=["KServe v2"], responses=ERRORS)


def _front(request: Request):
    return request.app.state.front


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/v2/health/live", response_model=Liveness, summary="Server liveness (no API key needed)")
async def server_live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready", response_model=Readiness, summary="Server readiness (no API key needed)")
async def server_ready(request: Request):
    front = _front(request)
    ready = front.is_open() and front.catalog.all_reachable()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def _model_ready(request: Request, model_name: str, model_version: str = ""):
    front = _front(request)
    _, model = await front.catalog.find_visible(model_name, current_tenant())
    ready = default_version(model, model_version).state == READY
    body = {"name": model_name, "version": model_version, "ready": ready}
    return JSONResponse(body, status_code=200 if ready else 503)


async def _model_metadata(request: Request, model_name: str, model_version: str = "") -> dict:
    front = _front(request)
    reply = await front.inference.ModelMetadata(
        oip.ModelMetadataRequest(name=model_name, version=model_version), HttpCallContext.from_request(request)
    )
    return {
        "name": reply.name,
        "versions": list(reply.versions),
        "platform": reply.platform,
        "inputs": tensor_metadata(reply.inputs),
        "outputs": tensor_metadata(reply.outputs),
    }


async def _model_config(request: Request, model_name: str, model_version: str = "") -> dict:
    front = _front(request)
    reply = await front.inference.ModelConfig(
        oip.ModelConfigRequest(name=model_name, version=model_version), HttpCallContext.from_request(request)
    )
    config = reply.config

    def tensors(specs):
        return [{"name": s.name, "data_type": oip.DataType.Name(s.data_type), "dims": list(s.dims)} for s in specs]

    return {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.input),
        "output": tensors(config.output),
    }


async def _infer(request: Request, model_name: str, model_version: str = "") -> Response:
    front = _front(request)
    context = HttpCallContext.from_request(request)
    body = await read_body(request, front.settings.max_request_bytes)
    message, choice = await _off_loop(
        len(body), parse_infer_request, body, request.headers.get(HEADER_LENGTH), model_name, model_version,
        front.settings.max_tensor_elements,
    )  # fmt: skip
    reply = await front.inference.ModelInfer(message, context)
    if type(reply) is bytes:  # a cache hit: the encoded response, as the gRPC front sends it
        reply = oip.ModelInferResponse.FromString(reply)
    return await infer_response(reply, choice, context)


async def infer_response(reply: oip.ModelInferResponse, choice, context: HttpCallContext) -> Response:
    """An infer-shaped reply as JSON or Triton's binary extension (as the request chose), with the cache header."""
    size = sum(len(raw) for raw in reply.raw_output_contents)
    content, header_length = await _off_loop(size, render_infer_response, reply, choice)
    headers = {}
    if (outcome := context.trailing(CACHE_HEADER)) is not None:
        headers[CACHE_HEADER] = outcome
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON; or, with Triton's binary tensor extension, the JSON header "
        "(Inference-Header-Content-Length bytes) followed by each input that has parameters.binary_data_size, "
        "in order",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs; with binary outputs, a JSON header then their bytes "
        "(the Inference-Header-Content-Length response header gives the header's length)",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
# Extra schemas the OpenAPI document names but no route declares as a parameter.
SCHEMAS = (InferenceRequest, InferenceResponse)


def _add_model_routes(prefix: str, versioned: bool) -> None:
    """The model routes, at /v2/models/{model_name} and /v2/models/{model_name}/versions/{model_version}."""
    suffix = " (a given version)" if versioned else ""

    if versioned:

        async def ready(request: Request, model_name: str, model_version: str):
            return await _model_ready(request, model_name, model_version)

        async def metadata(request: Request, model_name: str, model_version: str):
            return await _model_metadata(request, model_name, model_version)

        async def config(request: Request, model_name: str, model_version: str):
            return await _model_config(request, model_name, model_version)

        async def infer(
            request: Request,
            model_name: str,
            model_version: str,
            inference_header_content_length: int | None = Header(None, ge=0, alias=HEADER_LENGTH),
            x_request_timeout: float | None = Header(None, gt=0, description=TIMEOUT_DOC),
        ):
            return await _infer(request, model_name, model_version)

    else:

        async def ready(request: Request, model_name: str):
            return await _model_ready(request, model_name)

        async def metadata(request: Request, model_name: str):
            return await _model_metadata(request, model_name)

        async def config(request: Request, model_name: str):
            return await _model_config(request, model_name)

        async def infer(
            request: Request,
            model_name: str,
            inference_header_content_length: int | None = Header(None, ge=0, alias=HEADER_LENGTH),
            x_request_timeout: float | None = Header(None, gt=0, description=TIMEOUT_DOC),
        ):
            return await _infer(request, model_name)

    name = "_version" if versioned else ""
    router.add_api_route(f"{prefix}/ready", ready, methods=["GET"], response_model=ModelReadiness,
                         summary=f"Model readiness{suffix}", operation_id=f"model_ready{name}")  # fmt: skip
    router.add_api_route(prefix, metadata, methods=["GET"], response_model=ModelMetadata,
                         summary=f"Model metadata{suffix}", operation_id=f"model_metadata{name}")  # fmt: skip
    router.add_api_route(f"{prefix}/config", config, methods=["GET"], response_model=ModelConfig,
                         summary=f"Model configuration{suffix}", operation_id=f"model_config{name}")  # fmt: skip
    router.add_api_route(
        f"{prefix}/infer", infer, methods=["POST"], summary=f"Inference{suffix}", operation_id=f"model_infer{name}",
        openapi_extra=INFER_BODY, responses=INFER_RESPONSES, response_class=Response,
    )  # fmt: skip


_add_model_routes("/v2/models/{model_name}", versioned=False)
_add_model_routes("/v2/models/{model_name}/versions/{model_version}", versioned=True)

