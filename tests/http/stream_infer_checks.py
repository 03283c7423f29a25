"""ModelStreamInfer against a real, deliberately slow backend: per-call deadlines, rate limits and
cancellation on one stream.

The gateway runs in this process, with its Open Inference protos, which protobuf will not load
beside tritonclient.grpc's copy: tests/integration/test_stream_infer.py runs these in a pytest
process of their own.
"""

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
from gateway.model_service import GatewayModelService
from gateway.open_inference import OPEN_INFERENCE_SERVICE, OpenInferenceServicer, add_open_inference_to_server
from gateway.proxy import ROUTES, GatewayProxy
from gateway.rate_limit import RateLimiter, RateLimitInterceptor
from gateway.settings import GatewaySettings
from inference import open_inference_pb2 as oip
from inference import open_inference_pb2_grpc as oip_grpc
from shared.server import GrpcServer
from shared.settings import ServerSettings
from tests.integration.listed_models import SERVICE_NAME as MODEL_SERVICE
from tests.integration.test_gateway_proxy import SlowDense, cache_redis, register  # noqa: F401 - a fixture

KEYS = {"web": "web-key-123456"}


class CountingDense(SlowDense):
    """SlowDense that also knows how many of its calls are running now; inputs of 10 or more take 3 s more."""

    def __init__(self):
        super().__init__()
        self.running = 0

    async def Predict(self, request, context):
        self.running += 1
        try:
            if np.frombuffer(request.inputs["x"].data, "<f4")[0] >= 10:
                await asyncio.sleep(3)
            return await super().Predict(request, context)
        finally:
            self.running -= 1


def stream_tasks() -> list[asyncio.Task]:
    """The gateway's tasks for ModelStreamInfer streams (it runs on the test's event loop)."""
    return [t for t in asyncio.all_tasks() if "ModelStreamInfer" in t.get_coro().__qualname__]


@pytest.fixture
async def streaming_gateway(cache_redis, tmp_path):  # noqa: F811 - the imported fixture
    """A gateway whose Open Inference service forwards to a backend that takes 200 ms per call; tenant
    "web" may make 3 calls/s (burst 3)."""
    servicer = CountingDense()
    backend = GrpcServer(ServerSettings(port=0), lambda s: register(s, servicer),
                         ["maas.dense.v1.DenseService", MODEL_SERVICE])  # fmt: skip
    await backend.start()
    redis.Redis.from_url(cache_redis.url).flushall()
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": t, "sha256": hash_key(k)} for t, k in KEYS.items()]}))
    # Two hop slots per lane, so that two slow calls of one stream both reach the backend at once.
    settings = GatewaySettings(port=0, hop_max_in_flight=2)
    backends = {r.family: Backend(r.family, r.service, f"127.0.0.1:{backend.port}", 1 << 20) for r in ROUTES}
    catalog = ModelCatalog(backends, 60.0)
    proxy = GatewayProxy(backends, ResultCache(None, 1.0), catalog, settings)
    limiter_redis = aioredis.Redis.from_url(cache_redis.url)
    limiter = RateLimiter(limiter_redis, 3, 3, {})
    inference = OpenInferenceServicer(proxy, catalog, GatewayModelService(backends, catalog, proxy.timeout), limiter)
    server = GrpcServer(settings, lambda s: add_open_inference_to_server(inference, s), [OPEN_INFERENCE_SERVICE],
                        [AuthInterceptor(ApiKeys.from_file(keys)), RateLimitInterceptor(limiter)])  # fmt: skip
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel), servicer
    await server.server.stop(0)
    await backend.server.stop(0)
    await limiter_redis.aclose()


AUTH = (("authorization", f"Bearer {KEYS['web']}"),)


def infer(request_id: str, value: float = 0.0, timeout_us: int = 0) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(
        model_name="m", model_version="1", id=request_id,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[np.full((1, 4), value, "<f4").tobytes()],
    )  # fmt: skip
    if timeout_us:
        request.parameters["timeout"].int64_param = timeout_us
    return request


async def test_a_call_whose_timeout_is_shorter_than_the_work_alone_gets_deadline_exceeded(streaming_gateway):
    stub, _ = streaming_gateway
    requests = [infer("patient", 1.0), infer("hurried", 2.0, timeout_us=50_000)]
    responses = {r.infer_response.id: r async for r in stub.ModelStreamInfer(iter(requests), timeout=10,
                                                                             metadata=AUTH)}  # fmt: skip
    assert responses["hurried"].error_message.startswith("[StatusCode.DEADLINE_EXCEEDED]")
    assert responses["patient"].error_message == ""
    assert responses["patient"].infer_response.model_version == "1"


async def test_calls_over_the_tenants_rate_are_refused_one_by_one(streaming_gateway):
    stub, _ = streaming_gateway
    requests = [infer(f"call-{i}", float(i)) for i in range(6)]
    responses = [r async for r in stub.ModelStreamInfer(iter(requests), timeout=10, metadata=AUTH)]
    assert len(responses) == 6  # every call answered, and the stream ended cleanly
    refused = [r for r in responses if r.error_message]
    assert 0 < len(refused) < 6
    assert all(r.error_message.startswith("[StatusCode.RESOURCE_EXHAUSTED] rate limit of 3 requests/s for tenant "
                                          "'web' reached") for r in refused)  # fmt: skip


async def test_a_stream_the_client_cancels_stops_its_calls_and_the_gateway_serves_on(streaming_gateway):
    stub, backend = streaming_gateway
    await asyncio.sleep(1.1)  # a full bucket again

    async def requests():
        for i in range(2):
            yield infer(f"slow-{i}", 10.0 + i)  # 3.2 s of backend work each
        await asyncio.sleep(30)  # the client keeps the stream open, then gives up on it

    call = stub.ModelStreamInfer(requests(), timeout=30, metadata=AUTH)
    for _ in range(100):  # both calls reached the backend
        if backend.running == 2:
            break
        await asyncio.sleep(0.01)
    assert backend.running == 2 and len(stream_tasks()) == 3  # the reader and two calls
    call.cancel()
    for _ in range(100):
        if not stream_tasks() and not backend.running:
            break
        await asyncio.sleep(0.01)
    # The stream's calls are gone at once, and so are their backend calls, which nobody waits for any
    # more: the backend stops, long before it could have answered them.
    assert not stream_tasks() and backend.running == 0
    await asyncio.sleep(1.1)  # the bucket refills
    answer = [r async for r in stub.ModelStreamInfer(iter([infer("after", 5.0)]), timeout=10, metadata=AUTH)]
    assert answer[0].error_message == "" and answer[0].infer_response.id == "after"
