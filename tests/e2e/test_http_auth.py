"""API keys, tenants and roles hold on the HTTP front exactly as on gRPC (tests/e2e/test_tenants.py)."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from http.client import HTTPConnection

import grpc
import pytest

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from tests.e2e.test_tenants import KEYS, key, secured_cluster
from tests.e2e.test_training import wait_for

TEXTS = {"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["great"]}]}


@pytest.fixture(scope="module")
def secured(model_store, tmp_path_factory):
    with secured_cluster(model_store, tmp_path_factory.mktemp("http-tenants")) as secured:
        yield secured


def call(cluster, method: str, path: str, tenant: str | None = None, body=None, headers=None):
    """(status, parsed JSON body) of one HTTP request, with the tenant's key."""
    sent = {"content-type": "application/json", **(headers or {})}
    if tenant is not None:
        sent["authorization"] = f"Bearer {KEYS[tenant]}"
    connection = HTTPConnection("127.0.0.1", cluster.ports.gateway_http, timeout=60)
    try:
        connection.request(method, path, json.dumps(body).encode() if body is not None else None, sent)
        response = connection.getresponse()
        content = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(content)
    except ValueError:
        return response.status, content


@pytest.fixture(scope="module")
def private_model(secured):
    cluster, channel = secured
    training = training_pb2_grpc.TrainingServiceStub(channel)
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", epochs=5, learning_rate=0.01,
                           builtin_dataset="sentiment", output_model="alpha-http", private=True),
        timeout=10, metadata=key("alpha"),
    ).job  # fmt: skip
    events = [r.event for r in training.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=240,
                                                 metadata=key("alpha"))]  # fmt: skip
    assert events[-1].state == t.JOB_STATE_SUCCEEDED
    wait_for(lambda: call(cluster, "POST", "/v2/models/alpha-http/infer", "alpha", TEXTS)[0] == 200, timeout=60,
             what="alpha-http served over HTTP")  # fmt: skip
    return "alpha-http", job.job_id


