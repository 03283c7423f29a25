"""What every model service's `main` does: build the repository from settings and serve it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from shared.batching import BatchPolicy
from shared.model_repository import Loader, ModelRepository
from shared.model_store import ModelStore
from shared.server import GrpcServer
from shared.settings import ModelServiceSettings


def build_repository(settings: ModelServiceSettings, family: str, loader: Loader) -> ModelRepository:
    return ModelRepository(
        ModelStore(settings.model_store),
        family,
        loader,
        ThreadPoolExecutor(settings.inference_threads, thread_name_prefix=f"{family}-infer"),
        batch_policy=lambda manifest: BatchPolicy.from_settings(settings, manifest.config.get("batching")),
        poll_s=settings.store_poll_s,
    )


async def serve_models(
    settings: ModelServiceSettings,
    repository: ModelRepository,
    servicer: Any,
    add_servicer: Callable[[Any, grpc.aio.Server], None],
    service_name: str,
) -> None:
    server = GrpcServer(settings, lambda s: add_servicer(servicer, s), [service_name])
    await repository.serve(server)
