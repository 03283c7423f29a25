"""Dense Predicts that queue on the gateway → dense hop travel as one call, and each caller still
gets its own answer, error and deadline. The backend is a real gRPC server that holds its calls
until the test opens it, so the queue the test builds is the one the gateway sees."""

import asyncio

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.hop_batching import lane_key, merge, split
from gateway.proxy import ROUTES, GatewayProxy
from gateway.settings import GatewaySettings
from maas.common.v1 import tensor_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.models.v1 import models_pb2_grpc
from shared.errors import InvalidArgumentError
from shared.server import GrpcServer
from shared.settings import ServerSettings
from shared.tensors import from_numpy, to_numpy
from tests.integration.listed_models import SERVICE_NAME as MODEL_SERVICE
from tests.integration.listed_models import ListedModels


class RowsTimesTwo(dense_pb2_grpc.DenseServiceServicer):
    """y = 2x row by row. Refuses a negative value, as a model service refuses a bad input; model
    "single" takes one row per call, "summary" answers one row for any batch. Calls wait for `open`."""

    def __init__(self):
        self.open = asyncio.Event()
        self.calls: list[tuple[str, list[float]]] = []  # (model, first value of each row) per call

    async def Predict(self, request, context):
        try:
            x = to_numpy(request.inputs["x"], "inputs['x']")
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.calls.append((request.model_name, [float(v) for v in x[:, 0]]))
        await self.open.wait()
        if (x < 0).any():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "inputs['x']: values must be >= 0")
        if request.model_name == "single" and len(x) != 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "inputs['x']: batch size must be 1")
        y = x[:1].sum(keepdims=True) if request.model_name == "summary" else x * 2
        return dense_pb2.PredictResponse(model_name=request.model_name, model_version=1,
                                         outputs={"y": from_numpy(y.astype(np.float32))})  # fmt: skip


class WaitingListed(ListedModels):
    """Model "waits" is served by a batcher that waits for batch-mates (a queue delay), as the dense
    service reports it."""

    def model(self, name):
        model = super().model(name)
        if name == "waits":
            model.versions[0].max_queue_delay_us = 2000
        return model