def test_calls_without_a_valid_key_are_401_but_health_and_the_page_are_open(secured):
    cluster, _ = secured
    for path in ("/v2/models/sentiment", "/console/api/models", "/v1/models", "/v2"):
        status, body = call(cluster, "GET", path)
        assert status == 401, (path, body)
    status, body = call(cluster, "GET", "/console/api/models", headers={"authorization": "Bearer not-a-key"})
    assert status == 401 and body == {"error": "unknown API key"}
    status, body = call(cluster, "POST", "/v1/embeddings", body={"model": "minilm-l6-v2", "input": "x"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"
    for path in ("/v2/health/live", "/v2/health/ready", "/openapi.json", "/console"):
        assert call(cluster, "GET", path)[0] == 200, path
    status, body = call(cluster, "GET", "/console/api/whoami", "ops")
    assert status == 200 and body == {"tenant": "ops", "admin": True, "keys_required": True}


# What each caller gets over HTTP: alpha owns alpha-http; beta is another tenant; ops holds the admin role.
OK, NOT_FOUND, DENIED = 200, 404, 403
EXPECTED = {
    #                      own private  another's   public, no admin  public, admin
    "infer":               (OK,         NOT_FOUND,  OK,               OK),
    "explain":             (OK,         NOT_FOUND,  OK,               OK),
    "metadata":            (OK,         NOT_FOUND,  OK,               OK),
    "ready":               (OK,         NOT_FOUND,  OK,               OK),
    "openai-model":        (OK,         NOT_FOUND,  OK,               OK),
    "promote":             (OK,         NOT_FOUND,  DENIED,           OK),
    "rollback-permission": (400,        NOT_FOUND,  DENIED,           400),
}  # fmt: skip
REQUESTS = {
    "infer": lambda m: ("POST", f"/v2/models/{m}/infer", TEXTS),
    "explain": lambda m: ("POST", f"/v2/models/{m}/explain", TEXTS),
    "metadata": lambda m: ("GET", f"/v2/models/{m}", None),
    "ready": lambda m: ("GET", f"/v2/models/{m}/ready", None),
    "openai-model": lambda m: ("GET", f"/v1/models/{m}", None),
    "promote": lambda m: ("POST", f"/console/api/models/{m}/promote", {"version": 1}),
    # One version each: an allowed caller learns there is nothing to roll back to (400); others are refused first.
    "rollback-permission": lambda m: ("POST", f"/console/api/models/{m}/rollback", None),
}


@pytest.mark.parametrize("what", sorted(EXPECTED))
def test_the_tenant_isolation_matrix_over_http(secured, private_model, what):
    cluster, _ = secured
    model, _ = private_model
    cells = [("alpha", model), ("beta", model), ("beta", "sentiment"), ("ops", "sentiment")]
    got = []
    for tenant, name in cells:
        method, path, body = REQUESTS[what](name)
        status, reply = call(cluster, method, path, tenant, body)
        got.append(status)
        if status == NOT_FOUND:  # exactly what a model that does not exist gets
            _, missing = call(cluster, method, path.replace(name, "no-such-model"), tenant, body)
            assert json.dumps(reply).replace(name, "X") == json.dumps(missing).replace("no-such-model", "X")
        if status == DENIED:
            assert "admin role" in reply["error"]
    assert tuple(got) == EXPECTED[what], f"{what}: (own, another's, public, admin) got {got}"


def test_another_tenant_sees_no_private_model_in_any_list(secured, private_model):
    cluster, _ = secured
    model, _ = private_model
    for tenant, visible in (("alpha", True), ("beta", False)):
        _, openai_models = call(cluster, "GET", "/v1/models", tenant)
        _, console = call(cluster, "GET", "/console/api/models", tenant)
        assert (model in {m["id"] for m in openai_models["data"]}) is visible
        assert (model in {m["name"] for m in console["models"]}) is visible
        assert "sentiment" in {m["name"] for m in console["models"]}


def test_embeddings_of_another_tenants_model_are_not_found(secured, private_model):
    cluster, _ = secured
    model, _ = private_model
    status, body = call(cluster, "POST", "/v1/embeddings", "beta", {"model": model, "input": "x"})
    _, missing = call(cluster, "POST", "/v1/embeddings", "beta", {"model": "no-such-model", "input": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["message"].replace(model, "X") == missing["error"]["message"].replace("no-such-model", "X")
    status, body = call(cluster, "POST", "/v1/embeddings", "beta", {"model": "minilm-l6-v2", "input": "x"})
    assert status == 200 and len(body["data"][0]["embedding"]) == 384


def test_a_tenants_jobs_and_their_events_are_its_own(secured, private_model):
    cluster, _ = secured
    _, job_id = private_model
    status, body = call(cluster, "GET", f"/console/api/jobs/{job_id}", "alpha")
    assert status == 200 and body["state"] == "SUCCEEDED"
    assert job_id in {j["job_id"] for j in call(cluster, "GET", "/console/api/jobs", "alpha")[1]["jobs"]}
    assert job_id not in {j["job_id"] for j in call(cluster, "GET", "/console/api/jobs", "beta")[1]["jobs"]}
    for path in (f"/console/api/jobs/{job_id}", f"/console/api/jobs/{job_id}/events"):
        status, body = call(cluster, "GET", path, "beta")
        assert status == 404 and body == {"error": f"job {job_id!r} not found"}, path
    status, stream = call(cluster, "GET", f"/console/api/jobs/{job_id}/events", "alpha")
    assert status == 200 and b'"state":"SUCCEEDED"' in stream


def test_the_console_stats_show_only_the_callers_models(secured, private_model):
    cluster, channel = secured
    model, _ = private_model
    nlp_pb2_grpc.NlpServiceStub(channel).Predict(nlp_pb2.PredictRequest(model_name=model, texts=["great"]),
                                                 timeout=30, metadata=key("alpha"))  # fmt: skip
    for tenant in ("alpha", "beta"):  # counted by rpc, never by model name
        status, stats = call(cluster, "GET", "/console/api/stats", tenant)
        assert status == 200 and stats["grpc_requests"]["maas.nlp.v1.NlpService/Predict"]["OK"] >= 1
        assert model not in json.dumps(stats)


def test_sigterm_ends_event_streams_and_stops_http_with_grpc(secured):
    """Last in this module: it stops the gateway. An open event stream is told to watch again, and the
    gateway, HTTP and gRPC together, exits well within its grace period."""
    cluster, channel = secured
    training = training_pb2_grpc.TrainingServiceStub(channel)
    job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=5000,
                                                builtin_dataset="iris", output_model="alpha-long", private=True),
                             timeout=10, metadata=key("alpha")).job  # fmt: skip
    connection = HTTPConnection("127.0.0.1", cluster.ports.gateway_http, timeout=60)
    connection.request("GET", f"/console/api/jobs/{job.job_id}/events", headers={
        "authorization": f"Bearer {KEYS['alpha']}"})  # fmt: skip
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert response.readline().startswith(b"data: ")  # the stream is open
    started = time.monotonic()
    gateway = cluster.processes["gateway"]
    gateway.send_signal(signal.SIGTERM)
    rest = response.read()  # returns once the gateway closes the stream
    connection.close()
    assert b"shutting down; watch again" in rest
    assert gateway.wait(30) == 0
    assert time.monotonic() - started < 20
    with contextlib.suppress(grpc.RpcError):
        training.CancelJob(t.CancelJobRequest(job_id=job.job_id), timeout=5, metadata=key("alpha"))
