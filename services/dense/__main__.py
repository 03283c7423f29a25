"""`python -m services.dense`: the dense model service."""

from __future__ import annotations

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.dense.runtime import DenseRuntime, onnx_loader
from services.dense.servicer import DenseServicer
from shared.model_service import build_repository, serve_models
from shared.onnx_session import OnnxConfig, check_device
from shared.settings import DenseSettings
from shared.workers import run_server_process

SERVICE_NAME = dense_pb2.DESCRIPTOR.services_by_name["DenseService"].full_name


async def serve(settings: DenseSettings) -> None:
    config = OnnxConfig.from_settings(settings)
    check_device(config)  # device=cuda that cannot run here stops the service now, with the reason
    repository = build_repository(settings, "dense", onnx_loader(config))
    servicer = DenseServicer(DenseRuntime(repository))
    await serve_models(settings, repository, servicer, dense_pb2_grpc.add_DenseServiceServicer_to_server, SERVICE_NAME)


def main() -> None:
    run_server_process("dense", "services.dense", DenseSettings(), serve)


if __name__ == "__main__":
    main()