async def stand_up(hop_batching=True, replicas=1):
    """The gateway in front of `replicas` backend servers, which share one servicer (one list of calls)."""
    backend_servicer = RowsTimesTwo()

    def register(server):
        dense_pb2_grpc.add_DenseServiceServicer_to_server(backend_servicer, server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(WaitingListed("dense", "m", "other", "single", "summary",
                                                                          "waits"), server)  # fmt: skip

    servers = [GrpcServer(ServerSettings(port=0), register, ["maas.dense.v1.DenseService", MODEL_SERVICE])
               for _ in range(replicas)]  # fmt: skip
    for backend in servers:
        await backend.start()
    addresses = [f"127.0.0.1:{backend.port}" for backend in servers]
    # One replica by its DNS-style name, several as a static list (as LocalCluster names them).
    target = addresses[0] if replicas == 1 else "ipv4:" + ",".join(addresses)
    settings = GatewaySettings(port=0, redis_url=None, hop_batching=hop_batching, hop_max_in_flight=1)
    backends = {r.family: Backend(r.family, r.service, target, 1 << 20) for r in ROUTES}
    proxy = GatewayProxy(backends, ResultCache(None, 1.0), ModelCatalog(backends, 60.0), settings)
    server = GrpcServer(settings, lambda s: s.add_generic_rpc_handlers(proxy.handlers()), [r.service for r in ROUTES])
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return dense_pb2_grpc.DenseServiceStub(channel), backend_servicer, proxy, (channel, server, *servers)


async def tear_down(channel, *servers):
    await channel.close()
    for server in servers:
        await server.server.stop(0)


@pytest.fixture
async def gateway():
    stub, backend, proxy, running = await stand_up()
    yield stub, backend, proxy
    await tear_down(*running)


def request(*firsts: float, model="m") -> dense_pb2.PredictRequest:
    """One row per value: [v, v + 0.5]."""
    x = np.array([[v, v + 0.5] for v in firsts], np.float32)
    return dense_pb2.PredictRequest(model_name=model, model_version=1, inputs={"x": from_numpy(x)})


async def until(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def queued(proxy) -> int:
    return sum(len(lane.queue) for lane in proxy._hop._lanes.values())


def rows_of(reply) -> list[list[float]]:
    return to_numpy(reply.outputs["y"], "y").tolist()


async def hold_one_call(stub, backend, proxy):
    """Sends a call the backend holds: the lane's one slot is busy, so what follows queues."""
    first = asyncio.ensure_future(stub.Predict(request(100), timeout=30))
    await until(lambda: len(backend.calls) == 1, "the first call reached the backend")
    return first


def batch_sizes(family="dense") -> tuple[float, float]:
    count = REGISTRY.get_sample_value("maas_gateway_hop_batch_requests_count", {"family": family}) or 0.0
    total = REGISTRY.get_sample_value("maas_gateway_hop_batch_requests_sum", {"family": family}) or 0.0
    return count, total


async def test_queued_requests_travel_as_one_call_and_each_caller_gets_its_rows(gateway):
    stub, backend, proxy = gateway
    calls_before, requests_before = batch_sizes()
    first = await hold_one_call(stub, backend, proxy)
    others = [asyncio.ensure_future(stub.Predict(r, timeout=30)) for r in (request(1), request(2, 3), request(4))]
    other_model = asyncio.ensure_future(stub.Predict(request(9, model="other"), timeout=30))
    await until(lambda: queued(proxy) == 3 and len(backend.calls) == 2, "three queued, the other model's call sent")
    backend.open.set()
    replies = await asyncio.gather(*others)
    assert rows_of(await first) == [[200, 201]]
    assert [rows_of(r) for r in replies] == [[[2, 3]], [[4, 5], [6, 7]], [[8, 9]]]
    assert rows_of(await other_model) == [[18, 19]]
    # One merged call for the queued three, in arrival order; the other model never joins their lane.
    assert backend.calls == [("m", [100]), ("other", [9]), ("m", [1, 2, 3, 4])]
    calls, requests = batch_sizes()
    assert (calls - calls_before, requests - requests_before) == (3, 5)


async def test_a_caller_whose_deadline_passes_in_the_queue_fails_alone_and_is_never_sent(gateway):
    stub, backend, proxy = gateway
    first = await hold_one_call(stub, backend, proxy)
    hurried = asyncio.ensure_future(stub.Predict(request(1), timeout=0.5))
    patient = asyncio.ensure_future(stub.Predict(request(2), timeout=30))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hurried
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    backend.open.set()
    assert rows_of(await patient) == [[4, 5]]
    await first
    assert backend.calls == [("m", [100]), ("m", [2])]


async def test_a_caller_that_goes_away_while_queued_is_never_sent(gateway):
    stub, backend, proxy = gateway
    first = await hold_one_call(stub, backend, proxy)
    gone = stub.Predict(request(1), timeout=30)
    staying = asyncio.ensure_future(stub.Predict(request(2), timeout=30))
    await until(lambda: queued(proxy) == 2, "both queued")
    gone.cancel()
    await until(lambda: any(w.future.done() for lane in proxy._hop._lanes.values() for w in lane.queue),
                "the gateway saw the caller go")  # fmt: skip
    backend.open.set()
    assert rows_of(await staying) == [[4, 5]]
    await first
    assert backend.calls == [("m", [100]), ("m", [2])]


async def test_one_bad_request_in_a_merged_call_fails_only_its_caller(gateway):
    stub, backend, proxy = gateway
    retries = REGISTRY.get_sample_value("maas_gateway_hop_batch_retries_total", {"family": "dense"}) or 0.0
    first = await hold_one_call(stub, backend, proxy)
    good, bad, also_good = (asyncio.ensure_future(stub.Predict(request(v), timeout=30)) for v in (1, -1, 3))
    await until(lambda: queued(proxy) == 3, "three queued")
    backend.open.set()
    assert rows_of(await good) == [[2, 3]] and rows_of(await also_good) == [[6, 7]]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bad
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "inputs['x']: values must be >= 0"  # the service's own words
    await first
    assert backend.calls[1] == ("m", [1, -1, 3])  # refused as a whole, then each request alone
    assert sorted(backend.calls[2:]) == [("m", [-1]), ("m", [1]), ("m", [3])]
    assert REGISTRY.get_sample_value("maas_gateway_hop_batch_retries_total", {"family": "dense"}) == retries + 1
    # A request was at fault, not the merge: the lane still merges.
    assert lane_key(request(1)) not in proxy._hop._alone_until


async def test_a_model_that_refuses_merged_calls_gets_its_requests_alone(gateway):
    stub, backend, proxy = gateway
    for model in ("single", "summary"):  # refuses a batch of two; answers one row for any batch
        backend.open.clear()
        backend.calls.clear()
        first = asyncio.ensure_future(stub.Predict(request(100, model=model), timeout=30))
        await until(lambda: len(backend.calls) == 1, "the first call reached the backend")
        pair = [asyncio.ensure_future(stub.Predict(request(v, model=model), timeout=30)) for v in (1, 2)]
        await until(lambda: queued(proxy) == 2, "two queued")
        backend.open.set()
        replies = await asyncio.gather(first, *pair)
        expected = [[[200, 201]], [[2, 3]], [[4, 5]]] if model == "single" else [[[200.5]], [[2.5]], [[4.5]]]
        assert [rows_of(r) for r in replies] == expected
        assert backend.calls[1] == (model, [1, 2])  # tried once merged
        # Every request was answered alone, so the lane stops merging: the next calls go straight out.
        backend.open.clear()
        backend.calls.clear()
        later = [asyncio.ensure_future(stub.Predict(request(v, model=model), timeout=30)) for v in (5, 6, 7)]
        await until(lambda: len(backend.calls) == 3, "all three sent at once")
        assert queued(proxy) == 0
        backend.open.set()
        await asyncio.gather(*later)
        assert sorted(backend.calls) == [(model, [5]), (model, [6]), (model, [7])]


async def test_a_request_the_gateway_cannot_merge_goes_alone_and_gets_the_services_answer(gateway):
    stub, backend, proxy = gateway
    first = await hold_one_call(stub, backend, proxy)
    short = dense_pb2.PredictRequest(model_name="m", model_version=1, inputs={
        "x": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FP32, shape=[1, 2], data=b"\0" * 7)})  # fmt: skip
    assert lane_key(short) is None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(short, timeout=30)  # not queued behind the held call: it goes at once
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("inputs['x']:")
    backend.open.set()
    await first


async def test_a_version_whose_batcher_waits_gets_every_request_alone(gateway):
    stub, backend, proxy = gateway
    calls = [asyncio.ensure_future(stub.Predict(request(v, model="waits"), timeout=30)) for v in (1, 2, 3)]
    await until(lambda: len(backend.calls) == 3, "three calls sent at once")  # none waits for a slot here
    assert queued(proxy) == 0
    backend.open.set()
    assert [rows_of(r) for r in await asyncio.gather(*calls)] == [[[2, 3]], [[4, 5]], [[6, 7]]]


async def test_without_hop_batching_every_request_is_its_own_call():
    stub, backend, proxy, running = await stand_up(hop_batching=False)
    try:
        calls = [asyncio.ensure_future(stub.Predict(request(v), timeout=30)) for v in (1, 2, 3)]
        await until(lambda: len(backend.calls) == 3, "three calls sent at once")
        backend.open.set()
        assert [rows_of(r) for r in await asyncio.gather(*calls)] == [[[2, 3]], [[4, 5]], [[6, 7]]]
        assert proxy._hop is None
    finally:
        await tear_down(*running)


async def test_a_lane_keeps_a_call_in_flight_to_every_replica():
    """One call in flight per replica (MAAS_GATEWAY_HOP_MAX_IN_FLIGHT=1): with two replicas listed, two
    requests go out alone at once, and only the third queues, to leave with the next free slot."""
    stub, backend, proxy, running = await stand_up(replicas=2)
    try:
        assert proxy._hop.backend.replica_count() == 2
        calls = [asyncio.ensure_future(stub.Predict(request(v), timeout=30)) for v in (1, 2)]
        await until(lambda: len(backend.calls) == 2, "both requests sent, one per replica")
        third = asyncio.ensure_future(stub.Predict(request(3), timeout=30))
        await until(lambda: queued(proxy) == 1, "the third request queued")
        assert len(backend.calls) == 2
        backend.open.set()
        assert [rows_of(r) for r in await asyncio.gather(*calls, third)] == [[[2, 3]], [[4, 5]], [[6, 7]]]
        assert sorted(backend.calls) == [("m", [1]), ("m", [2]), ("m", [3])]
    finally:
        await tear_down(*running)


def test_merge_and_split_keep_each_requests_rows_and_every_input():
    parts = []
    for rows in (1, 3, 2):
        x = np.arange(rows * 4, dtype=np.int64).reshape(rows, 2, 2) + rows * 100
        mask = np.full((rows, 3), rows, np.uint8)
        parts.append(dense_pb2.PredictRequest(model_name="m", model_version=2, output_names=["y"],
                                              inputs={"x": from_numpy(x), "mask": from_numpy(mask)}))  # fmt: skip
    assert len({lane_key(p) for p in parts}) == 1
    merged = dense_pb2.PredictRequest.FromString(merge(parts))
    assert (merged.model_name, merged.model_version, list(merged.output_names)) == ("m", 2, ["y"])
    for name in ("x", "mask"):
        stacked = np.concatenate([to_numpy(p.inputs[name], name) for p in parts])
        np.testing.assert_array_equal(to_numpy(merged.inputs[name], name), stacked)
    y = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    response = dense_pb2.PredictResponse(model_name="m", model_version=2, outputs={"y": from_numpy(y)})
    cut = [dense_pb2.PredictResponse.FromString(b) for b in split(response.SerializeToString(), [1, 3, 2])]
    np.testing.assert_array_equal(np.concatenate([to_numpy(c.outputs["y"], "y") for c in cut]), y)
    assert [to_numpy(c.outputs["y"], "y").shape for c in cut] == [(1, 5), (3, 5), (2, 5)]
    assert {(c.model_name, c.model_version) for c in cut} == {("m", 2)}
    with pytest.raises(ValueError, match="not batched over 6 rows"):
        split(dense_pb2.PredictResponse(outputs={"y": from_numpy(y[:1])}).SerializeToString(), [1, 3, 2])


def test_requests_that_differ_in_what_they_ask_never_share_a_lane():
    base = request(1)
    assert lane_key(base) == lane_key(request(2, 3))  # rows differ: one lane
    wider = dense_pb2.PredictRequest(model_name="m", model_version=1,
                                     inputs={"x": from_numpy(np.zeros((1, 3), np.float32))})  # fmt: skip
    as_float64 = dense_pb2.PredictRequest(model_name="m", model_version=1,
                                          inputs={"x": from_numpy(np.zeros((1, 2), np.float64))})  # fmt: skip
    other_version = request(1)
    other_version.model_version = 2
    other_outputs = request(1)
    other_outputs.output_names.append("y")
    keys = {lane_key(r) for r in (base, wider, as_float64, other_version, other_outputs, request(1, model="other"))}
    assert len(keys) == 6
    one_row, two_rows = np.zeros((1, 2), np.float32), np.zeros((2, 2), np.float32)
    ragged = dense_pb2.PredictRequest(model_name="m", inputs={"a": from_numpy(one_row), "b": from_numpy(two_rows)})
    strings = dense_pb2.PredictRequest(model_name="m", inputs={
        "s": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_STRING, shape=[1], data=b"a")})  # fmt: skip
    assert lane_key(ragged) is None and lane_key(strings) is None and lane_key(dense_pb2.PredictRequest()) is None
