"""Each family answers correctly through the gateway, with real trained models."""

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from torch_geometric.datasets import KarateClub

from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.dense.datasets import digits_split, sine_windows
from shared.cluster import health_status
from shared.onnx_session import cuda_usable
from shared.tensors import from_numpy, to_numpy
from tests.tolerance import served

NO_CACHE = (("cache-control", "no-store"),)


def test_all_four_servers_report_serving_and_the_trainers_run(cluster):
    servers = [spec for spec in cluster.specs.values() if spec.port]
    assert {spec.name for spec in servers} == {"gateway", "dense", "gnn", "nlp"}
    for spec in servers:
        assert health_status(spec.target) == health_pb2.HealthCheckResponse.SERVING, spec.name
    for name in ("dense-trainer", "gnn-trainer", "nlp-trainer"):
        assert cluster.processes[name].poll() is None, name


def test_digits_accuracy_on_the_held_out_split(gateway_channel):
    _, x_test, _, y_test = digits_split()
    reply = dense_pb2_grpc.DenseServiceStub(gateway_channel).Predict(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(x_test)}),
        timeout=30,
        metadata=NO_CACHE,
    )
    labels = to_numpy(reply.outputs["label"], "label")
    probabilities = to_numpy(reply.outputs["probabilities"], "probabilities")
    assert probabilities.shape == (len(x_test), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (labels == y_test).mean() >= 0.9
    assert reply.model_name == "digits-mlp" and reply.model_version >= 1


def test_output_selection(gateway_channel):
    reply = dense_pb2_grpc.DenseServiceStub(gateway_channel).Predict(
        dense_pb2.PredictRequest(
            model_name="digits-mlp",
            inputs={"pixels": from_numpy(np.zeros((1, 64), np.float32))},
            output_names=["label"],
        ),
        timeout=10,
    )
    assert list(reply.outputs) == ["label"]


def test_gcn_labels_most_karate_nodes(gateway_channel):
    truth = KarateClub()[0].y.numpy()
    reply = gnn_pb2_grpc.GnnServiceStub(gateway_channel).Predict(
        gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate"), timeout=30
    )
    labels = to_numpy(reply.outputs["label"], "label")
    assert list(reply.node_ids) == list(range(34))
    assert (labels == truth).mean() > 0.75


def test_an_inline_graph_gets_the_same_answer_as_the_stored_one(gateway_channel):
    data = KarateClub()[0]
    stub = gnn_pb2_grpc.GnnServiceStub(gateway_channel)
    inline = stub.Predict(
        gnn_pb2.PredictRequest(
            model_name="karate-gcn",
            graph=gnn_pb2.Graph(
                node_features=from_numpy(data.x.numpy()), edge_index=from_numpy(data.edge_index.numpy())
            ),
            node_ids=[0, 33],
        ),
        timeout=30,
    )
    stored = stub.Predict(
        gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0, 33]), timeout=30
    )
    assert list(inline.node_ids) == [0, 33]
    np.testing.assert_allclose(
        to_numpy(inline.outputs["probabilities"], "p"), to_numpy(stored.outputs["probabilities"], "p"), **served()
    )


def test_paraphrases_are_closer_than_unrelated_sentences(gateway_channel):
    texts = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The central bank raised interest rates.",
        "How do I reset my password?",
        "I forgot my password and need to change it.",
    ]
    reply = nlp_pb2_grpc.NlpServiceStub(gateway_channel).Predict(
        nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=texts), timeout=30
    )
    emb = to_numpy(reply.outputs["embedding"], "embedding")
    assert emb.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[3, 4] > sim[3, 2] + 0.3
    assert sim[3, 4] > sim[3, 0]


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("I love this, it is wonderful!", "positive"),
        ("Absolutely fantastic service, thank you.", "positive"),
        ("This is terrible, I hate it.", "negative"),
        ("The worst experience of my life.", "negative"),
    ],
)
def test_sentiment_gets_the_obvious_cases_right(gateway_channel, text, label):
    reply = nlp_pb2_grpc.NlpServiceStub(gateway_channel).Predict(
        nlp_pb2.PredictRequest(model_name="sentiment", texts=[text]), timeout=30
    )
    assert list(reply.labels) == [label]
    assert to_numpy(reply.outputs["probabilities"], "p").shape == (1, 2)


