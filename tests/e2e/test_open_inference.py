"""The Open Inference Protocol on the gateway, called with Triton's own client, tritonclient.grpc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from torch_geometric.datasets import KarateClub
from tritonclient.utils import InferenceServerException

from services.dense.datasets import digits_split


@pytest.fixture(scope="module")
def client(cluster):
    with triton.InferenceServerClient(cluster.specs["gateway"].target) as client:
        yield client


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "maas" and "model_repository" in metadata.extensions


@pytest.mark.parametrize("model", ["digits-mlp", "karate-gcn", "minilm-l6-v2"])
def test_model_ready_and_metadata_for_each_family(client, model):
    assert client.is_model_ready(model)
    metadata = client.get_model_metadata(model)
    assert metadata.name == model and metadata.versions and metadata.inputs and metadata.outputs


def test_dense_inference_with_raw_tensors(client):
    _, x_test, _, y_test = digits_split()
    pixels = triton.InferInput("pixels", list(x_test.shape), "FP32")
    pixels.set_data_from_numpy(x_test)
    result = client.infer("digits-mlp", [pixels], outputs=[triton.InferRequestedOutput("label")])
    labels = result.as_numpy("label")
    assert labels.shape == (len(x_test),) and (labels == y_test).mean() >= 0.9
    assert result.as_numpy("probabilities") is None  # only the requested output comes back
    assert result.get_response().model_version == "1"


def test_dense_inference_with_typed_contents(client):
    # Without binary data, tritonclient sends typed contents (fp32_contents) instead of raw bytes.
    _, x_test, _, y_test = digits_split()
    pixels = triton.InferInput("pixels", [4, 64], "FP32")
    pixels.set_data_from_numpy(x_test[:4])
    pixels._input.contents.fp32_contents.extend(x_test[:4].ravel().tolist())
    pixels._raw_content = None
    result = client.infer("digits-mlp", [pixels])
    assert (result.as_numpy("label") == y_test[:4]).all()


def test_gnn_inference_with_a_graph_as_named_inputs(client):
    data = KarateClub()[0]
    features = triton.InferInput("node_features", list(data.x.shape), "FP32")
    features.set_data_from_numpy(data.x.numpy())
    edges = triton.InferInput("edge_index", list(data.edge_index.shape), "INT64")
    edges.set_data_from_numpy(data.edge_index.numpy())
    result = client.infer("karate-gcn", [features, edges])
    labels = result.as_numpy("label")
    assert labels.shape == (34,) and (labels == data.y.numpy()).mean() > 0.75


def test_nlp_inference_with_bytes_texts(client):
    texts = np.array([b"I love this!", b"This is awful."], dtype=object)
    tensor = triton.InferInput("texts", [2], "BYTES")
    tensor.set_data_from_numpy(texts)
    result = client.infer("sentiment", [tensor])
    assert [label.decode() for label in result.as_numpy("class_name")] == ["positive", "negative"]
    assert result.as_numpy("probabilities").shape == (2, 2)
    embedding = client.infer("minilm-l6-v2", [tensor]).as_numpy("embedding")
    assert embedding.shape == (2, 384)


def test_model_config_statistics_and_repository_index(client):
    config = client.get_model_config("digits-mlp").config
    assert config.max_batch_size > 0
    assert list(config.input[0].dims) == [64] and config.platform == "onnxruntime_onnx"
    assert list(client.get_model_config("karate-gcn").config.input[0].dims) == [-1, 34]
    stats = client.get_inference_statistics("digits-mlp").model_stats[0]
    assert stats.name == "digits-mlp" and stats.inference_stats.success.count >= 1
    index = client.get_model_repository_index().models
    assert {"digits-mlp", "karate-gcn", "minilm-l6-v2", "sentiment"} <= {m.name for m in index}
    assert all(m.state == "READY" for m in index if m.name == "digits-mlp")


def test_repository_unload_and_load(client):
    client.unload_model("sine-gru")
    assert not any(m.name == "sine-gru" for m in client.get_model_repository_index().models)
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("sine-gru")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    client.load_model("sine-gru")
    assert client.is_model_ready("sine-gru")


@pytest.mark.parametrize(
    ("call", "status", "fragment"),
    [
        (lambda c: c.get_model_metadata("no-such-model"), "StatusCode.NOT_FOUND", "no-such-model"),
        (lambda c: c.infer("digits-mlp", [_input("pixels", np.zeros((1, 10), np.float32))]),
         "StatusCode.INVALID_ARGUMENT", "inputs['pixels']"),
        (lambda c: c.infer("digits-mlp", [_input("pixels", np.zeros((1, 64), np.float64), "FP64")]),
         "StatusCode.INVALID_ARGUMENT", "must be FP32, got FP64"),
        (lambda c: c.infer("digits-mlp", [_input("pixels", np.zeros((1, 64), np.float32))], model_version="x"),
         "StatusCode.INVALID_ARGUMENT", "model_version"),
        # Characters that isdigit() takes for digits, and a number past int64: both refused, never INTERNAL.
        (lambda c: c.infer("digits-mlp", [_input("pixels", np.zeros((1, 64), np.float32))], model_version="²"),
         "StatusCode.INVALID_ARGUMENT", "model_version: must be a whole number"),
        (lambda c: c.infer("digits-mlp", [_input("pixels", np.zeros((1, 64), np.float32))],
                           model_version="99999999999999999999"),
         "StatusCode.INVALID_ARGUMENT", "model_version: must be a whole number"),
    ],
)  # fmt: skip
def test_errors_carry_the_status_and_the_field(client, call, status, fragment):
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == status
    assert fragment in err.value.message()


def _input(name, array, datatype="FP32"):
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """Triton's perf_analyzer from the tritonclient wheel and the environment it starts in, or a skip."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    cuda_runtime = Path(sys.executable).parents[1] / "lib/python3.11/site-packages/nvidia/cuda_runtime/lib"
    env = {**os.environ, "LD_LIBRARY_PATH": str(cuda_runtime)}
    missing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
    if not binary.exists() or "not found" in missing:
        pytest.skip(f"perf_analyzer cannot start here (needs Debian's libb64-0d; .ci/run installs it): {missing[:200]}")
    return binary, env


