"""`python -m services.dense`: the dense model service."""

from __future__ import annotations

import asyncio
import contextlib

import torch

from services.dense.explain import DenseExplainLimits, explainable_loader
from services.dense.runtime import DenseRuntime, onnx_loader
from services.dense.servicer import DenseServicer
from services.dense.settings import DenseSettings
from shared.drift import DriftMonitor
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
    monitor = None
    if settings.events_redis_url and settings.drift_interval_s > 0:  # the payload records are on the queue's Redis
        monitor = asyncio.create_task(DriftMonitor(repository, settings.events_redis_url, settings.drift_interval_s,
                                                   settings.drift_window, settings.drift_min_rows,
                                                   settings.drift_p_value, settings.drift_retrain,
                                                   repository.store.keyring).run())  # fmt: skip
    try:
        await serve_models(settings, FAMILY, repository, servicer)
    finally:
        if monitor is not None:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor


def main() -> None:
    run_server_process(FAMILY.name, FAMILY.module, DenseSettings(), serve)


if __name__ == "__main__":
    main()
