"""The gateway passes the caller's deadline on, less its margin, and sets one when the caller has none."""

import grpc
import numpy as np
import pytest

from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.proxy import ROUTES, GatewayProxy
from gateway.settings import GatewaySettings
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.server import GrpcServer
from shared.settings import ServerSettings
from shared.tensors import from_numpy
from tests.integration.listed_models import SERVICE_NAME as MODEL_SERVICE
from tests.integration.listed_models import add_listed_models


class RecordingDense(dense_pb2_grpc.DenseServiceServicer):
    """A backend that records the deadline each call arrives with."""

    def __init__(self):
        self.remaining: list[float | None] = []

    async def Predict(self, request, context):
        self.remaining.append(context.time_remaining())
        return dense_pb2.PredictResponse(model_name=request.model_name, model_version=request.model_version)


def register(server, servicer) -> None:
    dense_pb2_grpc.add_DenseServiceServicer_to_server(servicer, server)
    add_listed_models(server, "dense", "m")  # the gateway refuses a model its catalog has not read


@pytest.fixture
async def gateway():
    backend_servicer = RecordingDense()
    backend = GrpcServer(
        ServerSettings(port=0),
        lambda s: register(s, backend_servicer),
        ["maas.dense.v1.DenseService", MODEL_SERVICE],
    )
    await backend.start()
    settings = GatewaySettings(port=0, default_deadline_s=7.0, redis_url=None)
    backends = {r.family: Backend(r.family, r.service, f"127.0.0.1:{backend.port}", 1 << 20) for r in ROUTES}
    proxy = GatewayProxy(backends, ResultCache(None, 1.0), ModelCatalog(backends, 60.0), settings)
    server = GrpcServer(settings, lambda s: s.add_generic_rpc_handlers(proxy.handlers()), [r.service for r in ROUTES])
    await server.start()
    yield server, backend_servicer
    await server.server.stop(0)
    await backend.server.stop(0)


async def test_deadline_reaches_the_backend(gateway):
    server, backend = gateway
    request = dense_pb2.PredictRequest(
        model_name="m", model_version=1, inputs={"x": from_numpy(np.zeros(1, np.float32))}
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = dense_pb2_grpc.DenseServiceStub(channel)
        reply = await stub.Predict(request, timeout=3.0)
        await stub.Predict(request)  # no deadline from the caller
    assert reply.model_name == "m"
    with_deadline, without = backend.remaining
    assert 2.0 < with_deadline < 3.1  # the caller's 3 s, not the 7 s default (the wire rounds up a little)
    assert 6.0 < without < 7.1  # grpc rounds deadlines up slightly on the wire
