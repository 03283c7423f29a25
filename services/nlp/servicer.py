"""gRPC face of the NLP service: translates messages, holds no logic."""

from __future__ import annotations

import logging

import grpc
import numpy as np

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.nlp.explain import TextExplanation
from services.nlp.runtime import CUT, ERROR, NlpRuntime
from shared.batching import deadline_from
from shared.model_store import Manifest
from shared.redaction import redact
from shared.tensors import encode_outputs, from_numpy

log = logging.getLogger(__name__)

TRUNCATION = {nlp_pb2.TRUNCATION_UNSPECIFIED: CUT, nlp_pb2.TRUNCATION_CUT: CUT, nlp_pb2.TRUNCATION_ERROR: ERROR}


def truncation(value: int) -> str:
    # An enum value this build does not know (a newer client) cuts, as the default does.
    return TRUNCATION.get(value, CUT)


def token_counts(counts: np.ndarray, limit: int) -> list[nlp_pb2.TokenCount]:
    return [nlp_pb2.TokenCount(tokens=int(count), truncated=bool(count > limit)) for count in counts]


def to_explain_response(manifest: Manifest, explanation: TextExplanation | None) -> nlp_pb2.ExplainResponse:
    if explanation is None:  # validate_only
        return nlp_pb2.ExplainResponse(model_name=manifest.name, model_version=manifest.version)
    response = nlp_pb2.ExplainResponse(
        model_name=manifest.name,
        model_version=manifest.version,
        method=explanation.method,
        tokens=[
            nlp_pb2.TokenAttribution(token=t.token, attribution=t.attribution, start=t.start, end=t.end)
            for t in explanation.tokens
        ],
        attributions=from_numpy(np.array([t.attribution for t in explanation.tokens], dtype=np.float32)),
        target=explanation.target,
        label=explanation.label,
        score=explanation.score,
        baseline_score=explanation.baseline_score,
    )
    if explanation.probabilities is not None:
        response.probabilities.CopyFrom(from_numpy(explanation.probabilities.astype(np.float32)))
    return response


class NlpServicer(nlp_pb2_grpc.NlpServiceServicer):
    def __init__(self, runtime: NlpRuntime) -> None:
        self.runtime = runtime

    async def Predict(self, request: nlp_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        if log.isEnabledFor(logging.DEBUG):  # inputs reach the log only at DEBUG, and redacted
            log.debug("predict %s: texts %s", request.model_name, [redact(text) for text in request.texts])
        prediction = await self.runtime.predict(
            request.model_name, request.model_version, list(request.texts), deadline_from(context.time_remaining()),
            truncation(request.truncation),
        )  # fmt: skip
        return nlp_pb2.PredictResponse(
            model_name=prediction.manifest.name,
            model_version=prediction.manifest.version,
            outputs=encode_outputs(prediction.outputs),
            labels=prediction.labels,
            token_counts=token_counts(prediction.token_counts, prediction.max_tokens),
            max_tokens=prediction.max_tokens,
        )

    async def Similarity(self, request: nlp_pb2.SimilarityRequest, context: grpc.aio.ServicerContext):
        result = await self.runtime.similarity(
            request.model_name, request.model_version, request.query, list(request.candidates),
            deadline_from(context.time_remaining()), truncation(request.truncation), request.rerank_label,
        )  # fmt: skip
        counts = token_counts(result.token_counts, result.max_tokens)
        response = nlp_pb2.SimilarityResponse(
            model_name=result.manifest.name,
            model_version=result.manifest.version,
            scores=result.scores.tolist(),
            ranking=result.ranking.tolist(),
            query_tokens=counts[0],
            candidate_tokens=counts[1:],
            max_tokens=result.max_tokens,
        )
        if result.reranking is not None:
            response.label_probabilities.extend(result.label_probabilities.tolist())
            response.reranking.extend(result.reranking.tolist())
        return response

    async def Explain(self, request: nlp_pb2.ExplainRequest, context: grpc.aio.ServicerContext):
        manifest, explanation = await self.runtime.explain(
            request.model_name, request.model_version, request.text, request.method,
            request.target if request.HasField("target") else None, request.compare_text,
            deadline_from(context.time_remaining()), request.validate_only,
        )  # fmt: skip
        return to_explain_response(manifest, explanation)
