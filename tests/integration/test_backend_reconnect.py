"""A gateway backend whose service restarted: calls fail at once while its channel reconnects, and admin
calls (key rotation) wait for it a little first, so a rotation right after a restart does not come out
incomplete."""

import time

import grpc
import pytest

from gateway.backends import MODEL_SERVICE, Backend
from maas.models.v1 import models_pb2
from shared.errors import UpstreamError
from shared.server import GrpcServer
from shared.settings import ServerSettings
from shared.workers import free_port
from tests.integration.listed_models import add_listed_models

LIST = f"/{MODEL_SERVICE}/ListModels"


async def test_a_backend_that_comes_back_is_waited_for_and_answers():
    port = free_port()
    backend = Backend("dense", "maas.dense.v1.DenseService", f"127.0.0.1:{port}", 1 << 20)
    raw = models_pb2.ListModelsRequest().SerializeToString()
    # Nothing listens: the call fails at once, and the channel goes into reconnect backoff.
    with pytest.raises(UpstreamError) as caught:
        await backend.call(LIST, raw, timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    started = time.monotonic()
    assert not await backend.wait_ready(0.3)  # still down: the wait ends at its limit
    assert time.monotonic() - started < 5

    server = GrpcServer(ServerSettings(port=port), lambda s: add_listed_models(s, "dense", "m"), [MODEL_SERVICE])
    await server.start()
    try:
        assert await backend.wait_ready(20)  # the service is back: found within the reconnect backoff
        reply = models_pb2.ListModelsResponse.FromString(await backend.call(LIST, raw, timeout=5))
        assert [model.name for model in reply.models] == ["m"]
    finally:
        await server.server.stop(0)
        await backend.close()
