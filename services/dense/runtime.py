"""Dense inference, independent of gRPC: resolve the version, check the inputs, run off the loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Manifest
from shared.onnx_session import OnnxModel
from shared.signature import check_inputs


def onnx_loader(device: str, threads: int):
    def load(manifest: Manifest, directory: Path) -> OnnxModel:
        return OnnxModel(directory / manifest.config.get("onnx_file", "model.onnx"), manifest.inputs, device, threads)

    return load


class DenseRuntime:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def predict(self, name: str, version: int, inputs: dict[str, np.ndarray]) -> Prediction:
        entry = self.repository.resolve(name, version)
        check_inputs(entry.manifest.inputs, inputs)
        outputs = await self.repository.run(entry.predictor.predict, inputs)
        return Prediction(entry.manifest, outputs)
