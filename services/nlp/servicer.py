"""gRPC face of the NLP service: translates messages, holds no logic."""

from __future__ import annotations

import grpc

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.nlp.runtime import NlpRuntime
from shared.tensors import encode_outputs


class NlpServicer(nlp_pb2_grpc.NlpServiceServicer):
    def __init__(self, runtime: NlpRuntime) -> None:
        self.runtime = runtime

    async def Predict(self, request: nlp_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        prediction = await self.runtime.predict(request.model_name, request.model_version, list(request.texts))
        return nlp_pb2.PredictResponse(
            model_name=prediction.manifest.name,
            model_version=prediction.manifest.version,
            outputs=encode_outputs(prediction.outputs),
            labels=prediction.labels,
        )

    async def ListModels(self, request, context):
        return nlp_pb2.ListModelsResponse(models=self.runtime.repository.describe_all())

    async def GetModel(self, request: nlp_pb2.GetModelRequest, context):
        return nlp_pb2.GetModelResponse(model=self.runtime.repository.describe(request.model_name))