def test_list_and_get_model_describe_signature_metrics_and_device(gateway_channel):
    stub = models_pb2_grpc.ModelServiceStub(gateway_channel)
    names = [m.name for m in stub.ListModels(models_pb2.ListModelsRequest(family="dense"), timeout=10).models]
    assert "digits-mlp" in names and "sentiment" not in names
    model = stub.GetModel(models_pb2.GetModelRequest(model_name="digits-mlp"), timeout=10).model
    version = model.versions[-1]
    assert version.family == "dense"
    assert version.inputs[0].name == "pixels" and list(version.inputs[0].shape) == [-1, 64]
    assert version.metrics["accuracy"] >= 0.9
    assert len(version.sha256["model.onnx"]) == 64
    assert version.device == ("CUDAExecutionProvider" if cuda_usable() else "CPUExecutionProvider")
    every = {m.name for m in stub.ListModels(models_pb2.ListModelsRequest(), timeout=10).models}
    assert {"digits-mlp", "karate-gcn", "minilm-l6-v2", "sentiment"} <= every
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(models_pb2.GetModelRequest(model_name="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "model 'nope' not found"


def test_digits_cnn_and_sine_gru_are_served(gateway_channel):
    _, x_test, _, y_test = digits_split()
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    reply = stub.Predict(
        dense_pb2.PredictRequest(model_name="digits-cnn", inputs={"image": from_numpy(x_test.reshape(-1, 1, 8, 8))}),
        timeout=30,
        metadata=NO_CACHE,
    )
    assert (to_numpy(reply.outputs["label"], "label") == y_test).mean() >= 0.9

    _, windows, _, targets = sine_windows()
    reply = stub.Predict(
        dense_pb2.PredictRequest(model_name="sine-gru", inputs={"window": from_numpy(windows)}),
        timeout=30,
        metadata=NO_CACHE,
    )
    forecast = to_numpy(reply.outputs["forecast"], "forecast")
    model_mse = float(np.mean((forecast - targets) ** 2))
    last_value_mse = float(np.mean((windows[:, -1, :] - targets) ** 2))
    assert model_mse < last_value_mse / 5


def test_concurrent_calls_each_get_their_own_answer(gateway_channel):
    """Calls that the services batch together come back exactly as when sent one by one."""
    _, x_test, _, _ = digits_split()
    dense = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    nlp = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    gnn = gnn_pb2_grpc.GnnServiceStub(gateway_channel)
    dense_requests = [
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(x_test[i : i + 1 + i % 3])})
        for i in range(24)
    ]
    nlp_requests = [
        nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=[f"sentence {i} " * (1 + i % 5)]) for i in range(24)
    ]
    gnn_requests = [
        gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[i]) for i in range(24)
    ]
    for stub, requests, output in ((dense, dense_requests, "probabilities"), (nlp, nlp_requests, "embedding"),
                                   (gnn, gnn_requests, "probabilities")):  # fmt: skip
        sequential = [stub.Predict(r, timeout=30, metadata=NO_CACHE) for r in requests]
        futures = [stub.Predict.future(r, timeout=30, metadata=NO_CACHE) for r in requests]
        for alone, future in zip(sequential, futures, strict=True):
            np.testing.assert_allclose(
                to_numpy(future.result().outputs[output], "o"),
                to_numpy(alone.outputs[output], "o"),
                **served(),
            )


@pytest.mark.parametrize("model", ["digits-cnn", "karate-gcn", "sentiment"])
def test_model_management_reaches_each_family_through_the_gateway(gateway_channel, model):
    stub = models_pb2_grpc.ModelServiceStub(gateway_channel)
    reply = stub.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=model), timeout=10)
    assert reply.default_version >= 1
    assert reply.versions[0].state == model_pb2.MODEL_STATE_READY
    with pytest.raises(grpc.RpcError) as err:
        stub.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name=model, model_version=99), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no version 99" in err.value.details()
