"""KEKs on a cluster of their own (with API keys and tenants): tenants' own KEKs, a wrong or missing KEK,
and rotation under load, after which the old KEK is deleted and everything still loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from gateway.auth import hash_key
from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.keys.v1 import keys_pb2, keys_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from shared.cluster import ClusterPorts, LocalCluster
from shared.envelope import split_envelope
from shared.keyring import LOCAL_KEK_ID, Keyring, create_kek
from shared.model_store import MANIFEST, ModelStore
from shared.tensors import from_numpy
from tests.e2e.test_training import served_version, wait_for
from tests.stores import copy_store

KEYS = {"acme": "acme-secret-key-1", "globex": "globex-secret-key-2", "ops": "ops-secret-key-3"}
ROLES = {"ops": ["admin"]}
READY, FAILED = model_pb2.MODEL_STATE_READY, model_pb2.MODEL_STATE_FAILED
NO_STORE = (("cache-control", "no-store"),)


def key(tenant: str, *extra) -> tuple:
    return (("authorization", f"Bearer {KEYS[tenant]}"), *extra)


@pytest.fixture(scope="module")
def keyed(model_store, tmp_path_factory):
    var = tmp_path_factory.mktemp("keys-cluster")
    keys = var / "keys"
    for kek_id in (LOCAL_KEK_ID, "tenant-acme", "tenant-globex"):
        create_kek(keys, kek_id)
    copy_store(model_store, ModelStore(var / "models", Keyring(keys, LOCAL_KEK_ID)))
    api_keys = var / "api-keys.json"
    api_keys.write_text(json.dumps({"keys": [{"tenant": t, "sha256": hash_key(k), "roles": ROLES.get(t, [])}
                                             for t, k in KEYS.items()]}))  # fmt: skip
    fast = {f"MAAS_{family}_TRAINER_{k}": v for family in ("DENSE", "GNN", "NLP")
            for k, v in (("CLAIM_IDLE_MS", "2000"), ("BLOCK_MS", "200"))}  # fmt: skip
    cluster = LocalCluster(ClusterPorts.free(), var / "models", var, log_dir=var / "logs",
                           extra_env={"MAAS_GATEWAY_API_KEYS_FILE": str(api_keys), **fast})  # fmt: skip
    try:
        cluster.start()
        with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
            yield cluster, channel
    finally:
        cluster.stop()


def kek_of(cluster: LocalCluster, model: str, version: int) -> str:
    return split_envelope((cluster.var_dir / "models" / model / str(version) / MANIFEST).read_bytes())[0].kek_id


def restart(cluster: LocalCluster, *names: str) -> None:
    for name in names:
        cluster.stop_process(name)
        cluster.start_process(name)
    for name in names:
        cluster.wait_serving(name)


def versions_at(cluster: LocalCluster, family: str, model: str) -> dict[int, tuple[int, str]]:
    """version -> (state, reason), asked of the family's service itself (internal: no API key)."""
    with grpc.insecure_channel(cluster.specs[family].target) as channel:
        reply = models_pb2_grpc.ModelServiceStub(channel).ListModelVersions(
            models_pb2.ListModelVersionsRequest(model_name=model), timeout=30
        )
    return {v.version: (v.state, v.state_reason) for v in reply.versions}


@pytest.fixture(scope="module")
def acme_model(keyed):
    """A private model of acme's, trained on the cluster."""
    _, channel = keyed
    training = training_pb2_grpc.TrainingServiceStub(channel)
    job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=5,
                                                builtin_dataset="iris", output_model="acme-iris", private=True),
                             timeout=10, metadata=key("acme")).job  # fmt: skip
    events = [r.event for r in training.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=240,
                                                 metadata=key("acme"))]  # fmt: skip
    assert events[-1].state == t.JOB_STATE_SUCCEEDED, events[-1]
    return "acme-iris"


@pytest.fixture(scope="module")
def globex_data(keyed):
    """An upload of globex's, on which its jobs train."""
    _, channel = keyed
    rows = ["f1,f2,label"] + [f"{i % 7}.5,{i % 3}.25,{i % 2}" for i in range(60)]
    training = training_pb2_grpc.TrainingServiceStub(channel)

    def messages():
        yield t.UploadDatasetRequest(info=t.DatasetInfo(name="g", family=t.FAMILY_DENSE, format=t.DATASET_FORMAT_CSV))
        yield t.UploadDatasetRequest(chunk=("\n".join(rows) + "\n").encode())

    return training.UploadDataset(messages(), timeout=60, metadata=key("globex")).dataset


def predict_iris(channel, version=0):
    stub = dense_pb2_grpc.DenseServiceStub(channel)
    x = from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], np.float32))
    request = dense_pb2.PredictRequest(model_name="acme-iris", model_version=version, inputs={"x": x})
    return stub.Predict.with_call(request, timeout=10, metadata=key("acme", *NO_STORE))


