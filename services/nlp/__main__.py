"""`python -m services.nlp`: the language model service."""

from __future__ import annotations

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.nlp.runtime import NlpRuntime, nlp_loader
from services.nlp.servicer import NlpServicer
from shared.model_service import build_repository, serve_models
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig, check_device
from shared.settings import NlpSettings
from shared.workers import run_server_process

SERVICE_NAME = nlp_pb2.DESCRIPTOR.services_by_name["NlpService"].full_name


async def serve(settings: NlpSettings) -> None:
    config = OnnxConfig.from_settings(settings)
    check_device(config)  # device=cuda that cannot run here stops the service now, with the reason
    loader = nlp_loader(ModelStore(settings.model_store), config, settings.max_sequence_length)
    repository = build_repository(settings, "nlp", loader)
    servicer = NlpServicer(NlpRuntime(repository, settings.max_batch_texts))
    await serve_models(settings, repository, servicer, nlp_pb2_grpc.add_NlpServiceServicer_to_server, SERVICE_NAME)


def main() -> None:
    run_server_process("nlp", "services.nlp", NlpSettings(), serve)


if __name__ == "__main__":
    main()
