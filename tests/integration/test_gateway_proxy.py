"""The gateway's forwarding path against a real, deliberately slow backend and a real Redis:
coalescing of identical calls, per-model cache policy, and message size limits."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from gateway.auth import ApiKeys, AuthInterceptor, hash_key
from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.proxy import ROUTES, GatewayProxy
from gateway.rate_limit import RateLimiter, RateLimitInterceptor
from gateway.settings import GatewaySettings
from maas.common.v1 import tensor_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.cluster import free_port
from shared.redis_server import CACHE_CONFIG, RedisServer
from shared.server import GrpcServer
from shared.settings import ServerSettings
from shared.tensors import from_numpy
from tests.integration.listed_models import SERVICE_NAME as MODEL_SERVICE
from tests.integration.listed_models import add_listed_models


class SlowDense(dense_pb2_grpc.DenseServiceServicer):
    """Answers after 200 ms and counts the calls that reached it."""

    def __init__(self):
        self.calls = 0

    async def Predict(self, request, context):
        self.calls += 1
        await asyncio.sleep(0.2)
        return dense_pb2.PredictResponse(model_name=request.model_name, model_version=request.model_version,
                                         outputs={"y": request.inputs["x"]})  # fmt: skip


def register(server, servicer) -> None:
    dense_pb2_grpc.add_DenseServiceServicer_to_server(servicer, server)
    # The gateway refuses a model its catalog has not read: the backend lists the names the tests call.
    add_listed_models(server, "dense", *MODELS)


MODELS = ("m", "uncached-model", "short-lived")


@pytest.fixture(scope="module")
def cache_redis(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("cache"), CACHE_CONFIG)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def gateway(cache_redis):
    backend_servicer = SlowDense()
    backend = GrpcServer(ServerSettings(port=0), lambda s: register(s, backend_servicer),
                         ["maas.dense.v1.DenseService", MODEL_SERVICE])  # fmt: skip
    await backend.start()
    redis.Redis.from_url(cache_redis.url).flushall()
    settings = GatewaySettings(
        port=0,
        redis_url=cache_redis.url,
        max_message_bytes=4096,
        max_repeated=100,
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


@pytest.fixture
async def limited_gateway(cache_redis, tmp_path):
    """A gateway with API keys and a limit of 3 calls/s (burst 3) per tenant; tenant "bulk" gets 1/s."""
    backend_servicer = SlowDense()
    backend = GrpcServer(ServerSettings(port=0), lambda s: register(s, backend_servicer),
                         ["maas.dense.v1.DenseService", MODEL_SERVICE])  # fmt: skip
    await backend.start()
    redis.Redis.from_url(cache_redis.url).flushall()
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": t, "sha256": hash_key(k)} for t, k in TENANT_KEYS.items()]}))
    settings = GatewaySettings(port=0)
    backends = {r.family: Backend(r.family, r.service, f"127.0.0.1:{backend.port}", 1 << 20) for r in ROUTES}
    proxy = GatewayProxy(backends, ResultCache(None, 1.0), ModelCatalog(backends, 60.0), settings)
    limiter_redis = aioredis.Redis.from_url(cache_redis.url)
    limiter = RateLimiter(limiter_redis, 3, 3, {"bulk": {"rate_per_s": 1}})
    server = GrpcServer(
        settings,
        lambda s: s.add_generic_rpc_handlers(proxy.handlers()),
        [r.service for r in ROUTES],
        [AuthInterceptor(ApiKeys.from_file(keys)), RateLimitInterceptor(limiter)],
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield dense_pb2_grpc.DenseServiceStub(channel)
    await server.server.stop(0)
    await backend.server.stop(0)
    await limiter_redis.aclose()


TENANT_KEYS = {"web": "web-key-123456", "other": "other-key-654321", "bulk": "bulk-key-000000"}


def as_tenant(tenant):
    return (("authorization", f"Bearer {TENANT_KEYS[tenant]}"),)


async def test_a_tenant_over_its_rate_gets_resource_exhausted_with_a_retry_hint(limited_gateway):
    stub = limited_gateway
    calls = [stub.Predict(request(value=i), timeout=10, metadata=as_tenant("web")) for i in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 2 and len(results) - len(refused) == 3
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "rate limit of 3 requests/s for tenant 'web'" in refused[0].details()
    retry_ms = int(dict(refused[0].trailing_metadata())["retry-after-ms"])
    assert 0 < retry_ms <= 400
    # Another tenant has its own bucket.
    await stub.Predict(request(), timeout=10, metadata=as_tenant("other"))
    # After the hinted wait, the first tenant may call again.
    await asyncio.sleep(retry_ms / 1000 + 0.05)
    await stub.Predict(request(), timeout=10, metadata=as_tenant("web"))


async def test_per_tenant_overrides(limited_gateway):
    stub = limited_gateway
    calls = [stub.Predict(request(value=i), timeout=10, metadata=as_tenant("bulk")) for i in range(2)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and "1 requests/s" in refused[0].details()


async def test_a_follower_survives_its_leader_running_out_of_time(gateway):
    stub, backend = gateway
    req = request(value=11.0)
    leader = asyncio.ensure_future(stub.Predict(req, timeout=0.05))  # shorter than the backend's 200 ms
    await asyncio.sleep(0.01)
    follower = await call(stub, req)  # joins the leader's call, then calls alone once that one times out
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await leader
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert follower[0].model_name == "m"


async def test_a_follower_survives_its_leader_going_away(gateway):
    stub, backend = gateway
    req = request(value=12.0)
    leader = stub.Predict(req, timeout=10)
    await asyncio.sleep(0.01)
    follower = asyncio.ensure_future(call(stub, req))
    await asyncio.sleep(0.01)
    leader.cancel()
    reply, outcome = await follower
    assert reply.model_name == "m" and outcome == "coalesced"
    assert backend.calls == 1  # the one backend call went on without the caller that started it


async def test_a_request_over_the_limits_is_refused_before_any_work(gateway):
    stub, backend = gateway
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(dense_pb2.PredictRequest(model_name="m", output_names=["y"] * 150), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_names: 150 entries; at most 100" in err.value.details()
    bad_shape = dense_pb2.PredictRequest(
        model_name="m", inputs={"x": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FP32, shape=[0, 2**62])}
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(bad_shape, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs['x']" in err.value.details() and "has dimension 4611686018427387904" in err.value.details()
    assert backend.calls == 0
