"""Payload logging in a cluster of its own with API keys: sampled records of calls over gRPC, Open
Inference and REST, as CloudEvents in Redis Streams, per tenant, with masked columns and texts kept
out, and nothing for a model that opts out."""

from __future__ import annotations

import json
import time
from http.client import HTTPConnection

import grpc
import numpy as np
import pytest
import redis
from tritonclient.grpc import service_pb2 as oip  # the same wire protocol; one copy of it per process
from tritonclient.grpc import service_pb2_grpc

from gateway.auth import hash_key
from gateway.payloads import payload_share
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from shared.cluster import ClusterPorts, LocalCluster
from shared.model_store import ModelStore
from shared.tensors import from_numpy
from tests.e2e.test_tenants import KEYS, ROLES, key
from tests.stores import copy_store

RATES = {"digits-mlp": 1.0, "sentiment": 0.5, "quiet-mlp": 1.0, "masked-mlp": 1.0}
MASKED = [0, 5]


@pytest.fixture(scope="module")
def logged(model_store, tmp_path_factory):
    """(cluster, channel): payload logging at RATES; quiet-mlp opts out in its manifest, and masked-mlp's
    manifest records feature columns 0 and 5 as masked, as a training job with mask_columns writes it."""
    var = tmp_path_factory.mktemp("payloads")
    store = copy_store(model_store, ModelStore(var / "models"))
    source = model_store.manifest("digits-mlp", 1)
    artifacts = model_store.artifacts(source).check_all()
    record = source.model_dump(exclude={"version", "files", "size_bytes", "created_at", "encryption"})
    for name, config in (("quiet-mlp", {"payload_logging": False}),
                         ("masked-mlp", {"torch_form": {"masked": MASKED}})):  # fmt: skip
        store.publish({**record, "name": name, "config": {**record["config"], **config}},
                      {file: artifacts.read(file) for file in source.files})  # fmt: skip
    keys = var / "api-keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": t, "sha256": hash_key(k), "roles": ROLES.get(t, [])}
                                         for t, k in KEYS.items()]}))  # fmt: skip
    env = {"MAAS_GATEWAY_API_KEYS_FILE": str(keys), "MAAS_GATEWAY_PAYLOAD_LOGGING": json.dumps(RATES)}
    cluster = LocalCluster(ClusterPorts.free(), var / "models", var, log_dir=var / "logs", extra_env=env)
    try:
        cluster.start()
        # One connection: one gateway worker writes every record, in order.
        with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
            yield cluster, channel
    finally:
        cluster.stop()


def metadata(tenant: str, request_id: str):
    return (*key(tenant), ("x-request-id", request_id))


def predict(channel, tenant: str, request_id: str, model: str = "digits-mlp", value: float = 3.0):
    request = dense_pb2.PredictRequest(model_name=model,
                                       inputs={"pixels": from_numpy(np.full((1, 64), value, np.float32))})  # fmt: skip
    return dense_pb2_grpc.DenseServiceStub(channel).Predict(request, timeout=30, metadata=metadata(tenant, request_id))


def read(channel, tenant: str, model: str = "digits-mlp", of: str = "", after: str = "", limit: int = 0):
    request = gateway_pb2.ReadPayloadsRequest(model_name=model, tenant=of, after=after, limit=limit)
    return gateway_pb2_grpc.GatewayServiceStub(channel).ReadPayloads(request, timeout=10, metadata=key(tenant))


def events(channel, tenant: str, model: str = "digits-mlp", of: str = "") -> list[dict]:
    return [json.loads(r.cloud_event) for r in read(channel, tenant, model, of, limit=1000).records]


def wait_for_ids(channel, tenant: str, ids: set[str], model: str = "digits-mlp") -> list[dict]:
    deadline = time.monotonic() + 30
    while True:
        found = events(channel, tenant, model)
        if ids <= {e["id"] for e in found}:
            return found
        assert time.monotonic() < deadline, f"records {ids - {e['id'] for e in found}} never appeared"
        time.sleep(0.1)


def rest_infer(cluster, tenant: str, request_id: str) -> dict:
    body = {"id": request_id, "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [2.0] * 64}]}
    connection = HTTPConnection("127.0.0.1", cluster.ports.gateway_http, timeout=30)
    try:
        connection.request("POST", "/v2/models/digits-mlp/infer", json.dumps(body),
                           {"content-type": "application/json", "authorization": f"Bearer {KEYS[tenant]}"})  # fmt: skip
        response = connection.getresponse()
        reply = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 200, reply
    return reply


def test_calls_on_every_front_are_recorded_as_cloud_events_of_their_tenant(logged):
    cluster, channel = logged
    predict(channel, "alpha", "native-1")
    tensor = oip.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])
    infer = oip.ModelInferRequest(model_name="digits-mlp", id="oip-1", inputs=[tensor],
                                  raw_input_contents=[np.full((1, 64), 1.0, np.float32).tobytes()])  # fmt: skip
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for _ in range(2):  # a miss, then a hit: both are calls, both recorded
        stub.ModelInfer(infer, timeout=30, metadata=key("alpha"))
    rest_infer(cluster, "alpha", "rest-1")

    found = wait_for_ids(channel, "alpha", {"native-1", "oip-1", "rest-1"})
    by_id = {}
    for event in found:
        by_id.setdefault(event["id"], []).append(event)
    assert len(by_id["oip-1"]) == 2
    assert {by_id[i][0]["maasprotocol"] for i in ("native-1", "oip-1", "rest-1")} == {"grpc", "open-inference",
                                                                                       "rest"}  # fmt: skip
    native = by_id["native-1"][0]
    assert (native["specversion"], native["type"], native["source"]) == ("1.0", "dev.maas.inference.payload.v1",
                                                                          "maas/gateway")  # fmt: skip
    assert (native["subject"], native["maasmodel"], native["maasversion"], native["maastenant"]) == (
        "digits-mlp", "digits-mlp", "1", "alpha")  # fmt: skip
    pixels = native["data"]["request"]["inputs"]["pixels"]
    assert (pixels["datatype"], pixels["shape"], pixels["data"]) == ("FP32", [1, 64], [[3.0] * 64])
    outputs = native["data"]["response"]["outputs"]
    assert outputs["label"]["shape"] == [1] and len(outputs["probabilities"]["data"][0]) == 10
    for event in by_id["oip-1"] + by_id["rest-1"]:  # the same record, whichever front and cache outcome
        assert event["data"]["request"]["inputs"]["pixels"]["shape"] == [1, 64]
        assert event["data"]["response"]["outputs"]["label"]["shape"] == [1]
        assert event["data"]["response"]["model_version"] == 1


