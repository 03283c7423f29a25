"""gRPC face of the dense service: translates messages, holds no logic."""

from __future__ import annotations

import grpc

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.dense.runtime import DenseRuntime
from shared.batching import deadline_from
from shared.tensors import decode_inputs, encode_outputs


class DenseServicer(dense_pb2_grpc.DenseServiceServicer):
    def __init__(self, runtime: DenseRuntime) -> None:
        self.runtime = runtime

    async def Predict(self, request: dense_pb2.PredictRequest, context: grpc.aio.ServicerContext):
        prediction = await self.runtime.predict(
            request.model_name,
            request.model_version,
            decode_inputs(request.inputs),
            deadline_from(context.time_remaining()),
        )
        return dense_pb2.PredictResponse(
            model_name=prediction.manifest.name,
            model_version=prediction.manifest.version,
            outputs=encode_outputs(prediction.outputs, request.output_names),
        )
