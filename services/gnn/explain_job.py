"""Explanation jobs for graph models, run by the gnn trainer from the job queue."""

from __future__ import annotations

import base64

import numpy as np

from maas.gnn.v1 import gnn_pb2
from services.gnn.explain import GnnExplainLimits, check_node_task, explain_nodes
from services.gnn.runtime import GnnModel, QueryLimits, check_graph, check_node_ids
from services.gnn.servicer import to_explain_response, to_graph_input
from shared.errors import InvalidArgumentError, NotFoundError
from shared.explanations import cancellable_job
from shared.training_worker import JobContext, JobResult


def run_explain_job(context: JobContext) -> JobResult:
    """The request the gateway checked, on the version it pinned; the response is stored with the job."""
    request = gnn_pb2.ExplainRequest.FromString(base64.b64decode(context.spec["request"]))
    context.raise_if_cancelled()
    manifest = context.store.manifest(request.model_name, request.model_version)
    check_node_task(manifest)
    model = GnnModel(manifest, context.store.artifacts(manifest), context.device)
    if request.stored_graph:
        graph = model.graphs.get(request.stored_graph)
        if graph is None:
            raise NotFoundError(f"stored_graph: {manifest.name!r} v{manifest.version} has no graph "
                                f"{request.stored_graph!r}; it has {sorted(model.graphs)}")  # fmt: skip
    elif request.HasField("graph"):
        graph = to_graph_input(request.graph)
        check_graph(graph, model.in_channels, QueryLimits())
    else:
        raise InvalidArgumentError("graph_source: send either graph or stored_graph")
    check_node_ids(np.asarray(request.node_ids, np.int64), graph.num_nodes)
    context.message(f"explaining {manifest.name} v{manifest.version}")
    with cancellable_job(context.raise_if_cancelled):
        explanation = explain_nodes(
            model.net, manifest.config["num_layers"], graph.node_features, graph.edge_index, graph.edge_weight,
            list(request.node_ids), request.method, request.epochs,
            request.target if request.HasField("target") else None, request.seed, GnnExplainLimits(), context.device,
            manifest.config["num_classes"],
        )  # fmt: skip
    response = to_explain_response(manifest, explanation)
    return JobResult(manifest.version, {}, False, f"explained with {response.method}", response.SerializeToString())
