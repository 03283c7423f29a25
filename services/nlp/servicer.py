"""gRPC face of the NLP service: translates messages, holds no logic."""

from __future__ import annotations

import logging

import grpc

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.nlp.redaction import redact
from services.nlp.runtime import NlpRuntime
from shared.batching import deadline_from
from shared.tensors import encode_outputs

log = logging.getLogger(__name__)


class NlpServicer(nlp_pb2_grpc.NlpServiceServicer):
    def __init__(self, runtime: NlpRuntime) -> None:
        self.runtime = runtime

    async def Predict(self, request: nlp_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        if log.isEnabledFor(logging.DEBUG):  # inputs reach the log only at DEBUG, and redacted
            log.debug("predict %s: texts %s", request.model_name, [redact(text) for text in request.texts])
        prediction = await self.runtime.predict(
            request.model_name, request.model_version, list(request.texts), deadline_from(context.time_remaining())
        )
        return nlp_pb2.PredictResponse(
            model_name=prediction.manifest.name,
            model_version=prediction.manifest.version,
            outputs=encode_outputs(prediction.outputs),
            labels=prediction.labels,
        )
