"""gRPC face of the GNN service: translates messages, holds no logic."""

from __future__ import annotations

import grpc

from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from services.gnn.runtime import GnnRuntime, GraphInput
from shared.batching import deadline_from
from shared.tensors import encode_outputs, to_numpy


def to_graph_input(graph: gnn_pb2.Graph) -> GraphInput:
    return GraphInput(
        node_features=to_numpy(graph.node_features, "graph.node_features"),
        edge_index=to_numpy(graph.edge_index, "graph.edge_index"),
        edge_weight=to_numpy(graph.edge_weight, "graph.edge_weight") if graph.HasField("edge_weight") else None,
    )


class GnnServicer(gnn_pb2_grpc.GnnServiceServicer):
    def __init__(self, runtime: GnnRuntime) -> None:
        self.runtime = runtime

    async def Predict(self, request: gnn_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        graph = to_graph_input(request.graph) if request.HasField("graph") else None
        prediction, rows = await self.runtime.predict(
            request.model_name,
            request.model_version,
            graph,
            request.stored_graph,
            list(request.node_ids),
            deadline_from(context.time_remaining()),
        )
        return gnn_pb2.PredictResponse(
            model_name=prediction.manifest.name,
            model_version=prediction.manifest.version,
            node_ids=rows,
            outputs=encode_outputs(prediction.outputs),
        )
