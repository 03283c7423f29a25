"""Canary and shadow traffic in a running cluster: a share of a model's default traffic goes to a
candidate version, split by request id on every front, counted per arm, and ended by promotion; a
shadow version gets copies, compared with the default's answers, and never answers a caller."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from http.client import HTTPConnection
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as oip  # the same wire protocol; one copy of it per process
from tritonclient.grpc import service_pb2_grpc

from gateway.canary import share
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from shared.model_store import ModelStore
from shared.tensors import from_numpy

MODEL = "canary-mlp"  # its own model: the other tests' defaults never move


def publish_two_versions(cluster, channel, name: str) -> models_pb2_grpc.ModelServiceStub:
    """`name` v1 and v2 (both digits-mlp v1's artifacts) in the cluster's store, loaded, v1 the pinned default."""
    store = ModelStore(Path(cluster.specs["dense"].env["MAAS_DENSE_MODEL_STORE"]))
    source = store.manifest("digits-mlp", 1)
    record = {**source.model_dump(exclude={"version", "files", "size_bytes", "created_at", "encryption"}),
              "name": name}  # fmt: skip
    artifacts = store.artifacts(source).check_all()
    for _ in range(2):
        store.publish(record, {file: artifacts.read(file) for file in source.files})
    models = models_pb2_grpc.ModelServiceStub(channel)
    for version in (1, 2):
        models.LoadModel(models_pb2.LoadModelRequest(model_name=name, model_version=version), timeout=60)
    models.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name=name, model_version=1), timeout=10)
    return models


@pytest.fixture(scope="module")
def two_versions(cluster, gateway_channel):
    return publish_two_versions(cluster, gateway_channel, MODEL)


def predict(channel, request_id: str, model: str = MODEL, value: float = 1.0) -> int:
    pixels = from_numpy(np.full((1, 64), value, np.float32))
    request = dense_pb2.PredictRequest(model_name=model, inputs={"pixels": pixels})
    reply = dense_pb2_grpc.DenseServiceStub(channel).Predict(request, timeout=10,
                                                             metadata=(("x-request-id", request_id),))  # fmt: skip
    return reply.model_version


def infer(channel, request_id: str) -> int:
    tensor = oip.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])
    request = oip.ModelInferRequest(model_name=MODEL, id=request_id, inputs=[tensor],
                                    raw_input_contents=[np.ones((1, 64), np.float32).tobytes()])  # fmt: skip
    return int(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10).model_version)


def rest(cluster, request_id: str) -> int:
    """Over KServe v2 REST, the id in the body: the version that answered."""
    body = {"id": request_id, "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
    connection = HTTPConnection("127.0.0.1", cluster.ports.gateway_http, timeout=30)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        reply = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 200, reply
    assert reply["id"] == request_id
    return int(reply["model_version"])


def ids_in(low: int, high: int, count: int) -> list[str]:
    """Request ids whose share falls in [low, high)."""
    ids = []
    while len(ids) < count:
        candidate = uuid.uuid4().hex
        if low <= share(candidate) < high:
            ids.append(candidate)
    return ids


def wait_for_split(cluster, percent: int) -> None:
    """Until the gateway workers split as the model says: four fresh connections in a row (each may
    reach either worker) send the candidate's ids to v2 and the others to v1."""
    candidate_ids, default_ids = ids_in(0, percent, 4), ids_in(percent, 100, 4)
    deadline, agreed = time.monotonic() + 30, 0
    while agreed < 4:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(cluster.specs["gateway"].target, options=options) as channel:
            versions = [predict(channel, i) for i in candidate_ids], [predict(channel, i) for i in default_ids]
        agreed = agreed + 1 if versions == ([2] * 4, [1] * 4) else 0
        assert time.monotonic() < deadline, f"the gateway does not split {percent}%: {versions}"


def gateway_samples(cluster, name: str) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.ports.gateway_metrics}/metrics", timeout=5).read()
    return [s for family in text_string_to_metric_families(text.decode()) for s in family.samples if s.name == name]


