"""Shadow traffic at the gateway: a shadow version gets copies of the default's calls, after the
caller has its answer; it never slows, fails or reaches the caller, and never reaches the cache.
The backend is a real gRPC server whose shadow version waits until the test lets it go, or fails."""

import asyncio

import grpc
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.proxy import ROUTES, GatewayProxy
from gateway.settings import GatewaySettings
from gateway.shadow import shadow_share
from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from shared.server import GrpcServer
from shared.settings import ServerSettings
from shared.tensors import from_numpy
from tests.integration.listed_models import SERVICE_NAME as MODEL_SERVICE
from tests.integration.test_gateway_proxy import cache_redis  # noqa: F401 - the fixture
from tests.integration.test_hop_batching import until

READY = model_pb2.MODEL_STATE_READY


class TwoVersions(dense_pb2_grpc.DenseServiceServicer, models_pb2_grpc.ModelServiceServicer):
    """Model "m": v1 the default, answering label 1 at once; v2 its shadow (a share of `percent`),
    answering label 2 once `release` is set, or failing when `fail` is set."""

    def __init__(self):
        self.release = asyncio.Event()
        self.fail = False
        self.percent = 100
        self.calls: list[int] = []  # the version each call named

    async def ListModels(self, request, context):
        if request.family and request.family != "dense":
            return models_pb2.ListModelsResponse()
        versions = [model_pb2.ModelVersion(name="m", version=v, family="dense", state=READY) for v in (1, 2)]
        shadow = model_pb2.Shadow(model_version=2, percent=self.percent)
        return models_pb2.ListModelsResponse(models=[model_pb2.Model(name="m", default_version=1, versions=versions,
                                                                     shadow=shadow)])  # fmt: skip

    async def Predict(self, request, context):
        self.calls.append(request.model_version)
        version = request.model_version or 1
        if version == 2:
            if self.fail:
                await context.abort(grpc.StatusCode.INTERNAL, "the shadow version is broken")
            await self.release.wait()
        rows = request.inputs["x"].shape[0]
        return dense_pb2.PredictResponse(model_name="m", model_version=version, outputs={
            "label": from_numpy(np.full(rows, version, np.int64)),
            "score": from_numpy(np.full((rows, 2), 0.5 * version, np.float32))})  # fmt: skip


@pytest.fixture
async def gateway(cache_redis):  # noqa: F811 - the imported fixture
    backend_servicer = TwoVersions()

    def register(server):
        dense_pb2_grpc.add_DenseServiceServicer_to_server(backend_servicer, server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(backend_servicer, server)

    backend = GrpcServer(ServerSettings(port=0), register, ["maas.dense.v1.DenseService", MODEL_SERVICE])
    await backend.start()
    redis.Redis.from_url(cache_redis.url).flushall()
    settings = GatewaySettings(port=0, redis_url=cache_redis.url, shadow_queue_size=1, shadow_workers=1)
    backends = {r.family: Backend(r.family, r.service, f"127.0.0.1:{backend.port}", 1 << 20) for r in ROUTES}
    cache = ResultCache(settings.redis_url, settings.cache_ttl_s)
    catalog = ModelCatalog(backends, 60.0)
    proxy = GatewayProxy(backends, cache, catalog, settings)
    server = GrpcServer(settings, lambda s: s.add_generic_rpc_handlers(proxy.handlers()), [r.service for r in ROUTES])
    await server.start()
    await catalog.refresh("dense")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield dense_pb2_grpc.DenseServiceStub(channel), backend_servicer, catalog, cache_redis
    backend_servicer.release.set()
    await proxy.close()
    await server.server.stop(0)
    await backend.server.stop(0)
    await cache.close()


def request(value: float, version: int = 0) -> dense_pb2.PredictRequest:
    return dense_pb2.PredictRequest(model_name="m", model_version=version,
                                    inputs={"x": from_numpy(np.full((1, 4), value, np.float32))})  # fmt: skip


async def predict(stub, value: float, request_id: str = "", version: int = 0):
    metadata = (("x-request-id", request_id),) if request_id else ()
    call = stub.Predict(request(value, version), timeout=10, metadata=metadata)
    reply = await call
    return reply, dict(await call.trailing_metadata())["maas-cache"]


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, {"model": "m", "version": "2", **labels}) or 0.0


