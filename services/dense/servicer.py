"""gRPC face of the dense service: translates messages, holds no logic."""

from __future__ import annotations

import grpc

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.dense.explain import DenseExplanation
from services.dense.runtime import DenseRuntime
from shared.batching import deadline_from
from shared.model_store import Manifest
from shared.tensors import decode_inputs, encode_outputs


def to_explain_response(manifest: Manifest, explanation: DenseExplanation | None) -> dense_pb2.ExplainResponse:
    if explanation is None:  # validate_only
        return dense_pb2.ExplainResponse(model_name=manifest.name, model_version=manifest.version)
    return dense_pb2.ExplainResponse(
        model_name=manifest.name,
        model_version=manifest.version,
        method=explanation.method,
        attributions=encode_outputs(explanation.attributions),
        outputs=encode_outputs(explanation.outputs),
        targets=explanation.targets.tolist(),
        scores=explanation.scores.tolist(),
        baseline_scores=explanation.baseline_scores.tolist(),
    )


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

    async def Explain(self, request: dense_pb2.ExplainRequest, context: grpc.aio.ServicerContext):
        manifest, explanation = await self.runtime.explain(
            request.model_name,
            request.model_version,
            decode_inputs(request.inputs),
            request.method,
            decode_inputs(request.baselines, "baselines"),
            request.steps,
            request.target if request.HasField("target") else None,
            deadline_from(context.time_remaining()),
            request.validate_only,
        )
        return to_explain_response(manifest, explanation)
