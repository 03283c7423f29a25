"""`python -m services.nlp`: the language model service."""

from __future__ import annotations

import asyncio

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.nlp.runtime import NlpRuntime, nlp_loader
from services.nlp.servicer import NlpServicer
from shared.logs import configure_logging
from shared.model_service import build_repository, serve_models
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig
from shared.settings import NlpSettings
from shared.tracing import configure_tracing

SERVICE_NAME = nlp_pb2.DESCRIPTOR.services_by_name["NlpService"].full_name


async def serve(settings: NlpSettings) -> None:
    loader = nlp_loader(
        ModelStore(settings.model_store), OnnxConfig.from_settings(settings), settings.max_sequence_length
    )
    repository = build_repository(settings, "nlp", loader)
    servicer = NlpServicer(NlpRuntime(repository, settings.max_batch_texts))
    await serve_models(settings, repository, servicer, nlp_pb2_grpc.add_NlpServiceServicer_to_server, SERVICE_NAME)


def main() -> None:
    settings = NlpSettings()
    configure_logging("nlp", settings.log_level, settings.log_format)
    configure_tracing("nlp", settings.tracing, settings.otlp_endpoint)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