def test_perf_analyzer_runs_unchanged_against_the_gateway(cluster):
    """Triton's perf_analyzer (shipped in the tritonclient wheel) measures a maas model as it would Triton."""
    binary, env = perf_analyzer()
    result = subprocess.run(
        [str(binary), "-m", "digits-mlp", "-u", cluster.specs["gateway"].target, "-i", "grpc",
         "--concurrency-range", "2", "--measurement-interval", "1000", "--stability-percentage", "999"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Concurrency: 2, throughput:" in result.stdout


def test_a_shape_no_tensor_has_is_invalid_not_internal(gateway_channel):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(
        model_name="digits-mlp",
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[0, 2**62])],
        raw_input_contents=[b""],
    )
    with pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(gateway_channel).ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has dimension 4611686018427387904" in err.value.details()


def test_stored_graph_queries_and_link_scores_through_open_inference(client, gateway_channel):
    from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
    from services.gnn.defaults import lesmis_split
    from shared.tensors import from_numpy, to_numpy

    metadata = {i.name: i for i in client.get_model_metadata("sbm-sage").inputs}
    assert {"stored_graph", "graph_version", "node_ids", "fan_outs"} <= set(metadata)
    assert metadata["stored_graph"].datatype == "BYTES" and metadata["node_ids"].datatype == "INT64"

    def tensor(name, value, datatype):
        result = triton.InferInput(name, list(value.shape), datatype)
        result.set_data_from_numpy(value)
        return result

    graph = tensor("stored_graph", np.array([b"sbm-100k"], dtype=object), "BYTES")
    query = [graph, tensor("graph_version", np.array([1], np.int64), "INT64"),
             tensor("node_ids", np.array([0, 7, 9], np.int64), "INT64"),
             tensor("fan_outs", np.array([-1, -1], np.int32), "INT32")]  # fmt: skip
    labels = client.infer("sbm-sage", query).as_numpy("label")
    native = gnn_pb2_grpc.GnnServiceStub(gateway_channel).Predict(
        gnn_pb2.PredictRequest(model_name="sbm-sage", stored_graph="sbm-100k", graph_version=1, node_ids=[0, 7, 9],
                               fan_outs=[-1, -1]), timeout=30)  # fmt: skip
    assert labels.tolist() == to_numpy(native.outputs["label"], "label").tolist()

    assert "pairs" in {i.name for i in client.get_model_metadata("lesmis-links").inputs}
    pairs = lesmis_split(0)[1].edge_label_index.numpy().astype(np.int64)
    graph = tensor("stored_graph", np.array([b"les-miserables"], dtype=object), "BYTES")
    scores = client.infer("lesmis-links", [graph, tensor("pairs", pairs, "INT64")]).as_numpy("scores")
    native = gnn_pb2_grpc.GnnServiceStub(gateway_channel).PredictLinks(
        gnn_pb2.PredictLinksRequest(model_name="lesmis-links", stored_graph="les-miserables", pairs=from_numpy(pairs)),
        timeout=30,
    )
    np.testing.assert_allclose(scores, to_numpy(native.outputs["scores"], "scores"), rtol=1e-6)


