"""`python -m services.gnn`: the graph neural network service."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from services.gnn.runtime import GnnRuntime, gcn_loader
from services.gnn.servicer import GnnServicer
from shared.logs import configure_logging
from shared.model_repository import ModelRepository
from shared.model_store import ModelStore
from shared.server import GrpcServer
from shared.settings import GnnSettings

SERVICE_NAME = gnn_pb2.DESCRIPTOR.services_by_name["GnnService"].full_name


async def serve(settings: GnnSettings) -> None:
    # Inference threads already run requests in parallel; one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="gnn-infer")
    repository = ModelRepository(ModelStore(settings.model_store), "gnn", gcn_loader(settings.device), executor)
    servicer = GnnServicer(GnnRuntime(repository))
    server = GrpcServer(settings, partial(gnn_pb2_grpc.add_GnnServiceServicer_to_server, servicer), [SERVICE_NAME])
    await repository.serve(server)


def main() -> None:
    settings = GnnSettings()
    configure_logging("gnn", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
