"""Explain over HTTP (`POST /v2/models/{name}/explain`), for every family, against the gRPC Explain it stands for."""

from __future__ import annotations

import json
from http.client import HTTPConnection

import numpy as np
import pytest

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from services.dense.datasets import digits_split
from shared.tensors import from_numpy, to_numpy


def post(cluster, path: str, body, headers=None) -> tuple[int, dict, dict]:
    """(status, parsed JSON body, response headers) of one POST."""
    connection = HTTPConnection("127.0.0.1", cluster.ports.gateway_http, timeout=120)
    try:
        connection.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json",
                                                                       **(headers or {})})  # fmt: skip
        response = connection.getresponse()
        content = response.read()
        return response.status, json.loads(content), dict(response.getheaders())
    finally:
        connection.close()


def outputs(reply: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in reply["outputs"]}


def text_input(name: str, text: str) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}


def test_dense_explanation_over_http_equals_grpc(cluster, gateway_channel):
    x = digits_split()[1][:2].astype(np.float32)
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": x.tolist()}],
            "parameters": {"method": "integrated_gradients", "steps": 32}}  # fmt: skip
    status, reply, headers = post(cluster, "/v2/models/digits-mlp/explain", body, {"cache-control": "no-store"})
    assert status == 200, reply
    got = outputs(reply)
    assert reply["parameters"] == {"method": "integrated_gradients"} and reply["model_version"] == "1"
    assert got["pixels.attributions"].shape == (2, 64) and got["probabilities"].shape == (2, 10)
    grpc_reply = dense_pb2_grpc.DenseServiceStub(gateway_channel).Explain(
        dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(x)},
                                 method="integrated_gradients", steps=32),
        timeout=60,
    )  # fmt: skip
    np.testing.assert_allclose(got["pixels.attributions"], to_numpy(grpc_reply.attributions["pixels"], "a"),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert got["targets"].tolist() == list(grpc_reply.targets)
    np.testing.assert_allclose(got["scores"], grpc_reply.scores, rtol=1e-5)
    # A baseline as an input named <input>.baseline, one row broadcast over the batch.
    body["inputs"].append({"name": "pixels.baseline", "datatype": "FP32", "shape": [64], "data": [4.0] * 64})
    status, reply, _ = post(cluster, "/v2/models/digits-mlp/versions/1/explain", body)
    assert status == 200, reply
    based = outputs(reply)
    assert not np.allclose(based["baseline_scores"], got["baseline_scores"])
    # The same explanation again comes from the cache, as over gRPC.
    assert post(cluster, "/v2/models/digits-mlp/versions/1/explain", body)[2]["maas-cache"] == "hit"


def test_nlp_explanations_over_http(cluster):
    text = "What a lovely, kind host."
    status, reply, _ = post(cluster, "/v2/models/sentiment/explain", {"inputs": [text_input("text", text)]})
    assert status == 200, reply
    got = outputs(reply)
    assert reply["parameters"]["method"] == "occlusion" and got["class_name"].tolist() == ["positive"]
    assert len(got["tokens"]) == len(got["attributions"]) == len(got["token_spans"]) == 7
    assert [text[start:end].lower() for start, end in got["token_spans"]] == got["tokens"].tolist()
    status, reply, _ = post(cluster, "/v2/models/minilm-l6-v2/explain", {
        "inputs": [text_input("text", "A cat sat on the mat.")],
        "parameters": {"compare_text": "A kitten rested on the rug."}})  # fmt: skip
    assert status == 200, reply
    assert outputs(reply)["tokens"].tolist()[:2] == ["a", "cat"]


def test_gnn_explanation_over_http_equals_grpc(cluster, gateway_channel):
    body = {"inputs": [{"name": "node_ids", "datatype": "INT64", "shape": [1], "data": [5]}],
            "parameters": {"stored_graph": "karate", "method": "saliency"}}  # fmt: skip
    status, reply, _ = post(cluster, "/v2/models/karate-gcn/explain", body)
    assert status == 200, reply
    got = outputs(reply)
    grpc_reply = gnn_pb2_grpc.GnnServiceStub(gateway_channel).Explain(
        gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[5], method="saliency"),
        timeout=60,
    )
    np.testing.assert_allclose(got["edge_mask"], to_numpy(grpc_reply.edge_mask, "edge_mask"), rtol=1e-5, atol=1e-7)
    assert got["subgraph_edge_ids"].tolist() == list(grpc_reply.subgraph_edge_ids)
    assert got["node_ids"].tolist() == [5]