async def test_a_shadow_gets_a_copy_and_the_caller_never_waits_for_it(gateway):
    stub, backend, _, _ = gateway
    ok, differ = sample("maas_gateway_shadow_requests_total", code="OK"), sample("maas_gateway_shadow_rows_total",
                                                                                 outcome="differ")  # fmt: skip
    reply, outcome = await predict(stub, 1.0)
    # The caller has the default's answer while the shadow's copy is still held in the backend.
    assert (reply.model_version, outcome) == (1, "miss")
    await until(lambda: backend.calls == [0, 2], "the copy reached the shadow version")
    assert not backend.release.is_set()
    backend.release.set()
    await until(lambda: sample("maas_gateway_shadow_requests_total", code="OK") == ok + 1, "the shadow answered")
    # Compared with what the caller got: the label differs, the scores by 0.5.
    assert sample("maas_gateway_shadow_rows_total", outcome="differ") == differ + 1
    assert REGISTRY.get_sample_value("maas_gateway_shadow_abs_difference_sum", {"model": "m", "version": "2"}) > 0


async def test_a_failing_shadow_never_fails_the_caller(gateway):
    stub, backend, _, _ = gateway
    backend.fail = True
    failed = sample("maas_gateway_shadow_requests_total", code="INTERNAL")
    for count, value in enumerate((1.0, 2.0, 3.0), start=1):
        reply, _ = await predict(stub, value)
        assert reply.model_version == 1 and list(reply.outputs["label"].shape) == [1]
        await until(lambda n=count: sample("maas_gateway_shadow_requests_total", code="INTERNAL") == failed + n,
                    "the shadow failed")  # fmt: skip


async def test_a_full_shadow_queue_drops_the_copy_not_the_call(gateway):
    stub, backend, _, _ = gateway
    dropped = sample("maas_gateway_shadow_requests_total", code="dropped")
    replies = [await predict(stub, float(value)) for value in range(6)]  # one copy held, one queued, the rest dropped
    assert [reply.model_version for reply, _ in replies] == [1] * 6
    assert sample("maas_gateway_shadow_requests_total", code="dropped") - dropped >= 3
    backend.release.set()


async def test_the_shadows_answers_never_reach_the_cache(gateway):
    stub, backend, _, cache_server = gateway
    backend.release.set()
    ok = sample("maas_gateway_shadow_requests_total", code="OK")
    first, outcome = await predict(stub, 5.0)
    assert outcome == "miss"
    await until(lambda: sample("maas_gateway_shadow_requests_total", code="OK") == ok + 1, "the shadow answered")
    again, outcome = await predict(stub, 5.0)
    assert outcome == "hit" and again == first and again.model_version == 1
    keys = [key.decode() for key in redis.Redis.from_url(cache_server.url).keys("maas:v1:result:dense:m:*")]
    assert keys and all(key.startswith("maas:v1:result:dense:m:1:") for key in keys), keys


async def test_only_calls_naming_no_version_in_the_shadows_share_are_copied(gateway):
    stub, backend, catalog, _ = gateway
    backend.release.set()
    backend.percent = 30
    await catalog.refresh("dense")
    inside = [f"in-{i}" for i in range(200) if shadow_share(f"in-{i}") < 30][:3]
    outside = [f"out-{i}" for i in range(200) if shadow_share(f"out-{i}") >= 30][:3]
    for number, request_id in enumerate(outside):
        await predict(stub, 10.0 + number, request_id)
    await predict(stub, 20.0, inside[0], version=1)  # names the default: not copied
    await predict(stub, 21.0, inside[0], version=2)  # names the shadow: answered by it, not copied
    assert backend.calls == [0, 0, 0, 1, 2]
    for number, request_id in enumerate(inside):
        await predict(stub, 30.0 + number, request_id)
    await until(lambda: backend.calls.count(2) == 4, "a copy for each call inside the share")
