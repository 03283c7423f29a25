"""Dense inference, independent of gRPC: resolve the version, check the inputs, batch, run off the loop."""

from __future__ import annotations

import numpy as np

from services.dense.signature import check_inputs
from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Artifacts, Manifest
from shared.onnx_session import OnnxConfig, OnnxModel


def onnx_loader(config: OnnxConfig):
    def load(manifest: Manifest, artifacts: Artifacts) -> OnnxModel:
        return OnnxModel(artifacts.read(manifest.config.get("onnx_file", "model.onnx")), manifest.inputs, config)

    return load


class DenseRuntime:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def predict(
        self, name: str, version: int, inputs: dict[str, np.ndarray], deadline: float | None = None
    ) -> Prediction:
        entry = self.repository.resolve(name, version)
        # Validated before batching, so one bad request never fails its neighbours.
        check_inputs(entry.manifest.inputs, inputs)
        outputs = await entry.batcher.submit(inputs, deadline)
        return Prediction(entry.manifest, outputs)
