"""Tenants on a cluster with API keys: private models, and what other tenants see of them."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from gateway.auth import hash_key
from maas.models.v1 import models_pb2, models_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from shared.cluster import ClusterPorts, LocalCluster, health_status
from tests.e2e.test_training import served_version, wait_for

KEYS = {"alpha": "alpha-secret-key-1", "beta": "beta-secret-key-2"}


def key(tenant):
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


@pytest.fixture(scope="module")
def secured(model_store, tmp_path_factory):
    var = tmp_path_factory.mktemp("tenants")
    shutil.copytree(model_store.root, var / "models")
    keys = var / "api-keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": t, "sha256": hash_key(k)} for t, k in KEYS.items()]}))
    cluster = LocalCluster(ClusterPorts.free(), var / "models", var, log_dir=var / "logs",
                           extra_env={"MAAS_GATEWAY_API_KEYS_FILE": str(keys)})  # fmt: skip
    try:
        cluster.start()
        with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
            yield cluster, channel
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def private_model(secured):
    _, channel = secured
    training = training_pb2_grpc.TrainingServiceStub(channel)
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", epochs=5, learning_rate=0.01,
                           builtin_dataset="sentiment", output_model="alpha-private", private=True),
        timeout=10, metadata=key("alpha"),
    ).job  # fmt: skip
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    events = [r.event for r in stub.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=240, metadata=key("alpha"))]
    assert events[-1].state == t.JOB_STATE_SUCCEEDED
    return "alpha-private"


def predict(channel, model, tenant):
    stub = nlp_pb2_grpc.NlpServiceStub(channel)
    return stub.Predict.with_call(nlp_pb2.PredictRequest(model_name=model, texts=["great"]), timeout=10,
                                  metadata=key(tenant))  # fmt: skip


def test_the_owner_uses_its_private_model(secured, private_model):
    _, channel = secured
    reply, _ = wait_for(lambda: served_version(lambda: predict(channel, private_model, "alpha")), what="served")
    assert list(reply.labels) == ["positive"]
    listed = models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=10,
                                                                  metadata=key("alpha"))  # fmt: skip
    assert private_model in {m.name for m in listed.models}


def test_another_tenant_cannot_see_or_use_it(secured, private_model):
    cluster, channel = secured
    wait_for(lambda: served_version(lambda: predict(channel, private_model, "alpha")), what="served")
    stub = models_pb2_grpc.ModelServiceStub(channel)
    for call in (
        lambda: predict(channel, private_model, "beta"),
        lambda: stub.GetModel(models_pb2.GetModelRequest(model_name=private_model), timeout=10, metadata=key("beta")),
        lambda: stub.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=private_model), timeout=10,
                                       metadata=key("beta")),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == f"model {private_model!r} not found"
    listed = stub.ListModels(models_pb2.ListModelsRequest(), timeout=10, metadata=key("beta"))
    names = {m.name for m in listed.models}
    assert private_model not in names and "sentiment" in names  # public models stay visible

    with triton.InferenceServerClient(cluster.specs["gateway"].target) as client:
        headers = {"authorization": f"Bearer {KEYS['beta']}"}
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(private_model, headers=headers)
        assert err.value.status() == "StatusCode.NOT_FOUND"
        index = {m.name for m in client.get_model_repository_index(headers=headers).models}
        assert private_model not in index and "sentiment" in index

    # Nor can it add versions to it.
    training = training_pb2_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        request = t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", builtin_dataset="sentiment",
                                     output_model=private_model)  # fmt: skip
        training.SubmitJob(request, timeout=10, metadata=key("beta"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_calls_without_a_key_are_refused_but_health_is_open(secured):
    cluster, channel = secured
    with pytest.raises(grpc.RpcError) as err:
        models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health_status(cluster.specs["gateway"].target) == 1  # SERVING
