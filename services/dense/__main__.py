"""`python -m services.dense`: the dense model service."""

from __future__ import annotations

import torch

from services.dense.explain import DenseExplainLimits, explainable_loader
from services.dense.runtime import DenseRuntime, onnx_loader
from services.dense.servicer import DenseServicer
from services.dense.settings import DenseSettings
from shared.explanations import ExplanationRunner
from shared.families import family
from shared.model_service import build_repository, serve_models
from shared.onnx_session import OnnxConfig, check_device
from shared.workers import run_server_process

FAMILY = family("dense")


async def serve(settings: DenseSettings) -> None:
    config = OnnxConfig.from_settings(settings)
    check_device(config)  # device=cuda that cannot run here stops the service now, with the reason
    torch.set_num_threads(settings.torch_threads)  # the torch forms that gradient explanations run on
    repository = build_repository(settings, FAMILY.name, onnx_loader(config))
    explainer = ExplanationRunner(repository.store, explainable_loader(config), settings.explain_threads)
    limits = DenseExplainLimits(settings.max_explain_rows, settings.max_explain_steps, 4 * settings.max_explain_steps)
    servicer = DenseServicer(DenseRuntime(repository, explainer, limits))
    await serve_models(settings, FAMILY, repository, servicer)


def main() -> None:
    run_server_process(FAMILY.name, FAMILY.module, DenseSettings(), serve)


if __name__ == "__main__":
    main()