def test_a_ten_percent_canary_takes_ten_percent_and_an_id_always_lands_on_one_version(
    cluster, gateway_channel, two_versions
):
    model = two_versions.SetCanary(models_pb2.SetCanaryRequest(model_name=MODEL, model_version=2, percent=10),
                                   timeout=10).model  # fmt: skip
    assert (model.default_version, model.canary.model_version, model.canary.percent) == (1, 2, 10)
    wait_for_split(cluster, 10)

    versions = [predict(gateway_channel, uuid.uuid4().hex) for _ in range(2000)]
    assert set(versions) == {1, 2}
    assert 0.07 <= versions.count(2) / 2000 <= 0.13, f"{versions.count(2)} of 2000 calls went to the candidate"

    # The same id, the same version: again and again, natively, over Open Inference and REST.
    for request_id in [*ids_in(0, 10, 10), *ids_in(10, 100, 10)]:
        expected = 2 if share(request_id) < 10 else 1
        assert {predict(gateway_channel, request_id) for _ in range(3)} == {expected}
        assert {infer(gateway_channel, request_id) for _ in range(3)} == {expected}
        assert {rest(cluster, request_id) for _ in range(2)} == {expected}
    # A call naming a version is never split.
    request = dense_pb2.PredictRequest(model_name=MODEL, model_version=1,
                                       inputs={"pixels": from_numpy(np.ones((1, 64), np.float32))})  # fmt: skip
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    for request_id in ids_in(0, 10, 5):
        assert stub.Predict(request, timeout=10, metadata=(("x-request-id", request_id),)).model_version == 1

    # Each arm is counted, by the version that answered, with its labels.
    counted = {(s.labels["arm"], s.labels["version"]): s.value
               for s in gateway_samples(cluster, "maas_gateway_canary_requests_total")
               if s.labels["model"] == MODEL and s.labels["code"] == "OK"}  # fmt: skip
    assert counted[("candidate", "2")] >= versions.count(2) and counted[("default", "1")] >= versions.count(1)
    labels = {s.labels["arm"] for s in gateway_samples(cluster, "maas_gateway_canary_labels_total")
              if s.labels["model"] == MODEL and s.value > 0}  # fmt: skip
    assert labels == {"default", "candidate"}

    # Promotion ends the split: the new default takes every call.
    model = two_versions.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name=MODEL, model_version=2),
                                           timeout=10).model  # fmt: skip
    assert model.default_version == 2 and not model.HasField("canary")
    deadline = time.monotonic() + 30
    while {predict(gateway_channel, i) for i in ids_in(10, 100, 8)} != {2}:
        assert time.monotonic() < deadline, "the promoted version does not take the default traffic"
        time.sleep(0.2)
    two_versions.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name=MODEL, model_version=1), timeout=10)


@pytest.mark.parametrize(
    ("version", "percent", "code", "words"),
    [
        (2, 100, grpc.StatusCode.INVALID_ARGUMENT, "percent: must be 1 to 99"),
        (1, 10, grpc.StatusCode.INVALID_ARGUMENT, "already the default"),
        (9, 10, grpc.StatusCode.NOT_FOUND, "has no version 9"),
    ],
)
def test_a_canary_that_cannot_be_is_refused(two_versions, version, percent, code, words):
    with pytest.raises(grpc.RpcError) as err:
        two_versions.SetCanary(models_pb2.SetCanaryRequest(model_name=MODEL, model_version=version, percent=percent),
                               timeout=10)  # fmt: skip
    assert err.value.code() == code and words in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        two_versions.SetCanary(models_pb2.SetCanaryRequest(model_name="no-such-model", model_version=1, percent=10),
                               timeout=10)  # fmt: skip
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def shadow_counts(cluster, name: str, key: str) -> dict[str, float]:
    return {s.labels[key]: s.value for s in gateway_samples(cluster, name)
            if s.labels["model"] == MODEL and s.labels["version"] == "2"}  # fmt: skip


def test_a_shadow_gets_copies_compared_with_the_default_and_ends_when_promoted(cluster, gateway_channel, two_versions):
    model = two_versions.SetShadow(models_pb2.SetShadowRequest(model_name=MODEL, model_version=2, percent=100),
                                   timeout=10).model  # fmt: skip
    assert (model.default_version, model.shadow.model_version, model.shadow.percent) == (1, 2, 100)
    before = shadow_counts(cluster, "maas_gateway_shadow_rows_total", "outcome")
    deadline = time.monotonic() + 30
    rng = np.random.default_rng(7)
    while True:  # every call is answered by the default; its copies reach the shadow, which agrees
        # Distinct inputs: a cache hit is not copied (the default did not compute it).
        assert {predict(gateway_channel, uuid.uuid4().hex, value=rng.uniform(0, 16)) for _ in range(10)} == {1}
        agreed = shadow_counts(cluster, "maas_gateway_shadow_rows_total", "outcome").get("agree", 0)
        if agreed >= before.get("agree", 0) + 10:
            break
        assert time.monotonic() < deadline, "the shadow got no copies"
        time.sleep(0.2)
    assert shadow_counts(cluster, "maas_gateway_shadow_rows_total", "outcome").get("differ", 0) == before.get(
        "differ", 0)  # the same weights: every label agrees  # fmt: skip
    assert shadow_counts(cluster, "maas_gateway_shadow_requests_total", "code").get("OK", 0) >= 10

    with pytest.raises(grpc.RpcError) as err:
        two_versions.SetShadow(models_pb2.SetShadowRequest(model_name=MODEL, model_version=1, percent=50), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is the default" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        two_versions.SetShadow(models_pb2.SetShadowRequest(model_name=MODEL, model_version=2, percent=101), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "percent: must be 1 to 100" in err.value.details()

    # Promoting the shadow version ends the copies.
    model = two_versions.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name=MODEL, model_version=2),
                                           timeout=10).model  # fmt: skip
    assert model.default_version == 2 and not model.HasField("shadow")
    two_versions.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name=MODEL, model_version=1), timeout=10)
    assert not two_versions.GetModel(models_pb2.GetModelRequest(model_name=MODEL), timeout=10).model.HasField("shadow")
