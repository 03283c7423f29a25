"""The Open Inference Protocol (KServe v2) and Triton's extensions, for every family.

Each model name is routed to the service that owns it. Requests are converted to the family's
Predict message and go through the same path as native calls (deadlines, single-flight,
statistics); tensors stay raw bytes both ways wherever the caller sends raw contents.

ModelInfer keeps its own results in the result cache: the key is the digest of the Open
Inference request itself (less its id, name and version, which the key names as it does for
native calls: resolved version, owner), and the value is the encoded ModelInferResponse. A hit
translates nothing: the cached bytes go back with the caller's id in front.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Sequence

import grpc
import numpy as np

from gateway.auth import current_tenant
from gateway.cache import CACHE_RESULTS
from gateway.cache_key import message_digest, result_key
from gateway.canary import choose, record
from gateway.catalog import ModelCatalog
from gateway.model_service import GatewayModelService
from gateway.payloads import message_json, tensor_json
from gateway.proxy import CACHE_CONTROL, CACHE_OUTCOME, QUERY_ROUTE, FamilyRoute, GatewayProxy
from gateway.rate_limit import RateLimiter, refusal
from inference import open_inference_pb2 as oip
from inference import open_inference_pb2_grpc
from maas.common.v1 import model_pb2, tensor_pb2
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.models.v1 import models_pb2
from maas.nlp.v1 import nlp_pb2
from shared.error_interceptor import INTERNAL_MESSAGE
from shared.errors import InvalidArgumentError, MaasError, NotFoundError, ResourceExhaustedError
from shared.observability import add_trailing_metadata, call_metadata, current_request_id, metadata_value
from shared.tensors import DTYPE_CODES, DTYPE_NAMES, NUMPY_DTYPES, check_shape, from_numpy, to_numpy

log = logging.getLogger(__name__)

SERVER_NAME = "maas"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_configuration", "statistics", "model_repository"]
READY = model_pb2.MODEL_STATE_READY
STATE_NAMES = {
    model_pb2.MODEL_STATE_READY: "READY",
    model_pb2.MODEL_STATE_LOADING: "LOADING",
    model_pb2.MODEL_STATE_FAILED: "UNAVAILABLE",
    model_pb2.MODEL_STATE_UNLOADED: "UNLOADED",
}
# Typed `contents` fields by datatype; FP16 has none and must travel raw.
CONTENTS_FIELD = {
    "FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "BOOL": "bool_contents",
}  # fmt: skip
# Triton's config DataType enum, by datatype name.
CONFIG_TYPES = {name: oip.DataType.Value(f"TYPE_{'STRING' if name == 'BYTES' else name}") for name in
                [*DTYPE_NAMES.values(), "BYTES"] if name != "STRING"}  # fmt: skip
BATCHED_FAMILIES = ("dense", "nlp")  # their first dimension is the batch; gnn inputs have none
MAX_BATCH_SIZE = 64
# BYTES elements one request may carry; the nlp service's own, smaller limit applies after this.
MAX_TEXTS = 100_000
# Graphs one graph-classification request may carry (each becomes a message here, on the loop);
# the gnn service's own, smaller limit (MAAS_GNN_MAX_GRAPHS_PER_CALL) applies after this.
MAX_GRAPHS = 10_000
# Named by the cache key (or the caller's own), so not part of an Open Inference request's digest.
OIP_KEY_FIELDS = ("id", "model_name", "model_version")
OPEN_INFERENCE_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ID_TAG = b"\x1a"  # ModelInferResponse.id: field 3, length-delimited
STREAM_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response: field 2, length-delimited
# Calls one ModelStreamInfer stream may have in flight; past it, the gateway reads no further
# message until one finishes (the client's sends wait on HTTP/2 flow control).
STREAM_IN_FLIGHT = 256


def datatype_name(dtype: int) -> str:
    name = DTYPE_NAMES.get(dtype, "BYTES")
    return "BYTES" if name == "STRING" else name


MAX_VERSION = 2**63 - 1


def parse_version(version: str) -> int:
    """A version string as its number; "" is the default (0)."""
    if not version:
        return 0
    if len(version) > 19 or not (version.isascii() and version.isdigit()) or int(version) > MAX_VERSION:
        shown = version if len(version) <= 40 else version[:40] + "…"
        raise InvalidArgumentError(f"model_version: must be a whole number from 1 to {MAX_VERSION}, got {shown!r}")
    return int(version)


def decode_bytes_elements(raw: bytes, field: str, limit: int | None = None) -> list[bytes]:
    """BYTES elements in raw form: each a 4-byte little-endian length, then the bytes; at most `limit`."""
    items, offset = [], 0
    while offset < len(raw):
        if limit is not None and len(items) == limit:
            raise InvalidArgumentError(f"{field}: more than the {limit} elements its shape declares")
        if offset + 4 > len(raw):
            raise InvalidArgumentError(f"{field}: truncated length prefix at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgumentError(f"{field}: element of {length} bytes runs past the end of the data")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


class InferInputs:
    """A ModelInferRequest's inputs by name, as maas Tensors or lists of bytes."""

    def __init__(self, request: oip.ModelInferRequest) -> None:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgumentError(
                f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs; send one per input"
            )
        self.inputs = {}
        for i, tensor in enumerate(request.inputs):
            field = f"inputs[{i}] ({tensor.name!r})"
            if raw and tensor.HasField("contents"):
                raise InvalidArgumentError(f"{field}: contents must be empty when raw_input_contents is used")
            self.inputs[tensor.name] = (tensor, raw[i] if raw else None, field)

    def names(self) -> list[str]:
        return list(self.inputs)

    def tensor(self, name: str) -> tensor_pb2.Tensor:
        tensor, raw, field = self._get(name)
        if tensor.datatype not in DTYPE_CODES or tensor.datatype == "STRING":
            raise InvalidArgumentError(f"{field}: datatype {tensor.datatype!r} is not a numeric datatype")
        check_shape(tensor.shape, field)
        if raw is None:
            if tensor.datatype not in CONTENTS_FIELD:
                raise InvalidArgumentError(f"{field}: {tensor.datatype} travels only in raw_input_contents")
            values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
            raw = np.asarray(values, dtype=NUMPY_DTYPES[DTYPE_CODES[tensor.datatype]]).tobytes()
        return tensor_pb2.Tensor(dtype=DTYPE_CODES[tensor.datatype], shape=tensor.shape, data=raw)

    def texts(self, name: str) -> list[str]:
        tensor, raw, field = self._get(name)
        if tensor.datatype != "BYTES":
            raise InvalidArgumentError(f"{field}: texts must be BYTES, got {tensor.datatype}")
        # The shape is checked first: nothing below does work per element beyond what it declares.
        expected = check_shape(tensor.shape, field, MAX_TEXTS) if len(tensor.shape) else 0
        if raw is not None:
            items = decode_bytes_elements(raw, field, limit=expected)
        elif len(tensor.contents.bytes_contents) != expected:
            items = tensor.contents.bytes_contents
        else:
            items = list(tensor.contents.bytes_contents)
        if len(items) != expected:
            raise InvalidArgumentError(
                f"{field}: shape {list(tensor.shape)} needs {expected} elements, got {len(items)}"
            )
        try:
            return [item.decode("utf-8") for item in items]
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"{field}: not UTF-8 text ({exc})") from None

    def has(self, name: str) -> bool:
        return name in self.inputs

    def _get(self, name: str):
        if name not in self.inputs:
            raise InvalidArgumentError(f"inputs: missing {name!r}; got {self.names()}")
        return self.inputs[name]


