"""gRPC face of the GNN service: translates messages, holds no logic."""

from __future__ import annotations

import grpc
import numpy as np

from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from services.gnn.explain import ExplainParams, ExplainQuery, GnnExplanations, GraphExplanation
from services.gnn.runtime import GnnRuntime, GraphInput
from shared.batching import deadline_from
from shared.model_store import Manifest
from shared.observability import call_metadata
from shared.stored_graphs import TENANT_METADATA
from shared.tensors import encode_outputs, from_numpy, to_numpy


def to_graph_input(graph: gnn_pb2.Graph, where: str = "graph") -> GraphInput:
    return GraphInput(
        node_features=to_numpy(graph.node_features, f"{where}.node_features"),
        edge_index=to_numpy(graph.edge_index, f"{where}.edge_index"),
        edge_weight=to_numpy(graph.edge_weight, f"{where}.edge_weight") if graph.HasField("edge_weight") else None,
    )


class GnnServicer(gnn_pb2_grpc.GnnServiceServicer):
    def __init__(self, runtime: GnnRuntime, explanations: GnnExplanations) -> None:
        self.runtime = runtime
        self.explanations = explanations

    async def Predict(self, request: gnn_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        graph = to_graph_input(request.graph) if request.HasField("graph") else None
        answer = await self.runtime.predict(
            request.model_name,
            request.model_version,
            graph,
            request.stored_graph,
            list(request.node_ids),
            deadline_from(context.time_remaining()),
            graph_version=request.graph_version,
            fan_outs=list(request.fan_outs),
        )
        return gnn_pb2.PredictResponse(
            model_name=answer.prediction.manifest.name,
            model_version=answer.prediction.manifest.version,
            node_ids=answer.node_ids,
            outputs=encode_outputs(answer.prediction.outputs),
            graph_version=answer.graph_version,
            nodes_used=answer.nodes_used,
            edges_used=answer.edges_used,
        )

    async def PredictLinks(self, request: gnn_pb2.PredictLinksRequest, context: grpc.aio.ServicerContext):
        graph = to_graph_input(request.graph) if request.HasField("graph") else None
        pairs = to_numpy(request.pairs, "pairs") if request.HasField("pairs") else None
        answer = await self.runtime.predict_links(
            request.model_name,
            request.model_version,
            graph,
            request.stored_graph,
            request.graph_version,
            pairs,
            list(request.node_ids),
            request.top_k,
            list(request.fan_outs),
            deadline_from(context.time_remaining()),
        )
        return gnn_pb2.PredictLinksResponse(
            model_name=answer.prediction.manifest.name,
            model_version=answer.prediction.manifest.version,
            graph_version=answer.graph_version,
            outputs=encode_outputs(answer.prediction.outputs),
            nodes_used=answer.nodes_used,
            edges_used=answer.edges_used,
        )

    async def ClassifyGraphs(self, request: gnn_pb2.ClassifyGraphsRequest, context: grpc.aio.ServicerContext):
        graphs = [to_graph_input(graph, f"graphs[{i}]") for i, graph in enumerate(request.graphs)]
        prediction = await self.runtime.classify_graphs(
            request.model_name, request.model_version, graphs, deadline_from(context.time_remaining())
        )
        return gnn_pb2.ClassifyGraphsResponse(
            model_name=prediction.manifest.name,
            model_version=prediction.manifest.version,
            outputs=encode_outputs(prediction.outputs),
        )

    async def UpdateGraph(self, request: gnn_pb2.UpdateGraphRequest, context: grpc.aio.ServicerContext):
        features = (
            to_numpy(request.node_features, "node_features")
            if request.HasField("node_features")
            else np.zeros((0, 0), np.float32)
        )
        edges = (
            to_numpy(request.edge_index, "edge_index") if request.HasField("edge_index") else np.zeros((2, 0), np.int64)
        )
        # A new graph belongs to the tenant the gateway names (none when called directly: public).
        owner = dict(call_metadata(context)).get(TENANT_METADATA, "")
        graph = await self.runtime.update_graph(request.graph_name, request.base_version, features, edges,
                                                request.new_graph_name, owner)  # fmt: skip
        return gnn_pb2.UpdateGraphResponse(
            graph_name=graph.name,
            graph_version=graph.version,
            num_nodes=graph.num_nodes,
            num_edges=graph.num_edges,
            first_new_node_id=graph.num_nodes - len(features),
        )

    async def DeleteGraphVersion(self, request: gnn_pb2.DeleteGraphVersionRequest, context: grpc.aio.ServicerContext):
        left = await self.runtime.delete_graph_version(request.graph_name, request.graph_version)
        return gnn_pb2.DeleteGraphVersionResponse(graph_name=request.graph_name, graph_versions=left)

    async def ListGraphs(self, request: gnn_pb2.ListGraphsRequest, context: grpc.aio.ServicerContext):
        graphs = await self.runtime.list_graphs()
        return gnn_pb2.ListGraphsResponse(
            graphs=[gnn_pb2.StoredGraphInfo(name=name, latest_version=versions[-1] if versions else 0, owner=owner,
                                            model_name=model, versions=versions)
                    for name, versions, owner, model in graphs]  # fmt: skip
        )

    async def Recommend(self, request: gnn_pb2.RecommendRequest, context: grpc.aio.ServicerContext):
        answer = await self.runtime.recommend(
            request.model_name, request.model_version, request.stored_graph, request.graph_version,
            list(request.user_ids), request.top_k, request.include_seen, deadline_from(context.time_remaining()),
        )  # fmt: skip
        return gnn_pb2.RecommendResponse(
            model_name=answer.prediction.manifest.name,
            model_version=answer.prediction.manifest.version,
            graph_version=answer.graph_version,
            user_ids=answer.node_ids,
            outputs=encode_outputs(answer.prediction.outputs),
            nodes_used=answer.nodes_used,
            edges_used=answer.edges_used,
        )

    async def SimilarItems(self, request: gnn_pb2.SimilarItemsRequest, context: grpc.aio.ServicerContext):
        answer = await self.runtime.similar_items(
            request.model_name, request.model_version, request.stored_graph, request.graph_version,
            list(request.item_ids), request.top_k, request.by, deadline_from(context.time_remaining()),
        )  # fmt: skip
        return gnn_pb2.SimilarItemsResponse(
            model_name=answer.prediction.manifest.name,
            model_version=answer.prediction.manifest.version,
            graph_version=answer.graph_version,
            item_ids=answer.node_ids,
            outputs=encode_outputs(answer.prediction.outputs),
            by=answer.by,
        )

    async def Explain(self, request: gnn_pb2.ExplainRequest, context: grpc.aio.ServicerContext):
        manifest, query, explanation = await self.explanations.explain(
            request.model_name, request.model_version, to_explain_params(request),
            deadline_from(context.time_remaining()), request.validate_only,
        )  # fmt: skip
        return to_explain_response(manifest, query, explanation)


def to_explain_params(request: gnn_pb2.ExplainRequest) -> ExplainParams:
    return ExplainParams(
        graph=to_graph_input(request.graph) if request.HasField("graph") else None,
        stored_graph=request.stored_graph,
        node_ids=list(request.node_ids),
        pairs=to_numpy(request.pairs, "pairs") if request.HasField("pairs") else None,
        method=request.method,
        epochs=request.epochs,
        target=request.target if request.HasField("target") else None,
        seed=request.seed,
        graph_version=request.graph_version,
        fan_outs=list(request.fan_outs),
    )


def to_explain_response(
    manifest: Manifest, query: ExplainQuery, explanation: GraphExplanation | None
) -> gnn_pb2.ExplainResponse:
    if explanation is None:  # validate_only: the versions a job must pin
        return gnn_pb2.ExplainResponse(model_name=manifest.name, model_version=manifest.version,
                                       graph_version=query.graph_version)  # fmt: skip
    return gnn_pb2.ExplainResponse(
        model_name=manifest.name,
        model_version=manifest.version,
        method=explanation.method,
        node_ids=explanation.node_ids,
        edge_mask=from_numpy(explanation.edge_mask),
        node_feature_mask=from_numpy(explanation.node_feature_mask),
        subgraph_edge_ids=explanation.subgraph_edge_ids.tolist(),
        subgraph_node_ids=explanation.subgraph_node_ids.tolist(),
        subgraph_edge_index=from_numpy(explanation.subgraph_edge_index),
        outputs=encode_outputs(explanation.outputs),
        graph_version=explanation.graph_version,
    )
