"""What every client test compares against: the Python stubs' answer for the same inputs."""

from __future__ import annotations

import pytest

from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from shared.tensors import to_numpy
from tests.clients.scenario import KARATE_NODES


@pytest.fixture(scope="session")
def karate_labels(gateway_channel) -> list[int]:
    """The communities the Python stubs get for the scenario's karate nodes."""
    reply = gnn_pb2_grpc.GnnServiceStub(gateway_channel).Predict(
        gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=KARATE_NODES), timeout=30
    )
    return to_numpy(reply.outputs["label"], "label").tolist()