def test_a_tenant_reads_only_its_own_records_and_an_admin_any(logged):
    _, channel = logged
    predict(channel, "alpha", "alpha-own")
    predict(channel, "beta", "beta-own")
    wait_for_ids(channel, "beta", {"beta-own"})
    assert "alpha-own" in {e["id"] for e in wait_for_ids(channel, "alpha", {"alpha-own"})}
    assert {e["maastenant"] for e in events(channel, "beta")} == {"beta"}
    with pytest.raises(grpc.RpcError) as err:
        read(channel, "beta", of="alpha")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin role" in err.value.details()
    assert "alpha-own" in {e["id"] for e in events(channel, "ops", of="alpha")}
    # A cursor reads on from where the last page ended.
    first = read(channel, "alpha", limit=1)
    rest = read(channel, "alpha", after=first.next, limit=1000)
    assert first.records[0].id not in {r.id for r in rest.records} and rest.records


def test_sampling_follows_the_request_id_and_texts_are_redacted(logged):
    _, channel = logged
    stub = nlp_pb2_grpc.NlpServiceStub(channel)
    ids = [f"sample-{i}" for i in range(40)]
    for i, request_id in enumerate(ids):
        request = nlp_pb2.PredictRequest(model_name="sentiment", texts=[f"call {i}: write to me@example.com"])
        stub.Predict(request, timeout=30, metadata=metadata("alpha", request_id))
    expected = {i for i in ids if payload_share(i) < RATES["sentiment"]}
    assert 0 < len(expected) < len(ids)
    predict(channel, "alpha", "after-sampling")  # written after the sentiment records, by the same writer
    wait_for_ids(channel, "alpha", {"after-sampling"})
    recorded = events(channel, "alpha", "sentiment")
    assert {e["id"] for e in recorded} == expected
    texts = [text for e in recorded for text in e["data"]["request"]["texts"]]
    assert texts and all(text.endswith("write to [EMAIL]") for text in texts)


def test_records_at_rest_are_sealed_under_the_tenants_key(logged):
    cluster, channel = logged
    predict(channel, "alpha", "sealed-1", value=11.0)
    wait_for_ids(channel, "alpha", {"sealed-1"})
    client = redis.Redis.from_url(cluster.queue_redis_url)
    entries = client.xrange("maas:v1:payloads:alpha:digits-mlp")
    assert entries and all(set(fields) == {b"sealed"} for _, fields in entries)
    raw = b"".join(fields[b"sealed"] for _, fields in entries)
    assert b"sealed-1" not in raw and b"digits-mlp" not in raw and b"alpha" not in raw  # nothing readable
    # Moved into another tenant's stream, a record does not open: it is bound to its own.
    client.xadd("maas:v1:payloads:beta:digits-mlp", {"sealed": entries[-1][1][b"sealed"]})
    with pytest.raises(grpc.RpcError) as err:
        read(channel, "beta")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.delete("maas:v1:payloads:beta:digits-mlp")


def test_masked_columns_are_null_and_a_model_that_opts_out_is_never_recorded(logged):
    _, channel = logged
    predict(channel, "alpha", "masked-1", model="masked-mlp", value=7.0)
    predict(channel, "alpha", "quiet-1", model="quiet-mlp")
    predict(channel, "alpha", "after-quiet")
    wait_for_ids(channel, "alpha", {"after-quiet"})
    (masked,) = wait_for_ids(channel, "alpha", {"masked-1"}, model="masked-mlp")
    row = masked["data"]["request"]["inputs"]["pixels"]["data"][0]
    assert [row[i] for i in MASKED] == [None, None]
    assert all(value == 7.0 for i, value in enumerate(row) if i not in MASKED)
    assert events(channel, "alpha", "quiet-mlp") == []


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"model_name": "digits-mlp", "limit": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "limit: 5000"),
        ({"model_name": "digits-mlp", "after": "yesterday"}, grpc.StatusCode.INVALID_ARGUMENT, "not a cursor"),
        ({"model_name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model_name: required"),
        ({"model_name": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
    ],
)
def test_bad_reads_are_refused_with_the_field_named(logged, request_fields, code, words):
    _, channel = logged
    with pytest.raises(grpc.RpcError) as err:
        gateway_pb2_grpc.GatewayServiceStub(channel).ReadPayloads(gateway_pb2.ReadPayloadsRequest(**request_fields),
                                                                  timeout=10, metadata=key("alpha"))  # fmt: skip
    assert err.value.code() == code and words in err.value.details()

