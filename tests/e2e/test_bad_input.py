"""Bad input gets INVALID_ARGUMENT or NOT_FOUND naming the field, and the cluster keeps serving."""

import grpc
import numpy as np
import pytest

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
        ["no-such-model", "digits-mlp"],
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
