"""KServe v2 REST on the gateway's HTTP port, called with Triton's own client, tritonclient.http, and curl."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from http.client import HTTPConnection
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.http as triton
from torch_geometric.datasets import KarateClub
from tritonclient.utils import InferenceServerException

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.dense.datasets import digits_split
from shared.tensors import from_numpy, to_numpy


@pytest.fixture(scope="module")
def http(cluster) -> str:
    return f"127.0.0.1:{cluster.ports.gateway_http}"


@pytest.fixture(scope="module")
def client(http):
    with triton.InferenceServerClient(http, network_timeout=60.0) as client:
        yield client


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "maas" and "binary_tensor_data" in metadata["extensions"]


@pytest.mark.parametrize("model", ["digits-mlp", "karate-gcn", "minilm-l6-v2", "sentiment"])
def test_model_ready_metadata_and_config_for_each_family(client, model):
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    metadata = client.get_model_metadata(model)
    assert metadata["name"] == model and metadata["versions"] and metadata["inputs"] and metadata["outputs"]
    assert client.get_model_config(model)["name"] == model


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_dense_inference_equals_grpc(client, gateway_channel, binary):
    _, x_test, _, y_test = digits_split()
    pixels = triton.InferInput("pixels", list(x_test[:32].shape), "FP32")
    pixels.set_data_from_numpy(x_test[:32], binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
    result = client.infer("digits-mlp", [pixels], outputs=outputs)
    labels = result.as_numpy("label")
    assert (labels == y_test[:32]).mean() >= 0.9
    reply = dense_pb2_grpc.DenseServiceStub(gateway_channel).Predict(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(x_test[:32])}), timeout=30
    )
    assert (labels == to_numpy(reply.outputs["label"], "label")).all()
    np.testing.assert_allclose(result.as_numpy("probabilities"), to_numpy(reply.outputs["probabilities"], "p"),
                               atol=1e-6)  # fmt: skip
    sent = result.get_response()
    assert sent["model_version"] == "1"
    assert ("parameters" in sent["outputs"][0]) is binary  # binary_data_size when binary, data when JSON


def test_dense_all_outputs_come_back_binary_by_default(client):
    _, x_test, _, _ = digits_split()
    pixels = triton.InferInput("pixels", [3, 64], "FP32")
    pixels.set_data_from_numpy(x_test[:3])
    result = client.infer("digits-mlp", [pixels])  # no outputs named: binary_data_output
    assert result.as_numpy("label").shape == (3,) and result.as_numpy("probabilities").shape == (3, 10)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_gnn_with_named_graph_inputs_and_with_a_stored_graph(client):
    graph = KarateClub()[0]
    features = triton.InferInput("node_features", list(graph.x.shape), "FP32")
    features.set_data_from_numpy(graph.x.numpy().astype(np.float32))
    edges = triton.InferInput("edge_index", list(graph.edge_index.shape), "INT64")
    edges.set_data_from_numpy(graph.edge_index.numpy().astype(np.int64))
    named = client.infer("karate-gcn", [features, edges])
    assert named.as_numpy("label").shape == (34,)
    assert (named.as_numpy("label") == graph.y.numpy()).mean() >= 0.7

    ids = triton.InferInput("node_ids", [3], "INT64")
    ids.set_data_from_numpy(np.array([0, 16, 33], dtype=np.int64), binary_data=False)
    stored = client.infer("karate-gcn", [ids], parameters={"stored_graph": "karate"})
    assert stored.as_numpy("label").tolist() == named.as_numpy("label")[[0, 16, 33]].tolist()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_nlp_texts_as_bytes(client, binary):
    texts = np.array([b"I love it", b"awful, a waste of money"], dtype=object)
    tensor = triton.InferInput("texts", [2], "BYTES")
    tensor.set_data_from_numpy(texts, binary_data=binary)
    classified = client.infer("sentiment", [tensor],
                              outputs=[triton.InferRequestedOutput("class_name", binary_data=binary)])  # fmt: skip
    names = [n.decode() if isinstance(n, bytes) else n for n in classified.as_numpy("class_name").tolist()]
    assert names == ["positive", "negative"]  # JSON data comes back as str, binary as bytes
    embedded = client.infer("minilm-l6-v2", [tensor]).as_numpy("embedding")
    assert embedded.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-4)


def test_errors_carry_the_grpc_status_as_http_status(client, http):
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert err.value.status() == "404" and "no-such-model" in err.value.message()
    pixels = triton.InferInput("pixels", [1, 3], "FP32")
    pixels.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits-mlp", [pixels])
    assert err.value.status() == "400" and "pixels" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits-mlp", [pixels], model_version="99")
    assert err.value.status() == "404"


def post(address: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = address.split(":")
    connection = HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", path, body, headers or {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"not json", "not JSON"),
        (b'{"inputs": []}', "inputs: required"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1, 2]}]}', "needs 64"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP99", "shape": [1], "data": [1]}]}', "datatype"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1], "data": []}]}', "dimension -1"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": ["x"]}]}', "numbers"),
    ],
)
def test_bad_bodies_are_400_with_the_field_named(http, body, fragment):
    status, headers, content = post(http, "/v2/models/digits-mlp/infer", body)
    assert status == 400, content
    assert fragment in json.loads(content)["error"]
    assert headers["x-request-id"]


def test_binary_sizes_must_add_up(http):
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                     "parameters": {"binary_data_size": 256}}]}).encode()  # fmt: skip
    for extra, fragment in ((b"\0" * 100, "runs past"), (b"\0" * 300, "follow")):
        status, _, content = post(http, "/v2/models/digits-mlp/infer", header + extra,
                                  {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        assert status == 400 and fragment in json.loads(content)["error"]


def test_a_body_over_the_limit_is_413_before_it_is_read(http):
    declared = {"content-length": str(64 * 1024 * 1024), "content-type": "application/json"}
    status, _, content = post(http, "/v2/models/digits-mlp/infer", b"", declared)
    assert status == 413 and "at most" in json.loads(content)["error"]


def test_the_cache_header_and_cache_control(http):
    body = json.dumps({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["cache me"]}]})
    outcomes = [post(http, "/v2/models/sentiment/infer", body.encode())[1]["maas-cache"] for _ in range(2)]
    assert outcomes[1] == "hit"
    _, headers, _ = post(http, "/v2/models/sentiment/infer", body.encode(),
                         {"content-type": "application/json", "cache-control": "no-store"})  # fmt: skip
    assert headers["maas-cache"] == "bypass"


def test_a_deadline_header_that_is_no_number_is_refused(http):
    body = b'{"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}'
    status, _, content = post(http, "/v2/models/sentiment/infer", body,
                              {"content-type": "application/json", "x-request-timeout": "soon"})  # fmt: skip
    assert status == 400 and "x-request-timeout" in content.decode()


# The curl examples of the first tutorial (docs/tutorials/first-model.md), run as shown against the test cluster's
# port.
CURL_EXAMPLES = [
    ("curl -s http://127.0.0.1:8080/v2/health/ready", '"ready":true'),
    ("curl -s http://127.0.0.1:8080/v2/models/digits-mlp", '"platform":"onnxruntime_onnx"'),
    (
        "curl -s http://127.0.0.1:8080/v2/models/sentiment/infer -H 'Content-Type: application/json' "
        """-d '{"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [2], "data": ["I love it", "awful"]}]}'""",
        '"data":["positive","negative"]',
    ),
    (
        "curl -s http://127.0.0.1:8080/v2/models/karate-gcn/infer -H 'Content-Type: application/json' "
        """-d '{"parameters": {"stored_graph": "karate"}, """
        """"inputs": [{"name": "node_ids", "datatype": "INT64", "shape": [3], "data": [0, 16, 33]}]}'""",
        '"name":"label","datatype":"INT64","shape":[3],"data":[',
    ),
    (
        "curl -s http://127.0.0.1:8080/v1/embeddings -H 'Content-Type: application/json' "
        """-d '{"model": "minilm-l6-v2", "input": ["A man is playing a guitar."], "dimensions": 8}'""",
        '"object":"embedding","index":0',
    ),
    ("curl -s http://127.0.0.1:8080/v1/models", '"id":"minilm-l6-v2","object":"model"'),
    ("curl -s http://127.0.0.1:8080/v2/models/nope", '{"error":"model \'nope\' not found"}'),
]


