"""Bad input gets INVALID_ARGUMENT or NOT_FOUND naming the field, and the cluster keeps serving."""

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from maas.common.v1 import tensor_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from shared.tensors import from_numpy

PIXELS = np.zeros((2, 64), np.float32)


def dense(**kwargs):
    return "dense", dense_pb2.PredictRequest(**kwargs)


def gnn(**kwargs):
    return "gnn", gnn_pb2.PredictRequest(**kwargs)


def nlp(**kwargs):
    return "nlp", nlp_pb2.PredictRequest(**kwargs)


CASES = {
    "wrong dtype": (
        dense(model_name="digits-mlp", inputs={"pixels": from_numpy(PIXELS.astype(np.float64))}),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["inputs['pixels']", "must be FP32, got FP64"],
    ),
    "shape does not match bytes": (
        dense(
            model_name="digits-mlp",
            inputs={"pixels": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FP32, shape=[2, 64], data=b"\0" * 100)},
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["inputs['pixels']", "needs 512 bytes, got 100"],
    ),
    "wrong feature width": (
        dense(model_name="digits-mlp", inputs={"pixels": from_numpy(np.zeros((2, 10), np.float32))}),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["inputs['pixels']", "shape must be [-1, 64]", "got [2, 10]"],
    ),
    "missing input": (
        dense(model_name="digits-mlp", inputs={"image": from_numpy(PIXELS)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["unknown input 'image'", "pixels"],
    ),
    "unknown dense model": (
        dense(model_name="no-such-model", inputs={"pixels": from_numpy(PIXELS)}),
        grpc.StatusCode.NOT_FOUND,
        ["model 'no-such-model' not found"],  # and nothing more: no list of the models that exist
    ),
    "a dimension no tensor has": (
        dense(
            model_name="digits-mlp",
            inputs={"pixels": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FP32, shape=[0, 2**62], data=b"")},
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["inputs['pixels']", "has dimension 4611686018427387904; each must be 0..2147483647"],
    ),
    "a model name that is a path": (
        nlp(model_name="../../etc/passwd", texts=["hi"]),
        grpc.StatusCode.NOT_FOUND,
        ["model '../../etc/passwd' not found"],
    ),
    "unknown version": (
        dense(model_name="digits-mlp", model_version=999, inputs={"pixels": from_numpy(PIXELS)}),
        grpc.StatusCode.NOT_FOUND,
        ["no version 999"],
    ),
    "node id out of range": (
        gnn(model_name="karate-gcn", stored_graph="karate", node_ids=[0, 40]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["node_ids[1]", "node 40 is out of range", "34 nodes"],
    ),
    "edge index out of range": (
        gnn(
            model_name="karate-gcn",
            graph=gnn_pb2.Graph(
                node_features=from_numpy(np.eye(3, 34, dtype=np.float32)),
                edge_index=from_numpy(np.array([[0, 1], [1, 7]], np.int64)),
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["graph.edge_index", "node index 7 is out of range", "3 nodes"],
    ),
    "edge index of the wrong dtype": (
        gnn(
            model_name="karate-gcn",
            graph=gnn_pb2.Graph(
                node_features=from_numpy(np.eye(3, 34, dtype=np.float32)),
                edge_index=from_numpy(np.array([[0], [1]], np.int32)),
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["graph.edge_index", "INT64"],
    ),
    "no graph at all": (
        gnn(model_name="karate-gcn"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["graph_source"],
    ),
    "unknown stored graph": (
        gnn(model_name="karate-gcn", stored_graph="cora"),
        grpc.StatusCode.NOT_FOUND,
        ["stored_graph", "cora", "karate"],
    ),
    "empty text list": (
        nlp(model_name="sentiment", texts=[]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["texts", "at least one text"],
    ),
    "blank text": (
        nlp(model_name="sentiment", texts=["fine", "  "]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["texts[1]", "empty text"],
    ),
    "unknown nlp model": (
        nlp(model_name="gpt-17", texts=["hi"]),
        grpc.StatusCode.NOT_FOUND,
        ["gpt-17"],
    ),
    "no model name": (
        nlp(texts=["hi"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["model_name"],
    ),
}

STUBS = {
    "dense": dense_pb2_grpc.DenseServiceStub,
    "gnn": gnn_pb2_grpc.GnnServiceStub,
    "nlp": nlp_pb2_grpc.NlpServiceStub,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_status_that_names_the_problem(gateway_channel, case):
    (family, request), code, fragments = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        STUBS[family](gateway_channel).Predict(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details()


def test_the_cluster_keeps_serving_after_bad_input(gateway_channel):
    for (family, request), _, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            STUBS[family](gateway_channel).Predict(request, timeout=10)
    reply = dense_pb2_grpc.DenseServiceStub(gateway_channel).Predict(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(PIXELS)}), timeout=10
    )
    assert reply.outputs["label"].shape == [2]
    reply = nlp_pb2_grpc.NlpServiceStub(gateway_channel).Predict(
        nlp_pb2.PredictRequest(model_name="sentiment", texts=["great"]), timeout=10
    )
    assert list(reply.labels) == ["positive"]


def test_garbage_bytes_are_invalid_argument(gateway_channel):
    call = gateway_channel.unary_unary("/maas.dense.v1.DenseService/Predict")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maas.dense.v1.PredictRequest" in err.value.details()


def test_an_unknown_model_is_named_and_nothing_else(gateway_channel):
    with pytest.raises(grpc.RpcError) as err:
        STUBS["dense"](gateway_channel).Predict(dense_pb2.PredictRequest(model_name="nope"), timeout=10)
    assert err.value.details() == "model 'nope' not found"


def health_ok(channel, deadline_s: float) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=deadline_s)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_huge_requests_are_refused_by_their_size_while_health_keeps_answering(cluster, gateway_channel):
    """Five million empty texts, and forty million node ids: each refused naming the limit, and a health
    check sent meanwhile answers within a two-second deadline, well under the 5.4 s stall this guards
    against (nothing that grows with the request runs on the gateway's event loop)."""
    texts = nlp_pb2.PredictRequest(model_name="sentiment", texts=[""] * 5_000_000).SerializeToString()
    # node_ids (field 5, packed varints) of forty million ones: 40 MB, built as bytes.
    ids = b"\x0a\x09karate-gcn" + b"\x22\x06karate" + b"\x2a" + _varint(40_000_000) + b"\x01" * 40_000_000
    calls = [
        ("/maas.nlp.v1.NlpService/Predict", texts, grpc.StatusCode.INVALID_ARGUMENT, "texts: 5000000 entries"),
        ("/maas.gnn.v1.GnnService/Predict", ids, grpc.StatusCode.RESOURCE_EXHAUSTED, "MAAS_GATEWAY_MAX_REQUEST_BYTES"),
    ]
    with ThreadPoolExecutor(4) as pool:
        for method, raw, code, fragment in calls:
            for _ in range(2):
                call = pool.submit(gateway_channel.unary_unary(method), raw, timeout=60)
                # On the same connection, so the same gateway worker as the huge call.
                checks = [pool.submit(health_ok, gateway_channel, 2.0) for _ in range(3)]
                with pytest.raises(grpc.RpcError) as err:
                    call.result()
                assert err.value.code() == code
                assert fragment in err.value.details()
                assert all(check.result() for check in checks)
    reply = STUBS["nlp"](gateway_channel).Predict(nlp_pb2.PredictRequest(model_name="sentiment", texts=["great"]),
                                                  timeout=10)  # fmt: skip
    assert list(reply.labels) == ["positive"]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_metric_labels_exist_only_for_models_that_exist(cluster, gateway_channel):
    # Through the gateway (which refuses names its catalog lacks) and straight to the dense service.
    with grpc.insecure_channel(cluster.specs["dense"].target) as dense_channel:
        for i in range(20):
            for channel in (gateway_channel, dense_channel):
                with pytest.raises(grpc.RpcError):
                    STUBS["dense"](channel).Predict(dense_pb2.PredictRequest(model_name=f"random-{i}"), timeout=10)
    for port in (cluster.ports.gateway_metrics, cluster.ports.dense_metrics):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        models = {
            s.labels.get("model")
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("maas_request")
        }
        assert not any(name and name.startswith("random-") for name in models), port
        if port == cluster.ports.dense_metrics:  # the service counts them, under one label
            assert "other" in models
