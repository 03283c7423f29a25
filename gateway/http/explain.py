"""Explain over HTTP, in the KServe v2 style: `POST /v2/models/{name}[/versions/{v}]/explain`.

KServe's v2 REST protocol has no explain verb (its v1 protocol had `:explain`); this one takes the
body `/infer` takes (JSON or Triton's binary tensor extension) and answers in the shape `/infer`
answers, so a tritonclient-style caller reuses its tensors. The explanation's options travel as
request `parameters`: `method`; `steps` (dense) or `epochs` (gnn); `target`; `seed` (gnn);
`compare_text` (nlp embedding models). Dense baselines are inputs named `<input>.baseline`.

The request becomes the family's ExplainRequest and goes through the proxy exactly as a gRPC
Explain does: API key and tenant, size limits, the same cache (keyed with the method and its
parameters) and the caller's deadline (`x-request-timeout`). The response's outputs are the
ExplainResponse's fields as tensors, named after them (dense attributions: `<input>.attributions`;
nlp tokens: `tokens` and `token_spans`), and `parameters.method` names the method that ran.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from google.protobuf.descriptor import FieldDescriptor

from gateway.auth import current_tenant
from gateway.http.context import HttpCallContext
from gateway.http.kserve import (
    ERRORS,
    HEADER_LENGTH,
    INFER_BODY,
    INFER_RESPONSES,
    TIMEOUT_DOC,
    _off_loop,
    infer_response,
    parse_infer_request,
    read_body,
)
from gateway.open_inference import (
    InferInputs,
    _copy_inline_graph,
    _integers,
    _stored_graph,
    datatype_name,
    encode_bytes_elements,
    parse_version,
)
from gateway.proxy import QUERY_ROUTE
from inference import open_inference_pb2 as oip
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2
from shared.errors import InvalidArgumentError

BASELINE_SUFFIX = ".baseline"
ATTRIBUTIONS_SUFFIX = ".attributions"
# Options each family's Explain takes from the request's parameters, and their types.
OPTIONS = {
    "dense": {"method": str, "steps": int, "target": int},
    "nlp": {"method": str, "target": int, "compare_text": str},
    "gnn": {"method": str, "epochs": int, "target": int, "seed": int, "stored_graph": str, "graph_version": int},
}
PARAMETER_TYPES = {str: "string_param", int: "int64_param"}


def _options(family: str, request: oip.ModelInferRequest) -> dict[str, Any]:
    """The request's explanation parameters, type-checked; unknown ones are refused, naming the known."""
    known = OPTIONS[family]
    options = {}
    for name, parameter in request.parameters.items():
        if name == "binary_data_output":
            continue
        if name not in known:
            raise InvalidArgumentError(f"parameters.{name}: not an option of {family} explanations; they take "
                                       f"{sorted(known)}")  # fmt: skip
        field = PARAMETER_TYPES[known[name]]
        if parameter.WhichOneof("parameter_choice") != field:
            expected = "a string" if known[name] is str else "a whole number"
            raise InvalidArgumentError(f"parameters.{name}: must be {expected}")
        options[name] = getattr(parameter, field)
    return options


def _one_text(inputs: InferInputs, names: tuple[str, ...], field: str) -> str | None:
    name = next((n for n in names if inputs.has(n)), None)
    if name is None:
        return None
    texts = inputs.texts(name)
    if len(texts) != 1:
        raise InvalidArgumentError(f"inputs ({name!r}): an explanation explains one text, got {len(texts)}; "
                                   f"send one {field} per call")  # fmt: skip
    return texts[0]