def test_the_first_tutorial_shows_these_curl_examples_verbatim():
    page = (Path(__file__).resolve().parents[2] / "docs" / "tutorials" / "first-model.md").read_text()
    missing = [command for command, _ in CURL_EXAMPLES if command not in page]
    assert not missing, f"docs/tutorials/first-model.md lacks: {missing}"


@pytest.mark.parametrize("command, expected", CURL_EXAMPLES, ids=[c[0].split()[2][21:40] for c in CURL_EXAMPLES])
def test_the_first_tutorials_curl_examples_work_as_shown(http, command, expected):
    if shutil.which("curl") is None:
        pytest.skip("curl not found: install it (Debian package curl) to run the tutorial's examples")
    argv = [arg.replace("127.0.0.1:8080", http) for arg in shlex.split(command)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert expected in out, out


def test_grpc_and_http_share_the_gateway(cluster, http):
    """The same model answers on both fronts, from the same process pool."""
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
    status, _, content = post(http, "/v2/models/digits-mlp/infer",
                              json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                                      "data": [0.0] * 64}]}).encode())  # fmt: skip
    assert status == 200 and json.loads(content)["model_name"] == "digits-mlp"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_graph_classification_over_rest(client, binary):
    """motif-gin over REST: a disjoint union of held-out motif graphs with graph_ids, one label per graph."""
    from services.gnn.datasets import motif_graphs
    from tests.graph_union import graph_union

    graphs = motif_graphs(16, seed=321)
    features, edges, ids = graph_union(graphs)
    inputs = []
    for name, value, datatype in (("node_features", features, "FP32"), ("edge_index", edges, "INT64"),
                                  ("graph_ids", ids, "INT64")):  # fmt: skip
        inputs.append(triton.InferInput(name, list(value.shape), datatype))
        inputs[-1].set_data_from_numpy(value, binary_data=binary)
    result = client.infer("motif-gin", inputs)
    assert result.as_numpy("probabilities").shape == (16, 2)
    assert (result.as_numpy("label") == np.array([y for _, _, y in graphs])).mean() >= 0.9
    inputs[2].set_data_from_numpy(ids[::-1].copy(), binary_data=binary)  # the last graph's nodes first
    with pytest.raises(InferenceServerException) as err:
        client.infer("motif-gin", inputs)
    assert err.value.status() == "400" and "graph_ids" in err.value.message()