def to_family_request(family: str, request: oip.ModelInferRequest, version: int, links: bool = False,
                      graphs: bool = False, method: str = ""):  # fmt: skip
    inputs = InferInputs(request)
    if method in ("Recommend", "SimilarItems"):
        return to_recommender_request(request, version, inputs, method)
    wanted = [output.name for output in request.outputs]
    if family == "dense":
        return dense_pb2.PredictRequest(
            model_name=request.model_name,
            model_version=version,
            inputs={name: inputs.tensor(name) for name in inputs.names()},
            output_names=[name for name in wanted if name != "class_name"],
        )
    if family == "nlp":
        texts_input = "texts" if inputs.has("texts") else (inputs.names() or ["texts"])[0]
        return nlp_pb2.PredictRequest(
            model_name=request.model_name, model_version=version, texts=inputs.texts(texts_input)
        )
    if graphs:
        return to_classify_graphs_request(request, version, inputs)
    return to_gnn_request(request, version, inputs, links)


def _integers(inputs: InferInputs, name: str) -> list[int]:
    """An INT32 or INT64 input as a list of ints ([] when absent)."""
    if not inputs.has(name):
        return []
    tensor = inputs.tensor(name)
    if tensor.dtype not in (tensor_pb2.DATA_TYPE_INT64, tensor_pb2.DATA_TYPE_INT32):
        raise InvalidArgumentError(f"inputs ({name!r}): must be INT64 or INT32")
    return np.frombuffer(tensor.data, dtype="<i8" if tensor.dtype == tensor_pb2.DATA_TYPE_INT64 else "<i4").tolist()