def test_link_explanation_on_a_graph_store_graph_over_http_equals_grpc(cluster, gateway_channel):
    """A link predictor's pairs on a graph-store graph, with its version and fan-outs, as gRPC Explain."""
    pairs = [[11, 27], [48, 55]]
    body = {"inputs": [{"name": "pairs", "datatype": "INT64", "shape": [2, 2], "data": [11, 27, 48, 55]},
                       {"name": "fan_outs", "datatype": "INT32", "shape": [2], "data": [-1, -1]}],
            "parameters": {"stored_graph": "les-miserables", "graph_version": 1, "method": "saliency"}}  # fmt: skip
    status, reply, _ = post(cluster, "/v2/models/lesmis-links/explain", body)
    assert status == 200, reply
    got = outputs(reply)
    grpc_reply = gnn_pb2_grpc.GnnServiceStub(gateway_channel).Explain(
        gnn_pb2.ExplainRequest(model_name="lesmis-links", stored_graph="les-miserables", graph_version=1,
                               pairs=from_numpy(np.array(pairs, np.int64)), fan_outs=[-1, -1], method="saliency"),
        timeout=60,
    )  # fmt: skip
    np.testing.assert_allclose(got["edge_mask"], to_numpy(grpc_reply.edge_mask, "edge_mask"), rtol=1e-5, atol=1e-7)
    assert got["subgraph_node_ids"].tolist() == list(grpc_reply.subgraph_node_ids)
    assert got["graph_version"].tolist() == [1]
    assert got["edge_mask"].shape == (len(grpc_reply.subgraph_edge_ids),)


BAD = [
    ("digits-mlp", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
                    "parameters": {"method": "magic"}}, "method: unknown method 'magic'"),
    ("digits-mlp", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
                    "parameters": {"epochs": 3}}, "parameters.epochs: not an option of dense explanations"),
    ("digits-mlp", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}],
                    "parameters": {"steps": "many"}}, "parameters.steps: must be a whole number"),
    ("digits-mlp", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64},
                               {"name": "pixels.baseline", "datatype": "FP32", "shape": [3], "data": [0.0] * 3}]},
     "baselines['pixels']: shape must be"),
    ("sentiment", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]},
     "an explanation explains one text, got 2"),
    ("sentiment", {"inputs": [text_input("text", "go " * 300)]}, "over the model's limit of 128"),
    ("karate-gcn", {"inputs": [{"name": "node_ids", "datatype": "INT64", "shape": [1], "data": [0]}],
                    "parameters": {"stored_graph": "karate", "epochs": 10**6}}, "epochs: must be 0 (the default) to"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "body", "fragment"), BAD)
def test_bad_explain_requests_are_400_naming_the_field(cluster, model, body, fragment):
    status, reply, _ = post(cluster, f"/v2/models/{model}/explain", body)
    assert status == 400 and fragment in reply["error"], reply


def test_unknown_models_are_404_and_a_passed_deadline_is_504(cluster):
    body = {"inputs": [text_input("text", "fine")]}
    status, reply, _ = post(cluster, "/v2/models/no-such-model/explain", body)
    assert status == 404 and "no-such-model" in reply["error"]
    status, reply, _ = post(cluster, "/v2/models/sentiment/explain", body, {"x-request-timeout": "0.000001"})
    assert status == 504, reply


def test_the_openapi_document_describes_explain(cluster):
    connection = HTTPConnection("127.0.0.1", cluster.ports.gateway_http, timeout=30)
    connection.request("GET", "/openapi.json")
    document = json.loads(connection.getresponse().read())
    connection.close()
    for path in ("/v2/models/{model_name}/explain", "/v2/models/{model_name}/versions/{model_version}/explain"):
        operation = document["paths"][path]["post"]
        assert "integrated_gradients" in operation["description"] and "400" in operation["responses"]
