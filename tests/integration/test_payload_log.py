"""Payload records: what goes into one (decoded tensors, masked columns null, texts redacted), and that
a Redis that refuses them costs the calls nothing."""

import asyncio

import grpc
import numpy as np
from prometheus_client import REGISTRY

from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.payloads import message_json, payload_share, sampled
from gateway.proxy import ROUTES, GatewayProxy
from gateway.settings import GatewaySettings
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2
from shared.server import GrpcServer
from shared.settings import ServerSettings
from shared.tensors import from_numpy
from shared.workers import free_port
from tests.integration.listed_models import SERVICE_NAME as MODEL_SERVICE
from tests.integration.listed_models import add_listed_models


def test_a_record_decodes_tensors_nulls_masked_columns_and_redacts_texts():
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    request = dense_pb2.PredictRequest(model_name="m", model_version=3, output_names=["label"],
                                       inputs={"x": from_numpy(x)})  # fmt: skip
    record = message_json(request, frozenset({1, 4}))
    assert record["model_name"] == "m" and record["model_version"] == 3 and record["output_names"] == ["label"]
    assert record["inputs"]["x"] == {"datatype": "FP32", "shape": [2, 6], "data": [
        [0.0, None, 2.0, 3.0, None, 5.0], [6.0, None, 8.0, 9.0, None, 11.0]]}  # fmt: skip
    texts = message_json(nlp_pb2.PredictRequest(model_name="s", texts=["call +44 20 7946 0958 or a.b@c.org"]))
    assert texts["texts"] == ["call [PHONE] or [EMAIL]"]
    # Nested messages and integer tensors (a gnn query on an inline graph).
    graph = gnn_pb2.Graph(edge_index=from_numpy(np.array([[0, 1], [1, 0]], np.int64)))
    nested = message_json(gnn_pb2.PredictRequest(model_name="g", graph=graph, node_ids=[0, 1]))
    assert nested["graph"]["edge_index"]["data"] == [[0, 1], [1, 0]] and nested["node_ids"] == [0, 1]
    # A huge tensor: its datatype and shape only.
    huge = from_numpy(np.zeros((300, 300), np.uint8))
    big = message_json(dense_pb2.PredictRequest(model_name="m", inputs={"x": huge}))
    assert big["inputs"]["x"] == {"datatype": "UINT8", "shape": [300, 300], "data_omitted": "90000 elements"}


def test_sampling_is_a_pure_function_of_the_request_id():
    ids = [f"id-{i}" for i in range(2000)]
    chosen = [i for i in ids if sampled(0.1, i)]
    assert chosen == [i for i in ids if sampled(0.1, i)]  # the same every time, in every process
    assert 140 <= len(chosen) <= 260
    assert all(sampled(1.0, i) for i in ids[:50]) and not any(sampled(0.0, i) for i in ids[:50])
    assert 0.0 <= min(map(payload_share, ids)) and max(map(payload_share, ids)) < 1.0


class Echo(dense_pb2_grpc.DenseServiceServicer):
    async def Predict(self, request, context):
        return dense_pb2.PredictResponse(model_name=request.model_name, model_version=1,
                                         outputs={"y": request.inputs["x"]})  # fmt: skip


async def test_a_redis_that_refuses_records_costs_the_calls_nothing():
    def register(server):
        dense_pb2_grpc.add_DenseServiceServicer_to_server(Echo(), server)
        add_listed_models(server, "dense", "m")

    backend = GrpcServer(ServerSettings(port=0), register, ["maas.dense.v1.DenseService", MODEL_SERVICE])
    await backend.start()
    # Nothing listens on this port: every write fails.
    settings = GatewaySettings(port=0, redis_url=None, queue_redis_url=f"redis://127.0.0.1:{free_port()}",
                               payload_logging={"*": 1.0})  # fmt: skip
    backends = {r.family: Backend(r.family, r.service, f"127.0.0.1:{backend.port}", 1 << 20) for r in ROUTES}
    proxy = GatewayProxy(backends, ResultCache(None, 1.0), ModelCatalog(backends, 60.0), settings)
    server = GrpcServer(settings, lambda s: s.add_generic_rpc_handlers(proxy.handlers()), [r.service for r in ROUTES])
    await server.start()
    before = REGISTRY.get_sample_value("maas_gateway_payload_records_total", {"model": "m", "outcome": "error"}) or 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = dense_pb2_grpc.DenseServiceStub(channel)
            for value in range(5):
                x = from_numpy(np.full((1, 2), value, np.float32))
                reply = await stub.Predict(dense_pb2.PredictRequest(model_name="m", inputs={"x": x}), timeout=10)
                assert reply.outputs["y"] == x
        for _ in range(500):
            errors = REGISTRY.get_sample_value("maas_gateway_payload_records_total", {"model": "m", "outcome": "error"})
            if (errors or 0) > before:
                break
            await asyncio.sleep(0.02)
        assert (errors or 0) > before  # counted, not raised
    finally:
        await proxy.close()
        await server.server.stop(0)
        await backend.server.stop(0)