def _stored_graph(request: oip.ModelInferRequest, inputs: InferInputs) -> tuple[str, int]:
    """The stored graph and its version: BYTES / INT64 inputs, or request parameters of the same names."""
    name = inputs.texts("stored_graph")[0] if inputs.has("stored_graph") else ""
    parameter = request.parameters.get("stored_graph")
    name = name or (parameter.string_param if parameter is not None else "")
    versions = _integers(inputs, "graph_version")
    parameter = request.parameters.get("graph_version")
    version = versions[0] if versions else (parameter.int64_param if parameter is not None else 0)
    return name, version


def to_gnn_request(request: oip.ModelInferRequest, version: int, inputs: InferInputs, links: bool):
    """Predict, or PredictLinks for a link-prediction model: an inline graph (node_features, edge_index,
    edge_weight) or a stored one (stored_graph, graph_version), with node_ids and fan_outs; for links,
    pairs and top_k."""
    stored, graph_version = _stored_graph(request, inputs)
    if links:
        message = gnn_pb2.PredictLinksRequest(model_name=request.model_name, model_version=version)
        if inputs.has("pairs"):
            message.pairs.CopyFrom(inputs.tensor("pairs"))
        top_k = _integers(inputs, "top_k")
        message.top_k = top_k[0] if top_k else 0
    else:
        message = gnn_pb2.PredictRequest(model_name=request.model_name, model_version=version)
    if stored:
        message.stored_graph = stored
        message.graph_version = graph_version
    else:
        _copy_inline_graph(message.graph, inputs)
    message.node_ids.extend(_integers(inputs, "node_ids"))
    message.fan_outs.extend(_integers(inputs, "fan_outs"))
    return message


def to_recommender_request(request: oip.ModelInferRequest, version: int, inputs: InferInputs, method: str):
    """Recommend (user_ids, top_k, include_seen) or, when item_ids is sent, SimilarItems (item_ids, top_k, and the
    `by` parameter), on the model's user-item graph or a stored one (stored_graph, graph_version)."""
    stored, graph_version = _stored_graph(request, inputs)
    top_k = _integers(inputs, "top_k")
    fields = {"model_name": request.model_name, "model_version": version, "stored_graph": stored,
              "graph_version": graph_version, "top_k": top_k[0] if top_k else 10}  # fmt: skip
    if method == "SimilarItems":
        by = request.parameters.get("by")
        return gnn_pb2.SimilarItemsRequest(item_ids=_integers(inputs, "item_ids"),
                                           by=by.string_param if by is not None else "", **fields)  # fmt: skip
    include = inputs.tensor("include_seen") if inputs.has("include_seen") else None
    if include is not None and (include.dtype != tensor_pb2.DATA_TYPE_BOOL or len(include.data) != 1):
        raise InvalidArgumentError("inputs ('include_seen'): must be one BOOL")
    return gnn_pb2.RecommendRequest(user_ids=_integers(inputs, "user_ids"),
                                    include_seen=bool(include is not None and include.data[0]), **fields)  # fmt: skip


def _copy_inline_graph(graph: gnn_pb2.Graph, inputs: InferInputs) -> None:
    """An inline graph's inputs (node_features, edge_index and, when sent, edge_weight) into `graph`."""
    graph.node_features.CopyFrom(inputs.tensor("node_features"))
    graph.edge_index.CopyFrom(inputs.tensor("edge_index"))
    if inputs.has("edge_weight"):
        graph.edge_weight.CopyFrom(inputs.tensor("edge_weight"))


