"""Explanation jobs for graph models, run by the gnn trainer from the job queue: the rpc's two steps,
resolve_query and explain_query, on the version (and graph version) the gateway pinned."""

from __future__ import annotations

import base64

from maas.gnn.v1 import gnn_pb2
from services.gnn.explain import GnnExplainLimits, explain_query, resolve_query
from services.gnn.graph_store import GraphStore
from services.gnn.runtime import GnnModel, QueryLimits
from services.gnn.servicer import to_explain_params, to_explain_response
from shared.explanations import cancellable_job
from shared.training_worker import JobContext, JobResult


def run_explain_job(context: JobContext) -> JobResult:
    """The request the gateway checked, on the version it pinned; the response is stored with the job."""
    request = gnn_pb2.ExplainRequest.FromString(base64.b64decode(context.spec["request"]))
    context.raise_if_cancelled()
    manifest = context.store.manifest(request.model_name, request.model_version)
    model = GnnModel(manifest, context.store.artifacts(manifest), context.device)
    params = to_explain_params(request)
    limits = GnnExplainLimits()
    query = resolve_query(model, manifest, params, GraphStore(context.store), limits, QueryLimits())
    context.message(f"explaining {manifest.name} v{manifest.version}")
    with cancellable_job(context.raise_if_cancelled):
        explanation = explain_query(model.net, manifest, query, params, limits, context.device)
    response = to_explain_response(manifest, query, explanation)
    return JobResult(manifest.version, {}, False, f"explained with {response.method}", response.SerializeToString())
