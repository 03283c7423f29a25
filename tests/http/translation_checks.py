"""The HTTP front's translations, without a cluster: REST bodies to ModelInferRequest and back, errors to
HTTP statuses, the call context the gateway's servicers see, and the OpenAPI document.

Run in a process of their own by tests/unit/test_http_translation.py: they import the gateway's copy of the
Open Inference protos (package `inference`), which cannot share a process with tritonclient.grpc's copy
that other test modules import (protobuf refuses a second `inference.DataType`).
"""

from __future__ import annotations

import gzip
import json
import time

import grpc
import numpy as np
import pytest
from openapi_spec_validator import validate

from gateway.http.app import HttpFront, create_app
from gateway.http.context import HttpCallContext, TooLargeError, http_status
from gateway.http.kserve import OutputChoice, _decompress, parse_infer_request, render_infer_response
from gateway.http.openai_compat import approximate_tokens, encode, shorten
from gateway.open_inference import InferInputs, encode_bytes_elements
from gateway.settings import GatewaySettings
from inference import open_inference_pb2 as oip
from shared.errors import InvalidArgumentError, NotFoundError, UpstreamError

LIMIT = 1 << 20


def parse(doc, binary=b"", **kwargs):
    header = json.dumps(doc).encode()
    length = str(len(header)) if binary else None
    return parse_infer_request(header + binary, length, "m", "", LIMIT, **kwargs)


def test_json_tensors_become_raw_contents_the_grpc_translation_reads():
    message, choice = parse({"inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
        {"name": "texts", "datatype": "BYTES", "shape": [2], "data": ["a", "héllo"]},
    ], "parameters": {"stored_graph": "karate", "binary_data_output": True}})  # fmt: skip
    inputs = InferInputs(message)
    np.testing.assert_array_equal(np.frombuffer(inputs.tensor("pixels").data, "<f4"), [1, 2, 3, 4])
    assert inputs.texts("texts") == ["a", "héllo"]
    assert message.parameters["stored_graph"].string_param == "karate"
    assert choice.is_binary("anything")


def test_binary_inputs_follow_the_header_in_order():
    a, b = np.arange(4, dtype="<i8"), np.arange(3, dtype="<f4")
    message, _ = parse({"inputs": [
        {"name": "a", "datatype": "INT64", "shape": [4], "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": b.nbytes}},
    ]}, a.tobytes() + b.tobytes())  # fmt: skip
    assert list(message.raw_input_contents) == [a.tobytes(), b.tobytes()]


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}, "needs 3 elements"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2, 3]}]}, "more than the 2"),
        ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}, "not INT8"),
        ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}, "true or false"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}, "strings"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1 << 20, 1 << 20], "data": []}]}, "elements"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
          "outputs": [{"name": "y", "parameters": {"classification": 3}}]}, "classification"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                      "parameters": {"shared_memory_region": "r"}}]}, "shared memory"),
        ({"inputs": "x"}, "inputs: required"),
        ([1], "JSON object"),
    ],
)  # fmt: skip
def test_bad_bodies_name_the_field(doc, fragment):
    with pytest.raises(InvalidArgumentError) as err:
        parse(doc)
    assert fragment in err.value.message


def test_replies_are_json_or_a_header_followed_by_binary_outputs():
    reply = oip.ModelInferResponse(model_name="m", model_version="3", id="r1")
    reply.outputs.add(name="label", datatype="INT64", shape=[2])
    reply.raw_output_contents.append(np.array([1, 0], "<i8").tobytes())
    reply.outputs.add(name="class_name", datatype="BYTES", shape=[2])
    reply.raw_output_contents.append(encode_bytes_elements([b"positive", b"negative"]))
    body, length = render_infer_response(reply, OutputChoice())
    assert length is None
    assert json.loads(body)["outputs"][1]["data"] == ["positive", "negative"]
    body, length = render_infer_response(reply, OutputChoice(binary={"label": True}))
    header = json.loads(body[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16} and header["id"] == "r1"
    assert np.frombuffer(body[length:], "<i8").tolist() == [1, 0]


def test_compressed_bodies_are_inflated_within_the_limit():
    assert _decompress(gzip.compress(b"{}"), "gzip", 10) == b"{}"
    with pytest.raises(TooLargeError):
        _decompress(gzip.compress(b"0" * 1000), "gzip", 100)


def test_grpc_codes_map_to_http_statuses():
    assert http_status(InvalidArgumentError("x")) == 400
    assert http_status(NotFoundError("x")) == 404
    assert http_status(TooLargeError("x")) == 413
    assert http_status(UpstreamError(grpc.StatusCode.UNAVAILABLE, "x")) == 503
    assert http_status(UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "x")) == 504
    assert http_status(UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x")) == 429
    assert http_status(UpstreamError(grpc.StatusCode.DATA_LOSS, "x")) == 500


def test_the_call_context_gives_the_servicers_a_deadline_metadata_and_trailers():
    context = HttpCallContext([("cache-control", "no-cache")], 2.0)
    assert 1.5 < context.time_remaining() <= 2.0
    assert HttpCallContext([], None).time_remaining() is None
    context.set_trailing_metadata((("maas-cache", "hit"),))
    assert context.trailing("maas-cache") == "hit" and dict(context.invocation_metadata())["cache-control"]
    expired = HttpCallContext([], 0.001)
    time.sleep(0.01)
    assert expired.time_remaining() == 0.0


def test_embedding_helpers():
    vectors = np.array([[3.0, 4.0, 12.0]], np.float32) / 13
    short = shorten(vectors, 2)
    np.testing.assert_allclose(short, [[0.6, 0.8]], atol=1e-6)
    assert encode(short[0], "float") == pytest.approx([0.6, 0.8])
    assert isinstance(encode(short[0], "base64"), str)
    assert approximate_tokens("Hello, world!") == 4 + 2


def test_the_openapi_document_is_valid_without_a_cluster():
    app = create_app(HttpFront(GatewaySettings(), None, None, None, None))
    document = app.openapi()
    validate(document)
    assert "/v2/models/{model_name}/infer" in document["paths"] and "/v1/embeddings" in document["paths"]
    operation = document["paths"]["/v1/embeddings"]["post"]
    assert operation["security"] == [{"apiKey": []}, {}] and "422" not in operation["responses"]
