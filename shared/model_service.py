"""What every model service's `main` does: build the repository from settings and serve it, with
its family's data plane and maas.models.v1.ModelService on one port."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from maas.models.v1 import models_pb2_grpc
from shared.batching import BatchPolicy
from shared.families import Family
from shared.model_events import ModelEvents
from shared.model_repository import Loader, ModelRepository
from shared.model_servicer import SERVICE_NAME as MODEL_SERVICE
from shared.model_servicer import ModelServicer
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
        events=ModelEvents(settings.events_redis_url),
    )


async def serve_models(
    settings: ModelServiceSettings, family: Family, repository: ModelRepository, servicer: Any
) -> None:
    def register(server: grpc.aio.Server) -> None:
        getattr(family.pb2_grpc(), f"add_{family.service_name}Servicer_to_server")(servicer, server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(repository), server)

    server = GrpcServer(settings, register, [family.service, MODEL_SERVICE], known_model=repository.knows)
    await repository.serve(server)
