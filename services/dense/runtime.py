"""Dense inference, independent of gRPC: resolve the version, check the inputs, batch, run off the loop."""

from __future__ import annotations

import numpy as np

from services.dense.explain import DenseExplainLimits, DenseExplanation, ExplainableDense
from services.dense.signature import check_inputs
from shared.explanations import ExplanationRunner
from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Artifacts, Manifest
from shared.onnx_session import OnnxConfig, OnnxModel


def onnx_loader(config: OnnxConfig):
    def load(manifest: Manifest, artifacts: Artifacts) -> OnnxModel:
        return OnnxModel(artifacts.read(manifest.config.get("onnx_file", "model.onnx")), manifest.inputs, config)

    return load


class DenseRuntime:
    def __init__(
        self,
        repository: ModelRepository,
        explainer: ExplanationRunner[ExplainableDense] | None = None,
        explain_limits: DenseExplainLimits | None = None,
    ) -> None:
        self.repository = repository
        self.explainer = explainer
        self.explain_limits = explain_limits or DenseExplainLimits()

    async def predict(
        self, name: str, version: int, inputs: dict[str, np.ndarray], deadline: float | None = None
    ) -> Prediction:
        entry = self.repository.resolve(name, version)
        # Validated before batching, so one bad request never fails its neighbours.
        check_inputs(entry.manifest.inputs, inputs)
        outputs = await entry.batcher.submit(inputs, deadline)
        return Prediction(entry.manifest, outputs)

    async def explain(
        self,
        name: str,
        version: int,
        inputs: dict[str, np.ndarray],
        method: str,
        baselines: dict[str, np.ndarray],
        steps: int,
        target: int | None,
        deadline: float | None = None,
        validate_only: bool = False,
    ) -> tuple[Manifest, DenseExplanation | None]:
        entry = self.repository.resolve(name, version)
        check_inputs(entry.manifest.inputs, inputs)
        assert self.explainer is not None
        form = await self.explainer.form(entry.manifest)
        explanation = await self.explainer.run(
            form.explain, inputs, method, baselines, steps, target, self.explain_limits, validate_only,
            deadline=deadline,
        )
        return entry.manifest, explanation