def to_explain_request(family: str, request: oip.ModelInferRequest):
    """The family's ExplainRequest for a v2 explain body."""
    options = _options(family, request)
    inputs = InferInputs(request)
    version = parse_version(request.model_version)
    if family == "dense":
        message = dense_pb2.ExplainRequest(model_name=request.model_name, model_version=version,
                                           method=options.get("method", ""), steps=options.get("steps", 0))  # fmt: skip
        for name in inputs.names():
            if name.endswith(BASELINE_SUFFIX):
                message.baselines[name.removesuffix(BASELINE_SUFFIX)].CopyFrom(inputs.tensor(name))
            else:
                message.inputs[name].CopyFrom(inputs.tensor(name))
    elif family == "nlp":
        text = _one_text(inputs, ("text", "texts"), "text")
        if text is None:
            raise InvalidArgumentError(f"inputs: missing 'text' (BYTES, shape [1]); got {inputs.names()}")
        compare = _one_text(inputs, ("compare_text",), "compare_text")
        message = nlp_pb2.ExplainRequest(model_name=request.model_name, model_version=version, text=text,
                                         method=options.get("method", ""),
                                         compare_text=compare if compare is not None else
                                         options.get("compare_text", ""))  # fmt: skip
    else:
        message = gnn_pb2.ExplainRequest(model_name=request.model_name, model_version=version,
                                         method=options.get("method", ""), epochs=options.get("epochs", 0),
                                         seed=options.get("seed", 0))  # fmt: skip
        stored, graph_version = _stored_graph(request, inputs)
        if stored:
            message.stored_graph = stored
            message.graph_version = graph_version
        elif inputs.has("node_features") or inputs.has("edge_index"):
            _copy_inline_graph(message.graph, inputs)
        message.node_ids.extend(_integers(inputs, "node_ids"))
        message.fan_outs.extend(_integers(inputs, "fan_outs"))
        if inputs.has("pairs"):
            message.pairs.CopyFrom(inputs.tensor("pairs"))
    if "target" in options:
        message.target = options["target"]
    return message


# Scalars and repeated scalars of an ExplainResponse, as v2 datatypes.
SCALAR_TYPES = {
    FieldDescriptor.TYPE_INT64: ("INT64", "<i8"),
    FieldDescriptor.TYPE_INT32: ("INT32", "<i4"),
    FieldDescriptor.TYPE_DOUBLE: ("FP64", "<f8"),
}
IN_HEADER = ("model_name", "model_version", "method")