def to_classify_graphs_request(
    request: oip.ModelInferRequest, version: int, inputs: InferInputs
) -> gnn_pb2.ClassifyGraphsRequest:
    """ClassifyGraphs for a graph classifier: node_features [N, F] and edge_index [2, E] of a disjoint union of
    graphs, and graph_ids [N], each node's graph (0..G-1, ascending, every graph with a node). Edges must stay
    within one graph. The service checks each graph (widths, sizes, node indices) as for ClassifyGraphs."""
    features = to_numpy(inputs.tensor("node_features"), "inputs ('node_features')")
    edges = to_numpy(inputs.tensor("edge_index"), "inputs ('edge_index')")
    ids = to_numpy(inputs.tensor("graph_ids"), "inputs ('graph_ids')")
    if features.ndim != 2:
        raise InvalidArgumentError(f"inputs ('node_features'): expected shape [N, F], got {list(features.shape)}")
    if edges.dtype != np.int64 or edges.ndim != 2 or edges.shape[0] != 2:
        raise InvalidArgumentError(
            f"inputs ('edge_index'): expected INT64 of shape [2, E], got {edges.dtype} of shape {list(edges.shape)}"
        )
    nodes = features.shape[0]
    if ids.dtype != np.int64 or ids.shape != (nodes,):
        raise InvalidArgumentError(
            f"inputs ('graph_ids'): expected INT64 of shape [{nodes}] (one per node), got {ids.dtype} of shape "
            f"{list(ids.shape)}"
        )
    if not nodes:
        raise InvalidArgumentError("inputs ('node_features'): no nodes; send at least one graph")
    steps = np.diff(ids)
    if ids[0] != 0 or steps.min(initial=0) < 0 or steps.max(initial=0) > 1:
        raise InvalidArgumentError(
            "inputs ('graph_ids'): expected each node's graph, 0..G-1 in ascending order with no graph skipped "
            f"(the nodes of graph 0 first), got {ids[:8].tolist()}{'...' if nodes > 8 else ''}"
        )
    if edges.size and (edges.min() < 0 or edges.max() >= nodes):
        bad = int(edges.min() if edges.min() < 0 else edges.max())
        raise InvalidArgumentError(f"inputs ('edge_index'): node index {bad} is out of range for {nodes} nodes")
    if int(ids[-1]) + 1 > MAX_GRAPHS:
        raise InvalidArgumentError(f"inputs ('graph_ids'): {int(ids[-1]) + 1} graphs; at most {MAX_GRAPHS} per request")
    starts = np.concatenate([[0], np.flatnonzero(steps) + 1, [nodes]])
    graph_of_edge = ids[edges[0]] if edges.size else np.zeros(0, np.int64)
    if edges.size and (ids[edges[1]] != graph_of_edge).any():
        i = int(np.flatnonzero(ids[edges[1]] != graph_of_edge)[0])
        raise InvalidArgumentError(
            f"inputs ('edge_index'): edge {i} ({int(edges[0, i])} -> {int(edges[1, i])}) joins graphs "
            f"{int(ids[edges[0, i]])} and {int(ids[edges[1, i]])}; an edge must stay within one graph"
        )
    order = np.argsort(graph_of_edge, kind="stable")
    edge_starts = np.searchsorted(graph_of_edge[order], np.arange(len(starts)))
    message = gnn_pb2.ClassifyGraphsRequest(model_name=request.model_name, model_version=version)
    for g in range(len(starts) - 1):
        graph = message.graphs.add()
        graph.node_features.CopyFrom(from_numpy(features[starts[g] : starts[g + 1]]))
        graph.edge_index.CopyFrom(from_numpy(edges[:, order[edge_starts[g] : edge_starts[g + 1]]] - starts[g]))
    return message


