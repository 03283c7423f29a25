"""`python -m services.dense`: the dense model service."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.dense.runtime import DenseRuntime, onnx_loader
from services.dense.servicer import DenseServicer
from shared.logs import configure_logging
from shared.model_repository import ModelRepository
from shared.model_store import ModelStore
from shared.server import GrpcServer
from shared.settings import DenseSettings

SERVICE_NAME = dense_pb2.DESCRIPTOR.services_by_name["DenseService"].full_name


async def serve(settings: DenseSettings) -> None:
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="dense-infer")
    repository = ModelRepository(
        ModelStore(settings.model_store), "dense", onnx_loader(settings.device, threads=1), executor
    )
    servicer = DenseServicer(DenseRuntime(repository))
    server = GrpcServer(settings, partial(dense_pb2_grpc.add_DenseServiceServicer_to_server, servicer), [SERVICE_NAME])
    await repository.serve(server)


def main() -> None:
    settings = DenseSettings()
    configure_logging("dense", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