def to_explain_reply(request: oip.ModelInferRequest, response) -> oip.ModelInferResponse:
    """Every field of a family's ExplainResponse as an output tensor named after it (the ones `outputs` names)."""
    wanted = {output.name for output in request.outputs}
    reply = oip.ModelInferResponse(model_name=response.model_name, model_version=str(response.model_version),
                                   id=request.id)  # fmt: skip
    reply.parameters["method"].string_param = response.method

    def add(name: str, datatype: str, shape, raw: bytes) -> None:
        if not wanted or name in wanted:
            reply.outputs.add(name=name, datatype=datatype, shape=list(shape))
            reply.raw_output_contents.append(raw)

    for field in response.DESCRIPTOR.fields:
        if field.name in IN_HEADER:
            continue
        value = getattr(response, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            suffix = ATTRIBUTIONS_SUFFIX if field.name == "attributions" else ""
            for key, tensor in value.items():
                add(f"{key}{suffix}", datatype_name(tensor.dtype), tensor.shape, tensor.data)
        elif field.message_type is not None and field.message_type.name == "Tensor":
            if response.HasField(field.name):
                add(field.name, datatype_name(value.dtype), value.shape, value.data)
        elif field.message_type is not None:  # nlp tokens: their text, and their character spans
            add(field.name, "BYTES", [len(value)], encode_bytes_elements([token.token.encode() for token in value]))
            spans = np.array([[token.start, token.end] for token in value], "<i8").reshape(len(value), 2)
            add("token_spans", "INT64", spans.shape, spans.tobytes())
        elif field.type == FieldDescriptor.TYPE_STRING:
            if value:
                add("class_name" if field.name == "label" else field.name, "BYTES", [1], encode_bytes_elements(
                    [value.encode()]))  # fmt: skip
        elif field.type in SCALAR_TYPES:
            datatype, dtype = SCALAR_TYPES[field.type]
            array = np.asarray(list(value) if field.is_repeated else [value], dtype)
            add(field.name, datatype, array.shape, array.tobytes())
    return reply


# --- routes ---------------------------------------------------------------------------------------

router = APIRouter(tags=["Explanations"], responses=ERRORS)

EXPLAIN_DESCRIPTION = """Explains a prediction: the body `/infer` takes, with the explanation's options as
request `parameters`, and the answer in `/infer`'s shape, every field of the family's ExplainResponse an output
tensor. Same API key, tenant, limits, cache and deadline (`x-request-timeout`) as gRPC Explain; an explanation
past the deadline is 504 and stops computing (submit a job through gRPC ExplanationService instead).

* **dense**: the model's inputs, by name; `<input>.baseline` inputs (each row's shape or the input's; zeros
  when absent). Parameters: `method` (`integrated_gradients`, `feature_ablation`, `kernel_shap`), `steps`,
  `target`. Outputs: `<input>.attributions` (FP32, the input's shape), the model's outputs, `targets`, `scores`,
  `baseline_scores`.
* **nlp**: `text` (BYTES, shape [1]); for embedding models `compare_text` too (an input or a parameter).
  Parameters: `method` (`occlusion`), `target`. Outputs: `tokens`, `token_spans` (character [start, end)),
  `attributions`, `target`, `class_name`, `score`, `baseline_score`, `probabilities`.
* **gnn**: `node_ids` (INT64) for a node classifier, `pairs` (INT64 [2, P]) for a link predictor, neither for a
  graph classifier (one inline graph); `stored_graph` (a BYTES input or a parameter, with `graph_version` and
  `fan_outs` for a graph-store graph) or an inline graph (`node_features`, `edge_index`, `edge_weight`).
  Parameters: `method` (`gnn_explainer`, `integrated_gradients`, `saliency`), `epochs`, `target`, `seed`,
  `graph_version`. Outputs: `edge_mask`, `node_feature_mask`, `subgraph_edge_ids`, `subgraph_node_ids`,
  `subgraph_edge_index`, `graph_version`, the prediction's outputs.
"""


async def _explain(request: Request, model_name: str, model_version: str = "") -> Response:
    front = request.app.state.front
    context = HttpCallContext.from_request(request)
    body = await read_body(request, front.settings.max_request_bytes)
    message, choice = await _off_loop(
        len(body), parse_infer_request, body, request.headers.get(HEADER_LENGTH), model_name, model_version,
        front.settings.max_tensor_elements,
    )  # fmt: skip
    family, _ = await front.catalog.find_visible(model_name, current_tenant())
    route = QUERY_ROUTE[family, "Explain"]
    explain = to_explain_request(family, message)
    raw = await front.proxy.predict_message(route, explain, explain.SerializeToString(), context)
    reply = to_explain_reply(message, route.predict_response.FromString(raw))
    return await infer_response(reply, choice, context)


@router.post("/v2/models/{model_name}/explain", summary="Explain a prediction", operation_id="model_explain",
             description=EXPLAIN_DESCRIPTION, openapi_extra=INFER_BODY, responses=INFER_RESPONSES,
             response_class=Response)  # fmt: skip
async def explain(
    request: Request,
    model_name: str,
    inference_header_content_length: int | None = Header(None, ge=0, alias=HEADER_LENGTH),
    x_request_timeout: float | None = Header(None, gt=0, description=TIMEOUT_DOC),
):
    return await _explain(request, model_name)


@router.post("/v2/models/{model_name}/versions/{model_version}/explain",
             summary="Explain a prediction (a given version)", operation_id="model_explain_version",
             description=EXPLAIN_DESCRIPTION, openapi_extra=INFER_BODY, responses=INFER_RESPONSES,
             response_class=Response)  # fmt: skip
async def explain_version(
    request: Request,
    model_name: str,
    model_version: str,
    inference_header_content_length: int | None = Header(None, ge=0, alias=HEADER_LENGTH),
    x_request_timeout: float | None = Header(None, gt=0, description=TIMEOUT_DOC),
):
    return await _explain(request, model_name, model_version)
