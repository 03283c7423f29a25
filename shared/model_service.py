"""What every model service's `main` does: build the repository from settings and serve it, with
its family's data plane, maas.models.v1.ModelService and maas.keys.v1.KeyService on one port."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from maas.keys.v1 import keys_pb2_grpc
from maas.models.v1 import models_pb2_grpc
from shared.batching import BatchPolicy
from shared.families import Family
from shared.key_servicer import KeyServicer
from shared.keyring import Keyring
from shared.model_events import ModelEvents
from shared.model_repository import Loader, ModelRepository
from shared.model_servicer import SERVICE_NAME as MODEL_SERVICE
from shared.model_servicer import ModelServicer
from shared.model_store import ModelStore
from shared.server import GrpcServer
from shared.settings import ModelServiceSettings

log = logging.getLogger(__name__)


def build_repository(settings: ModelServiceSettings, family: str, loader: Loader) -> ModelRepository:
    keyring = Keyring.from_settings(settings)
    (log.info if keyring.enabled else log.warning)("model store %s: %s", settings.model_store, keyring.describe())
    return ModelRepository(
        ModelStore(settings.model_store, keyring),
        family,
        loader,
        ThreadPoolExecutor(settings.inference_threads, thread_name_prefix=f"{family}-infer"),
        batch_policy=lambda manifest: BatchPolicy.from_settings(settings, manifest.config.get("batching")),
        poll_s=settings.store_poll_s,
        events=ModelEvents(settings.events_redis_url),
    )


async def serve_models(
    settings: ModelServiceSettings,
    family: Family,
    repository: ModelRepository,
    servicer: Any,
    key_stores: dict[str, ModelStore] | None = None,
) -> None:
    """`key_stores`: other stores the service writes with the model store's keys, rotated with it."""

    def register(server: grpc.aio.Server) -> None:
        getattr(family.pb2_grpc(), f"add_{family.service_name}Servicer_to_server")(servicer, server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(repository), server)
        keys = KeyServicer(repository.store, family.name, key_stores)
        keys_pb2_grpc.add_KeyServiceServicer_to_server(keys, server)

    # KeyService is for the gateway only (which checks the caller is an admin): not listed by reflection here.
    server = GrpcServer(settings, register, [family.service, MODEL_SERVICE], known_model=repository.knows)
    await repository.serve(server)
