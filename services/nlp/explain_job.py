"""Explanation jobs for text models, run by the nlp trainer from the job queue."""

from __future__ import annotations

import base64

from maas.nlp.v1 import nlp_pb2
from services.nlp.explain import explain_text
from services.nlp.runtime import nlp_loader
from services.nlp.servicer import to_explain_response
from services.nlp.settings import NlpSettings
from shared.explanations import cancellable_job
from shared.onnx_session import OnnxConfig
from shared.training_worker import JobContext, JobResult


def run_explain_job(context: JobContext) -> JobResult:
    """The request the gateway checked, on the version it pinned; the response is stored with the job."""
    request = nlp_pb2.ExplainRequest.FromString(base64.b64decode(context.spec["request"]))
    context.raise_if_cancelled()
    manifest = context.store.manifest(request.model_name, request.model_version)
    # The service's token limit (MAAS_NLP_MAX_SEQUENCE_LENGTH), so a job takes what the rpc takes.
    load = nlp_loader(context.store, OnnxConfig(device="cpu"), NlpSettings().max_sequence_length)
    predictor = load(manifest, context.store.artifacts(manifest))
    context.message(f"explaining {manifest.name} v{manifest.version}")
    with cancellable_job(context.raise_if_cancelled):
        explanation = explain_text(
            predictor, manifest.class_names, request.text, request.method,
            request.target if request.HasField("target") else None, request.compare_text,
        )  # fmt: skip
    response = to_explain_response(manifest, explanation)
    return JobResult(manifest.version, {}, False, f"explained with {response.method}", response.SerializeToString())
