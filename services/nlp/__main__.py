"""`python -m services.nlp`: the language model service."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.nlp.runtime import NlpRuntime, nlp_loader
from services.nlp.servicer import NlpServicer
from shared.logs import configure_logging
from shared.model_repository import ModelRepository
from shared.model_store import ModelStore
from shared.server import GrpcServer
from shared.settings import NlpSettings

SERVICE_NAME = nlp_pb2.DESCRIPTOR.services_by_name["NlpService"].full_name


async def serve(settings: NlpSettings) -> None:
    store = ModelStore(settings.model_store)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="nlp-infer")
    loader = nlp_loader(store, settings.device, settings.max_sequence_length)
    repository = ModelRepository(store, "nlp", loader, executor)
    servicer = NlpServicer(NlpRuntime(repository, settings.max_batch_texts))
    server = GrpcServer(settings, partial(nlp_pb2_grpc.add_NlpServiceServicer_to_server, servicer), [SERVICE_NAME])
    await repository.serve(server)


def main() -> None:
    settings = NlpSettings()
    configure_logging("nlp", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