def to_infer_response(request: oip.ModelInferRequest, response, with_id: bool = True) -> oip.ModelInferResponse:
    wanted = {output.name for output in request.outputs}
    reply = oip.ModelInferResponse(model_name=response.model_name, model_version=str(response.model_version),
                                   id=request.id if with_id else "")  # fmt: skip
    for name, tensor in response.outputs.items():
        if wanted and name not in wanted:
            continue
        reply.outputs.add(name=name, datatype=datatype_name(tensor.dtype), shape=tensor.shape)
        reply.raw_output_contents.append(tensor.data)
    labels = list(getattr(response, "labels", []))
    if labels and (not wanted or "class_name" in wanted):
        reply.outputs.add(name="class_name", datatype="BYTES", shape=[len(labels)])
        reply.raw_output_contents.append(encode_bytes_elements([label.encode() for label in labels]))
    return reply


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def infer_response_json(encoded: bytes) -> dict:
    """An encoded ModelInferResponse as a payload record's response: its outputs decoded to lists."""
    reply = oip.ModelInferResponse.FromString(encoded)
    outputs = {}
    for i, output in enumerate(reply.outputs):
        raw = reply.raw_output_contents[i] if i < len(reply.raw_output_contents) else b""
        tensor = tensor_pb2.Tensor(dtype=DTYPE_CODES.get(output.datatype, 0), shape=output.shape, data=raw)
        outputs[output.name] = tensor_json(tensor, output.name, datatype=output.datatype)
    return {"model_name": reply.model_name, "model_version": parse_version(reply.model_version), "outputs": outputs}


def with_request_id(encoded: bytes, request_id: str) -> bytes:
    """An encoded ModelInferResponse without an id, given `request_id` (a field may come in any order)."""
    if not request_id:
        return encoded
    raw = request_id.encode()
    return ID_TAG + _varint(len(raw)) + raw + encoded


GRAPH_STORE_METHODS = ("Recommend", "SimilarItems")  # always on a graph-store graph, whose latest version moves


def gnn_method(signature: set[str], request: oip.ModelInferRequest) -> str:
    """The gnn rpc a ModelInfer call on a model of this signature becomes: a link-prediction model (its signature
    takes pairs) answers through PredictLinks, a graph classifier (graph_ids) through ClassifyGraphs, a recommender
    (user_ids) through Recommend, or SimilarItems when the call sends item_ids; others through Predict."""
    if "user_ids" in signature:
        return "SimilarItems" if any(tensor.name == "item_ids" for tensor in request.inputs) else "Recommend"
    return "PredictLinks" if "pairs" in signature else "ClassifyGraphs" if "graph_ids" in signature else "Predict"


def names_stored_graph(request: oip.ModelInferRequest) -> bool:
    """Whether a gnn request queries a stored graph (whose latest version may change under a key)."""
    return "stored_graph" in request.parameters or any(tensor.name == "stored_graph" for tensor in request.inputs)


class StreamCallContext:
    """One call on a ModelStreamInfer stream: the stream's metadata, its own deadline (the stream's, or
    sooner when the request's `timeout` parameter, in microseconds as tritonclient sends it, says so),
    and its own trailing metadata (which has nowhere to go on a stream, and is dropped)."""

    __slots__ = ("_stream", "_trailing", "_deadline")

    def __init__(self, stream: grpc.aio.ServicerContext, request: oip.ModelInferRequest) -> None:
        self._stream = stream
        self._trailing: tuple = ()
        timeout = request.parameters.get("timeout")
        self._deadline = time.monotonic() + timeout.int64_param / 1e6 if timeout and timeout.int64_param > 0 else None

    def invocation_metadata(self):
        return call_metadata(self._stream)

    def time_remaining(self) -> float | None:
        remaining = self._stream.time_remaining()
        if self._deadline is None:
            return remaining
        own = self._deadline - time.monotonic()
        return own if remaining is None else min(own, remaining)

    def trailing_metadata(self):
        return self._trailing

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)


def stream_response(encoded_infer_response: bytes) -> bytes:
    """A ModelStreamInferResponse carrying an encoded ModelInferResponse, without decoding it."""
    return STREAM_RESPONSE_TAG + _varint(len(encoded_infer_response)) + encoded_infer_response


def stream_error(request: oip.ModelInferRequest, exc: Exception) -> bytes:
    """A failed call on a stream: its status and message in error_message, as tritonclient formats errors."""
    if isinstance(exc, MaasError):
        message = f"[StatusCode.{exc.code.name}] {exc.message}"
    else:
        log.error("ModelStreamInfer: unhandled error for model %r", request.model_name, exc_info=exc)
        message = f"[StatusCode.INTERNAL] {INTERNAL_MESSAGE}"
    return oip.ModelStreamInferResponse(
        error_message=message, infer_response=oip.ModelInferResponse(model_name=request.model_name, id=request.id)
    ).SerializeToString()


def _serialize_infer_response(response) -> bytes:
    return response if type(response) is bytes else response.SerializeToString()