def test_key_management_is_for_admins_and_names_what_is_wrong(keyed):
    _, channel = keyed
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    for call in (lambda: keys.RotateKeys(keys_pb2.RotateKeysRequest(to_kek_id="x"), timeout=10, metadata=key("acme")),
                 lambda: keys.ListKeys(keys_pb2.ListKeysRequest(), timeout=10, metadata=key("acme"))):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin role" in err.value.details()
    for kek_id, code, message in (
        ("../escape", grpc.StatusCode.INVALID_ARGUMENT, "to_kek_id: '../escape' is not a KEK id"),
        ("kek-nowhere", grpc.StatusCode.FAILED_PRECONDITION, "KEK 'kek-nowhere' is not in the keys directory"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            keys.RotateKeys(keys_pb2.RotateKeysRequest(to_kek_id=kek_id), timeout=10, metadata=key("ops"))
        assert err.value.code() == code and message in err.value.details()
    stores = keys.ListKeys(keys_pb2.ListKeysRequest(), timeout=30, metadata=key("ops")).stores
    assert {s.store for s in stores} == {"datasets", "models:dense", "models:gnn", "graphs:gnn", "models:nlp"}
    for store in stores:
        assert store.encrypted and store.active_kek_id == LOCAL_KEK_ID and not store.errors, store
        assert set(store.available_kek_ids) == {LOCAL_KEK_ID, "tenant-acme", "tenant-globex"}
    assert {s.store: dict(s.data_keys_by_kek) for s in stores}["models:nlp"] == {LOCAL_KEK_ID: 2}


def test_each_tenant_gets_its_own_kek_and_another_tenants_kek_cannot_open_its_model(keyed, acme_model,
                                                                                    globex_data):  # fmt: skip
    cluster, channel = keyed
    assert kek_of(cluster, acme_model, 1) == "tenant-acme"
    meta = (cluster.var_dir / "datasets" / globex_data.dataset_id / "meta.json").read_bytes()
    assert split_envelope(meta)[0].kek_id == "tenant-globex"
    wait_for(lambda: served_version(lambda: predict_iris(channel)), what="acme-iris served")

    keys = cluster.var_dir / "keys"
    shutil.copy(keys / "tenant-acme", keys / "acme.bak")
    try:
        # globex's KEK where acme's should be: acme's model does not open, and says so; the rest serves on.
        shutil.copy(keys / "tenant-globex", keys / "tenant-acme")
        restart(cluster, "dense")
        state, reason = versions_at(cluster, "dense", acme_model)[1]
        assert state == FAILED and "the KEK 'tenant-acme'" in reason and "does not open this data key" in reason
        assert versions_at(cluster, "dense", "digits-mlp")[1][0] == READY
        pixels = from_numpy(np.zeros((1, 64), np.float32))
        digits, _ = wait_for(lambda: served_version(lambda: dense_pb2_grpc.DenseServiceStub(channel).Predict.with_call(
            dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": pixels}), timeout=30,
            metadata=key("acme"))), what="the dense service back")  # fmt: skip
        assert digits.model_version == 1
        with pytest.raises(grpc.RpcError) as err:
            predict_iris(channel, version=1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "version 1 is MODEL_STATE_FAILED" in err.value.details() and "does not open" in err.value.details()
        # A missing KEK: LoadModel says which and where.
        (keys / "tenant-acme").unlink()
        with pytest.raises(grpc.RpcError) as err:
            models_pb2_grpc.ModelServiceStub(channel).LoadModel(
                models_pb2.LoadModelRequest(model_name=acme_model, model_version=1), timeout=30, metadata=key("acme")
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "sealed with KEK 'tenant-acme', which is not in the keys directory" in err.value.details()
    finally:
        os.replace(keys / "acme.bak", keys / "tenant-acme")
    loaded = models_pb2_grpc.ModelServiceStub(channel).LoadModel(
        models_pb2.LoadModelRequest(model_name=acme_model, model_version=1), timeout=30, metadata=key("acme")
    )
    assert loaded.version.state == READY
    predict_iris(channel)


class Load:
    """Calls through the gateway, on threads, until stopped: every failure is kept."""

    def __init__(self, channel) -> None:
        self.stop = threading.Event()
        self.calls = 0
        self.failures: list[str] = []
        pixels = from_numpy(np.zeros((1, 64), np.float32))
        dense, nlp = dense_pb2_grpc.DenseServiceStub(channel), nlp_pb2_grpc.NlpServiceStub(channel)
        gnn = gnn_pb2_grpc.GnnServiceStub(channel)
        self.targets = [
            lambda: dense.Predict(dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": pixels}),
                                  timeout=30, metadata=key("ops", *NO_STORE)),
            lambda: nlp.Predict(nlp_pb2.PredictRequest(model_name="sentiment", texts=["fine"]), timeout=30,
                                metadata=key("ops", *NO_STORE)),
            lambda: gnn.Predict(gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0]),
                                timeout=30, metadata=key("ops", *NO_STORE)),
            lambda: predict_iris(channel),
        ]  # fmt: skip
        self.threads = [threading.Thread(target=self.run, args=(call,)) for call in self.targets]

    def run(self, call) -> None:
        while not self.stop.is_set():
            try:
                call()
                self.calls += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def maasctl(cluster, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "maas_client.cli", "--target", cluster.specs["gateway"].target,
               "--api-key", KEYS["ops"], *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_rotation_under_load_fails_no_request_and_then_the_old_kek_can_be_deleted(keyed, acme_model, globex_data):
    cluster, channel = keyed
    keys = cluster.var_dir / "keys"
    create_kek(keys, "kek-2")
    wait_for(lambda: served_version(lambda: predict_iris(channel)), what="acme-iris served")
    with Load(channel) as load:
        time.sleep(1.0)
        rotated = maasctl(cluster, "keys", "rotate", "--to", "kek-2")
        time.sleep(1.0)
        calls_during = load.calls
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "the old KEK may be retired" in rotated.stdout
    assert load.failures == [] and calls_during > 20
    stores = keys_pb2_grpc.KeyServiceStub(channel).ListKeys(keys_pb2.ListKeysRequest(), timeout=30,
                                                            metadata=key("ops")).stores  # fmt: skip
    for store in stores:
        assert store.active_kek_id == "kek-2" and not store.errors, store
        # Every data key is under the new KEK, or under its tenant's own.
        assert set(store.data_keys_by_kek) <= {"kek-2", "tenant-acme", "tenant-globex"}, store
    assert kek_of(cluster, "sentiment", 1) == "kek-2" and kek_of(cluster, acme_model, 1) == "tenant-acme"

    # Retire the old KEK, then start every process afresh: each version is read from the store again.
    (keys / LOCAL_KEK_ID).unlink()
    restart(cluster, "dense", "gnn", "nlp", "dense-trainer", "gateway")
    store = ModelStore(cluster.var_dir / "models")
    for model in store.model_names():
        states = versions_at(cluster, store.family(model), model)
        assert all(state == READY for state, _ in states.values()), (model, states)
    # Stored graphs were rotated with the models: the gnn service still opens them.
    graph = gnn_pb2_grpc.GnnServiceStub(channel).Predict(gnn_pb2.PredictRequest(
        model_name="sbm-sage", stored_graph="sbm-100k", graph_version=1, node_ids=[3]), timeout=30,
        metadata=key("ops"))  # fmt: skip
    assert graph.graph_version == 1 and graph.nodes_used > 1
    # The data sets too: globex trains on its upload from before the rotation; a new upload gets kek-2.
    training = training_pb2_grpc.TrainingServiceStub(channel)
    job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=3,
                                                dataset_id=globex_data.dataset_id, output_model="globex-model",
                                                private=True), timeout=10, metadata=key("globex")).job  # fmt: skip
    events = [r.event for r in training.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=240,
                                                 metadata=key("globex"))]  # fmt: skip
    assert events[-1].state == t.JOB_STATE_SUCCEEDED, events[-1]
    fresh = upload_as(channel, "ops")
    meta = (cluster.var_dir / "datasets" / fresh.dataset_id / "meta.json").read_bytes()
    assert split_envelope(meta)[0].kek_id == "kek-2"


