"""The gateway's forwarding path against a real, deliberately slow backend and a real Redis:
coalescing of identical calls, per-model cache policy, and message size limits."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import redis

from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.proxy import ROUTES, GatewayProxy
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.cluster import free_port
from shared.redis_server import CACHE_CONFIG, RedisServer
from shared.server import GrpcServer
from shared.settings import GatewaySettings, ServerSettings
from shared.tensors import from_numpy


class SlowDense(dense_pb2_grpc.DenseServiceServicer):
    """Answers after 200 ms and counts the calls that reached it."""

    def __init__(self):
        self.calls = 0

    async def Predict(self, request, context):
        self.calls += 1
        await asyncio.sleep(0.2)
        return dense_pb2.PredictResponse(model_name=request.model_name, model_version=request.model_version,
                                         outputs={"y": request.inputs["x"]})  # fmt: skip


@pytest.fixture(scope="module")
def cache_redis(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("cache"), CACHE_CONFIG)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def gateway(cache_redis):
    backend_servicer = SlowDense()
    backend = GrpcServer(ServerSettings(port=0),
                         lambda s: dense_pb2_grpc.add_DenseServiceServicer_to_server(backend_servicer, s),
                         ["maas.dense.v1.DenseService"])  # fmt: skip
    await backend.start()
    redis.Redis.from_url(cache_redis.url).flushall()
    settings = GatewaySettings(
        port=0,
        redis_url=cache_redis.url,
        max_message_bytes=4096,
        cache_policy={"uncached-model": {"enabled": False}, "short-lived": {"ttl_s": 5}},
    )
    backends = {r.family: Backend(r.family, r.service, f"127.0.0.1:{backend.port}", 1 << 20) for r in ROUTES}
    cache = ResultCache(settings.redis_url, settings.cache_ttl_s)
    proxy = GatewayProxy(backends, cache, ModelCatalog(backends, 60.0), settings)
    server = GrpcServer(settings, lambda s: s.add_generic_rpc_handlers(proxy.handlers()), [r.service for r in ROUTES])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield dense_pb2_grpc.DenseServiceStub(channel), backend_servicer
    await server.server.stop(0)
    await backend.server.stop(0)
    await cache.close()


def request(model="m", rows=1, value=0.0):
    return dense_pb2.PredictRequest(model_name=model, model_version=1,
                                    inputs={"x": from_numpy(np.full((rows, 4), value, np.float32))})  # fmt: skip


async def call(stub, req, metadata=()):
    call = stub.Predict(req, timeout=10, metadata=metadata)
    reply = await call
    return reply, dict(await call.trailing_metadata())["maas-cache"]


async def test_identical_calls_in_flight_reach_the_backend_once(gateway):
    stub, backend = gateway
    results = await asyncio.gather(*(call(stub, request(value=7.0)) for _ in range(10)))
    assert backend.calls == 1
    assert len({reply.SerializeToString() for reply, _ in results}) == 1
    assert sorted(outcome for _, outcome in results) == ["coalesced"] * 9 + ["miss"]
    # Different inputs are not coalesced.
    await asyncio.gather(call(stub, request(value=1.0)), call(stub, request(value=2.0)))
    assert backend.calls == 3


async def test_caching_can_be_turned_off_per_model(gateway):
    stub, backend = gateway
    outcomes = [(await call(stub, request("uncached-model")))[1] for _ in range(2)]
    assert outcomes == ["off", "off"] and backend.calls == 2


async def test_the_ttl_can_be_set_per_model(gateway, cache_redis):
    stub, _ = gateway
    await call(stub, request("short-lived"))
    await call(stub, request("m"))
    client = redis.Redis.from_url(cache_redis.url)
    ttls = {key.decode().split(":")[4]: client.pttl(key) for key in client.keys("maas:v1:result:*")}
    assert 0 < ttls["short-lived"] <= 5_500
    assert ttls["m"] > 250_000


async def test_an_oversized_message_is_resource_exhausted_with_the_limit(gateway):
    stub, backend = gateway
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(request(rows=300), timeout=10)  # 300 x 4 floats: about 4.8 kB
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4096" in err.value.details()
    assert backend.calls == 0
    reply, _ = await call(stub, request(rows=2))  # and the gateway keeps serving
    assert reply.model_name == "m"