def add_open_inference_to_server(servicer: OpenInferenceServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that ModelInfer may answer with encoded bytes (a cache hit)."""

    class Capture:
        handlers: dict[str, grpc.RpcMethodHandler] = {}

        def add_generic_rpc_handlers(self, handlers) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers) -> None:
            Capture.handlers = dict(handlers)

    open_inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, Capture())
    handlers = Capture.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer, request_deserializer=oip.ModelInferRequest.FromString,
        response_serializer=_serialize_infer_response,
    )  # fmt: skip
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, request_deserializer=oip.ModelInferRequest.FromString
    )  # yields encoded ModelStreamInferResponse messages
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(OPEN_INFERENCE_SERVICE, handlers),))
    server.add_registered_method_handlers(OPEN_INFERENCE_SERVICE, handlers)


def default_version(model: model_pb2.Model, version: str) -> model_pb2.ModelVersion:
    number = parse_version(version) or model.default_version
    for candidate in model.versions:
        if candidate.version == number:
            return candidate
    raise NotFoundError(f"model {model.name!r} has no version {number}; it has {[v.version for v in model.versions]}")


def platform(version: model_pb2.ModelVersion) -> tuple[str, str]:
    return ("onnxruntime_onnx", "onnxruntime") if version.framework == "onnx" else ("pytorch_libtorch", "pytorch")


class OpenInferenceServicer(open_inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, proxy: GatewayProxy, catalog: ModelCatalog, models: GatewayModelService,
                 limiter: RateLimiter | None = None) -> None:  # fmt: skip
        self.proxy = proxy
        self.catalog = catalog
        self.models = models
        self.limiter = limiter  # each message of a ModelStreamInfer stream takes one token, as a call does

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self.catalog.all_reachable())

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        _, model = await self.catalog.find_visible(request.name, current_tenant())
        try:
            return oip.ModelReadyResponse(ready=default_version(model, request.version).state == READY)
        except NotFoundError:
            return oip.ModelReadyResponse(ready=False)

    async def ModelMetadata(self, request, context):
        family, model = await self.catalog.find_visible(request.name, current_tenant())
        version = default_version(model, request.version)

        def metadata(specs):
            return [
                oip.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=datatype_name(s.dtype), shape=s.shape)
                for s in specs
            ]

        outputs = metadata(version.outputs)
        if version.class_names and family == "nlp":
            outputs.append(oip.ModelMetadataResponse.TensorMetadata(name="class_name", datatype="BYTES", shape=[-1]))
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[str(v.version) for v in model.versions],
            platform=platform(version)[0],
            inputs=metadata(version.inputs),
            outputs=outputs,
        )

    async def ModelStreamInfer(self, requests, context):
        """Each message is a ModelInfer call of its own, run concurrently with the others; responses go
        back as calls finish, failures as error_message.

        At most STREAM_IN_FLIGHT messages are running or answered but not yet sent: a message's slot
        frees once its response is handed to the stream. A client that writes without reading stops
        being read, and the gateway holds no more than that many responses for it."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        calls: set[asyncio.Task] = set()
        end = object()

        async def call(request: oip.ModelInferRequest) -> None:
            try:
                await self._admit_message()
                response = await self.ModelInfer(request, StreamCallContext(context, request))
                finished.put_nowait(stream_response(_serialize_infer_response(response)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is this call's response, never the stream's
                finished.put_nowait(stream_error(request, exc))

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = loop.create_task(call(request))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                if calls:
                    await asyncio.wait(set(calls))
                finished.put_nowait(end)
            except Exception as exc:  # noqa: BLE001 - a malformed message: the stream ends with its status
                finished.put_nowait(exc)

        reader = loop.create_task(read())
        try:
            while (item := await finished.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
                slots.release()
        finally:  # the client went away, or the stream ended: nothing of it keeps running
            reader.cancel()
            for task in list(calls):
                task.cancel()

    async def _admit_message(self) -> None:
        if self.limiter is None:
            return
        tenant = current_tenant()
        wait_ms, rate = await self.limiter.wait_ms(tenant)
        if wait_ms:
            raise ResourceExhaustedError(refusal(tenant, rate, wait_ms))

    async def ModelInfer(self, request: oip.ModelInferRequest, context) -> bytes | oip.ModelInferResponse:
        started = time.perf_counter_ns()
        name = request.model_name
        family, model = await self.catalog.find_visible(name, current_tenant())
        # A link-prediction model (its signature takes pairs) answers through PredictLinks, a graph
        # classifier (its signature takes graph_ids) through ClassifyGraphs.
        signature = {s.name for v in model.versions for s in v.inputs} if family == "gnn" else set()
        route = QUERY_ROUTE[family, gnn_method(signature, request)]
        cache, proxy = self.proxy.cache, self.proxy
        arm, request_id = "", request.id or current_request_id()
        protocol = getattr(context, "protocol", "open-inference")  # "rest" for KServe v2 REST calls
        if not parse_version(request.model_version):  # a canary's share goes to its candidate, by the request's id
            chosen, arm = choose(self.catalog.canary(family, name), request_id)
            if chosen:
                request.model_version = str(chosen)
        control = metadata_value(context, CACHE_CONTROL)
        policy = proxy.settings.cache_policy.get(name, {})
        # A stored graph's latest version may change under a key: such queries take the native path's cache.
        if not (cache.enabled and policy.get("enabled", True) and control != "no-store") or (
            family == "gnn" and (names_stored_graph(request) or route.method in GRAPH_STORE_METHODS)
        ):
            response = await self._forward(route, request, context, arm=arm, request_id=request_id, protocol=protocol)
            return to_infer_response(request, response)

        # The version the key names: the one asked for, else the default the catalog last heard of.
        version = parse_version(request.model_version) or self.catalog.default_version(family, name)
        owner = self.catalog.owner_of(family, name)
        digest = message_digest(f"oip/{route.family}/{route.method}", request, OIP_KEY_FIELDS)
        ttl = policy.get("ttl_s")
        key = result_key(family, name, version, digest, owner) if version else None
        cached, counted = None, True
        if key is None or control == "no-cache":
            outcome, counted = "bypass", False
        elif (cached := cache.get_local(family, key)) is not None:
            outcome = "hit"
        elif not cache.available():
            outcome, counted = "error", False  # Redis failed moments ago: uncached until the retry interval ends
        else:
            cached = await cache.get(family, key, ttl)  # counts its own hit, miss or error
            outcome = "hit" if cached is not None else "miss" if cache.available() else "error"
        if cached is not None:
            proxy.stats.succeeded(name, time.perf_counter_ns() - started, "hit")
            if arm:
                record(name, arm, version, "OK", (time.perf_counter_ns() - started) / 1e9)
            self._log_hit(route, request, version, cached, request_id, protocol)
            add_trailing_metadata(context, CACHE_OUTCOME, "hit")
            return with_request_id(cached, request.id)
        if not counted:
            CACHE_RESULTS.labels(family, outcome).inc()
        response = await self._forward(route, request, context, outcome, arm, request_id, protocol)
        encoded = to_infer_response(request, response, with_id=False).SerializeToString()
        ran = response.model_version
        if not parse_version(request.model_version) and ran != version:
            self.catalog.refresh_soon(family)  # the default moved: the catalog is behind
        # As on the native path: nothing is written while Redis is failing, so a hung Redis costs
        # one timeout per retry interval, not one per call.
        if outcome in ("miss", "bypass") and not await cache.put(family, result_key(family, name, ran, digest, owner),
                                                                 encoded, ttl):  # fmt: skip
            outcome = "error"
        add_trailing_metadata(context, CACHE_OUTCOME, outcome)
        return with_request_id(encoded, request.id)

    async def _forward(self, route: FamilyRoute, request: oip.ModelInferRequest, context, cache_outcome: str = "",
                       arm: str = "", request_id: str | None = None, protocol: str = ""):  # fmt: skip
        """The family's response to `request`; with `cache_outcome`, the caller keeps the cache; `arm`:
        the canary arm the request was sent to, its version named ("" without a canary)."""
        version = parse_version(request.model_version)
        message = to_family_request(route.family, request, version, route.method == "PredictLinks",
                                    route.method == "ClassifyGraphs", route.method)  # fmt: skip
        raw = await self.proxy.predict_message(route, message, message.SerializeToString(), context,
                                               trailing=not cache_outcome, cache_outcome=cache_outcome,
                                               arm=arm, request_id=request_id, protocol="")  # fmt: skip
        response = route.predict_response.FromString(raw)
        if protocol:  # the call as the family saw it, in the payload log if sampled
            self.proxy.log_payload(route.family, message.model_name, message.model_version,
                                   lambda masked: message_json(message, masked), lambda: message_json(response),
                                   request_id or current_request_id(), protocol)  # fmt: skip
        return response

    def _log_hit(self, route: FamilyRoute, request: oip.ModelInferRequest, version: int, cached: bytes,
                 request_id: str, protocol: str) -> None:  # fmt: skip
        """A cache hit in the payload log (if sampled): the request as the family would see it, the stored answer."""

        def request_json(masked):
            try:
                message = to_family_request(route.family, request, version, route.method == "PredictLinks",
                                            route.method == "ClassifyGraphs", route.method)  # fmt: skip
            except MaasError:
                return {}
            return message_json(message, masked)

        self.proxy.log_payload(route.family, request.model_name, version, request_json,
                               lambda: infer_response_json(cached), request_id, protocol)  # fmt: skip

    async def ModelConfig(self, request, context):
        family, model = await self.catalog.find_visible(request.name, current_tenant())
        version = default_version(model, request.version)
        batched = family in BATCHED_FAMILIES

        def dims(shape):
            dims = list(shape[1:]) if batched else list(shape)
            return dims or [1]

        config = oip.ModelConfig(
            name=model.name,
            platform=platform(version)[0],
            backend=platform(version)[1],
            max_batch_size=MAX_BATCH_SIZE if batched else 0,
            input=[oip.ModelInput(name=s.name, data_type=CONFIG_TYPES[datatype_name(s.dtype)], dims=dims(s.shape))
                   for s in version.inputs],
            output=[oip.ModelOutput(name=s.name, data_type=CONFIG_TYPES[datatype_name(s.dtype)], dims=dims(s.shape))
                    for s in version.outputs],
        )  # fmt: skip
        return oip.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        """One entry per loaded version; the gateway's counters are per model, on the default version's entry."""
        if request.name:
            _, model = await self.catalog.find_visible(request.name, current_tenant())
            models = [model]
        else:
            models = [m for family in self.catalog.models.values() for m in family.values()
                      if self.catalog.visible(m, current_tenant())]  # fmt: skip
        stats = []
        for model in sorted(models, key=lambda m: m.name):
            for version in model.versions:
                if request.version and str(version.version) != request.version:
                    continue
                counters = self.proxy.stats.by_model.get(model.name)
                if counters is None or version.version != model.default_version:
                    stats.append(oip.ModelStatistics(name=model.name, version=str(version.version)))
                    continue
                duration = oip.StatisticDuration
                stats.append(
                    oip.ModelStatistics(
                        name=model.name,
                        version=str(version.version),
                        last_inference=counters.last_inference_ms,
                        inference_count=counters.success_count,
                        execution_count=counters.success_count - counters.cache_hits,
                        inference_stats=oip.InferStatistics(
                            success=duration(count=counters.success_count, ns=counters.success_ns),
                            fail=duration(count=counters.fail_count, ns=counters.fail_ns),
                            # Every call is admitted through a queue (the batcher's, or the cache's
                            # fast path); perf_analyzer finds the version it measured by this count.
                            queue=duration(count=counters.success_count),
                            cache_hit=duration(count=counters.cache_hits),
                            cache_miss=duration(count=counters.cache_misses),
                        ),
                    )
                )
        return oip.ModelStatisticsResponse(model_stats=stats)

    async def RepositoryIndex(self, request, context):
        entries = []
        for models in self.catalog.models.values():
            for model in models.values():
                if not self.catalog.visible(model, current_tenant()):
                    continue
                for version in model.versions:
                    if request.ready and version.state != READY:
                        continue
                    entries.append(oip.RepositoryIndexResponse.ModelIndex(
                        name=model.name, version=str(version.version), state=STATE_NAMES.get(version.state, "UNKNOWN"),
                        reason=version.state_reason))  # fmt: skip
        return oip.RepositoryIndexResponse(models=sorted(entries, key=lambda e: (e.name, int(e.version))))

    async def RepositoryModelLoad(self, request, context):
        """The same path as ModelService.LoadModel: the service that has the model in its store loads it."""
        await self.models.LoadModel(models_pb2.LoadModelRequest(model_name=request.model_name), context)
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self.models.UnloadModel(models_pb2.UnloadModelRequest(model_name=request.model_name), context)
        return oip.RepositoryModelUnloadResponse()
