"""`python -m services.dense`: the dense model service."""

from __future__ import annotations

import asyncio

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.dense.runtime import DenseRuntime, onnx_loader
from services.dense.servicer import DenseServicer
from shared.logs import configure_logging
from shared.model_service import build_repository, serve_models
from shared.onnx_session import OnnxConfig
from shared.settings import DenseSettings
from shared.tracing import configure_tracing

SERVICE_NAME = dense_pb2.DESCRIPTOR.services_by_name["DenseService"].full_name


async def serve(settings: DenseSettings) -> None:
    repository = build_repository(settings, "dense", onnx_loader(OnnxConfig.from_settings(settings)))
    servicer = DenseServicer(DenseRuntime(repository))
    await serve_models(settings, repository, servicer, dense_pb2_grpc.add_DenseServiceServicer_to_server, SERVICE_NAME)


def main() -> None:
    settings = DenseSettings()
    configure_logging("dense", settings.log_level, settings.log_format)
    configure_tracing("dense", settings.tracing, settings.otlp_endpoint)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
