"""The Open Inference Protocol (KServe v2) and Triton's extensions, for every family.

Each model name is routed to the service that owns it. Requests are converted to the family's
Predict message and go through the same path as native calls (cache, deadlines, statistics);
tensors stay raw bytes both ways wherever the caller sends raw contents.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from gateway.auth import current_tenant
from gateway.catalog import ModelCatalog
from gateway.model_service import GatewayModelService
from gateway.proxy import QUERY_ROUTE, GatewayProxy
from inference import open_inference_pb2 as oip
from inference import open_inference_pb2_grpc
from maas.common.v1 import model_pb2, tensor_pb2
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.models.v1 import models_pb2
from maas.nlp.v1 import nlp_pb2
from shared.errors import InvalidArgumentError, NotFoundError
from shared.tensors import DTYPE_CODES, DTYPE_NAMES, NUMPY_DTYPES, check_shape, from_numpy, to_numpy

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
                      graphs: bool = False):  # fmt: skip
    inputs = InferInputs(request)
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


def to_infer_response(request: oip.ModelInferRequest, response) -> oip.ModelInferResponse:
    wanted = {output.name for output in request.outputs}
    reply = oip.ModelInferResponse(model_name=response.model_name, model_version=str(response.model_version),
                                   id=request.id)  # fmt: skip
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


def default_version(model: model_pb2.Model, version: str) -> model_pb2.ModelVersion:
    number = parse_version(version) or model.default_version
    for candidate in model.versions:
        if candidate.version == number:
            return candidate
    raise NotFoundError(f"model {model.name!r} has no version {number}; it has {[v.version for v in model.versions]}")


def platform(version: model_pb2.ModelVersion) -> tuple[str, str]:
    return ("onnxruntime_onnx", "onnxruntime") if version.framework == "onnx" else ("pytorch_libtorch", "pytorch")


class OpenInferenceServicer(open_inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, proxy: GatewayProxy, catalog: ModelCatalog, models: GatewayModelService) -> None:
        self.proxy = proxy
        self.catalog = catalog
        self.models = models

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

    async def ModelInfer(self, request: oip.ModelInferRequest, context):
        family, model = await self.catalog.find_visible(request.model_name, current_tenant())
        # A link-prediction model (its signature takes pairs) answers through PredictLinks, a graph
        # classifier (its signature takes graph_ids) through ClassifyGraphs.
        signature = {s.name for v in model.versions for s in v.inputs} if family == "gnn" else set()
        links, graphs = "pairs" in signature, "graph_ids" in signature
        route = QUERY_ROUTE[family, "PredictLinks" if links else "ClassifyGraphs" if graphs else "Predict"]
        message = to_family_request(family, request, parse_version(request.model_version), links, graphs)
        raw = await self.proxy.predict_message(route, message, message.SerializeToString(), context)
        response = route.predict_response.FromString(raw)
        return to_infer_response(request, response)

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
