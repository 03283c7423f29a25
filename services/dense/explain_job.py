"""Explanation jobs for dense models, run by the dense trainer from the job queue."""

from __future__ import annotations

import base64

from maas.dense.v1 import dense_pb2
from services.dense.explain import DenseExplainLimits, ExplainableDense
from services.dense.servicer import to_explain_response
from services.dense.signature import check_inputs
from shared.explanations import cancellable_job
from shared.onnx_session import OnnxConfig
from shared.tensors import decode_inputs
from shared.training_worker import JobContext, JobResult


def run_explain_job(context: JobContext) -> JobResult:
    """The request the gateway checked, on the version it pinned; the response is stored with the job."""
    request = dense_pb2.ExplainRequest.FromString(base64.b64decode(context.spec["request"]))
    context.raise_if_cancelled()
    manifest = context.store.manifest(request.model_name, request.model_version)
    inputs = decode_inputs(request.inputs)
    check_inputs(manifest.inputs, inputs)
    form = ExplainableDense(manifest, context.store.artifacts(manifest), OnnxConfig(device="cpu"))
    context.message(f"explaining {manifest.name} v{manifest.version}")
    with cancellable_job(context.raise_if_cancelled):
        explanation = form.explain(
            inputs, request.method, decode_inputs(request.baselines, "baselines"), request.steps,
            request.target if request.HasField("target") else None, DenseExplainLimits(),
        )  # fmt: skip
    response = to_explain_response(manifest, explanation)
    return JobResult(manifest.version, {}, False, f"explained with {response.method}", response.SerializeToString())
