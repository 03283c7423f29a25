"""`python -m services.gnn`: the graph neural network service."""

from __future__ import annotations

import torch

from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from services.gnn.runtime import GnnRuntime, gcn_loader
from services.gnn.servicer import GnnServicer
from shared.model_service import build_repository, serve_models
from shared.settings import GnnSettings
from shared.torch_device import resolve_torch_device
from shared.workers import run_server_process

SERVICE_NAME = gnn_pb2.DESCRIPTOR.services_by_name["GnnService"].full_name


async def serve(settings: GnnSettings) -> None:
    torch.set_num_threads(settings.torch_threads)
    device = resolve_torch_device(settings.device, settings.device_index, settings.gpu_memory_limit_mb)
    repository = build_repository(settings, "gnn", gcn_loader(device))
    servicer = GnnServicer(GnnRuntime(repository))
    await serve_models(settings, repository, servicer, gnn_pb2_grpc.add_GnnServiceServicer_to_server, SERVICE_NAME)


def main() -> None:
    run_server_process("gnn", "services.gnn", GnnSettings(), serve)


if __name__ == "__main__":
    main()