def test_graph_classification_through_open_inference(client, gateway_channel):
    """motif-gin through ModelInfer: a disjoint union of held-out motif graphs with graph_ids gives, per graph,
    what ClassifyGraphs gives, and the held-out accuracy; bad graph_ids get INVALID_ARGUMENT naming the input."""
    from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
    from services.gnn.datasets import motif_graphs
    from shared.tensors import from_numpy, to_numpy
    from tests.graph_union import graph_union

    metadata = {i.name: i for i in client.get_model_metadata("motif-gin").inputs}
    assert {"node_features", "edge_index", "graph_ids"} <= set(metadata)
    assert metadata["graph_ids"].datatype == "INT64" and list(metadata["graph_ids"].shape) == [-1]

    graphs = motif_graphs(24, seed=123)
    features, edges, ids = graph_union(graphs)
    inputs = [_input("node_features", features), _input("edge_index", edges, "INT64"),
              _input("graph_ids", ids, "INT64")]  # fmt: skip
    result = client.infer("motif-gin", inputs)
    labels, probabilities = result.as_numpy("label"), result.as_numpy("probabilities")
    assert labels.shape == (24,) and probabilities.shape == (24, 2)
    assert (labels == np.array([y for _, _, y in graphs])).mean() >= 0.9
    native = gnn_pb2_grpc.GnnServiceStub(gateway_channel).ClassifyGraphs(
        gnn_pb2.ClassifyGraphsRequest(model_name="motif-gin", graphs=[
            gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(e)) for x, e, _ in graphs]),
        timeout=30,
    )  # fmt: skip
    np.testing.assert_allclose(probabilities, to_numpy(native.outputs["probabilities"], "p"), rtol=0, atol=1e-6)

    for bad, fragment in (
        ({"graph_ids": ids[::-1].copy()}, "inputs ('graph_ids'): expected each node's graph, 0..G-1 in ascending"),
        ({"graph_ids": ids[:-1]}, f"inputs ('graph_ids'): expected INT64 of shape [{len(ids)}] (one per node)"),
        ({"edge_index": np.concatenate([edges, [[0], [len(ids) - 1]]], axis=1)}, "an edge must stay within one graph"),
    ):  # fmt: skip
        arrays = {"node_features": features, "edge_index": edges, "graph_ids": ids, **bad}
        sent = [_input(name, value, "FP32" if name == "node_features" else "INT64") for name, value in arrays.items()]
        with pytest.raises(InferenceServerException) as err:
            client.infer("motif-gin", sent)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and fragment in err.value.message()
    assert client.infer("motif-gin", inputs).as_numpy("label").tolist() == labels.tolist()  # still serving
