"""A stopped backend gives UNAVAILABLE at once, never a hang, and serving resumes when it is back."""

import time

import grpc
import numpy as np
import pytest

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from shared.tensors import from_numpy

NO_CACHE = (("cache-control", "no-store"),)


def karate(channel, timeout=10):
    return gnn_pb2_grpc.GnnServiceStub(channel).Predict(
        gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0]),
        timeout=timeout,
        metadata=NO_CACHE,
    )


def test_a_stopped_backend_gives_unavailable_and_recovers(cluster, gateway_channel):
    karate(gateway_channel)
    cluster.stop_process("gnn")
    try:
        with pytest.raises(grpc.RpcError) as err:
            # A long deadline: if the gateway hung, this would end in DEADLINE_EXCEEDED instead.
            karate(gateway_channel, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "gnn service" in err.value.details()
        # The other families are unaffected.
        reply = dense_pb2_grpc.DenseServiceStub(gateway_channel).Predict(
            dense_pb2.PredictRequest(
                model_name="digits-mlp", inputs={"pixels": from_numpy(np.zeros((1, 64), np.float32))}
            ),
            timeout=10,
        )
        assert reply.model_name == "digits-mlp"
    finally:
        cluster.start_process("gnn")
        cluster.wait_serving("gnn")
    deadline = time.monotonic() + 30
    while True:
        try:
            assert karate(gateway_channel).node_ids == [0]
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, "the gateway did not reconnect to the restarted gnn service"
            time.sleep(0.2)


def test_the_callers_deadline_is_passed_on(gateway_channel):
    with pytest.raises(grpc.RpcError) as err:
        karate(gateway_channel, timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert karate(gateway_channel).node_ids == [0]