def upload_as(channel, tenant: str):
    training = training_pb2_grpc.TrainingServiceStub(channel)

    def messages():
        yield t.UploadDatasetRequest(info=t.DatasetInfo(name="n", family=t.FAMILY_DENSE, format=t.DATASET_FORMAT_CSV))
        yield t.UploadDatasetRequest(chunk=b"f1,label\n1.5,0\n2.5,1\n3.5,0\n4.5,1\n")

    return training.UploadDataset(messages(), timeout=60, metadata=key(tenant)).dataset


def test_a_tenants_kek_rotates_on_its_own(keyed, acme_model):
    cluster, channel = keyed
    keys = cluster.var_dir / "keys"
    create_kek(keys, "tenant-acme-2")
    rotated = maasctl(cluster, "keys", "rotate", "--to", "tenant-acme-2", "--tenant", "acme")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert kek_of(cluster, acme_model, 1) == "tenant-acme-2" and kek_of(cluster, "digits-mlp", 1) == "kek-2"
    (keys / "tenant-acme").unlink()
    restart(cluster, "dense")
    assert versions_at(cluster, "dense", acme_model)[1][0] == READY
    wait_for(lambda: served_version(lambda: predict_iris(channel)), what="acme-iris served")
    listed = maasctl(cluster, "keys", "list")
    assert listed.returncode == 0 and "acme: tenant-acme-2" in listed.stdout, listed.stdout + listed.stderr

