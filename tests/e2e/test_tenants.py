"""Tenants on a cluster with API keys: private models, and what other tenants see of them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as oip  # the same wire protocol; one copy of it per process
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from gateway.auth import hash_key
from maas.common.v1 import model_pb2
from maas.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from services.gnn.defaults import LESMIS_GRAPH, LESMIS_LINKS
from shared.cluster import ClusterPorts, LocalCluster, health_status
from shared.stored_graphs import TENANT_METADATA
from shared.tensors import from_numpy, to_numpy
from tests.e2e.test_training import served_version, wait_for

KEYS = {"alpha": "alpha-secret-key-1", "beta": "beta-secret-key-2", "ops": "ops-secret-key-3"}
ROLES = {"ops": ["admin"]}


def key(tenant):
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


@contextlib.contextmanager
def secured_cluster(model_store, var):
    """A cluster of its own whose gateway takes KEYS (ops is an admin): (cluster, gateway channel)."""
    shutil.copytree(model_store.root, var / "models")
    keys = var / "api-keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": t, "sha256": hash_key(k), "roles": ROLES.get(t, [])}
                                         for t, k in KEYS.items()]}))  # fmt: skip
    cluster = LocalCluster(ClusterPorts.free(), var / "models", var, log_dir=var / "logs",
                           extra_env={"MAAS_GATEWAY_API_KEYS_FILE": str(keys)})  # fmt: skip
    try:
        cluster.start()
        with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
            yield cluster, channel
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def secured(model_store, tmp_path_factory):
    with secured_cluster(model_store, tmp_path_factory.mktemp("tenants")) as secured:
        yield secured


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
                                     output_model=private_model, private=True)  # fmt: skip
        training.SubmitJob(request, timeout=10, metadata=key("beta"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_calls_without_a_key_are_refused_but_health_is_open(secured):
    cluster, channel = secured
    with pytest.raises(grpc.RpcError) as err:
        models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health_status(cluster.specs["gateway"].target) == 1  # SERVING


# --- the isolation matrix: tenants x rpcs x (own private, another's private, public) ---------------

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
TAKEN = grpc.StatusCode.FAILED_PRECONDITION


def status(call) -> grpc.StatusCode:
    try:
        call()
        return OK
    except grpc.RpcError as exc:
        return exc.code()


def infer_request(model: str) -> oip.ModelInferRequest:
    text = b"great"
    return oip.ModelInferRequest(
        model_name=model,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="texts", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(text).to_bytes(4, "little") + text],
    )


def rpcs(channel, cancel_jobs: list):
    models = models_pb2_grpc.ModelServiceStub(channel)
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    training = training_pb2_grpc.TrainingServiceStub(channel)

    def submit(model, md):
        private = model != "sentiment"
        job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", epochs=1,
                                                    builtin_dataset="sentiment", output_model=model,
                                                    private=private), timeout=10, metadata=md).job  # fmt: skip
        cancel_jobs.append((job.job_id, md))

    return {
        "Predict": lambda m, md: nlp.Predict(nlp_pb2.PredictRequest(model_name=m, texts=["great"]), timeout=10,
                                             metadata=md),  # fmt: skip
        "GetModel": lambda m, md: models.GetModel(models_pb2.GetModelRequest(model_name=m), timeout=10, metadata=md),
        "ListModelVersions": lambda m, md: models.ListModelVersions(
            models_pb2.ListModelVersionsRequest(model_name=m), timeout=10, metadata=md),
        "ModelMetadata": lambda m, md: inference.ModelMetadata(oip.ModelMetadataRequest(name=m), timeout=10,
                                                               metadata=md),  # fmt: skip
        "ModelInfer": lambda m, md: inference.ModelInfer(infer_request(m), timeout=10, metadata=md),
        "LoadModel": lambda m, md: models.LoadModel(models_pb2.LoadModelRequest(model_name=m, model_version=1),
                                                    timeout=30, metadata=md),  # fmt: skip
        "SetDefaultVersion": lambda m, md: models.SetDefaultVersion(
            models_pb2.SetDefaultVersionRequest(model_name=m), timeout=10, metadata=md),
        # Percent 0 ends a split that is not there: what is checked is who may change the model.
        "SetCanary": lambda m, md: models.SetCanary(models_pb2.SetCanaryRequest(model_name=m), timeout=10,
                                                    metadata=md),  # fmt: skip
        "SetShadow": lambda m, md: models.SetShadow(models_pb2.SetShadowRequest(model_name=m), timeout=10,
                                                    metadata=md),  # fmt: skip
        "ReadPayloads": lambda m, md: gateway_pb2_grpc.GatewayServiceStub(channel).ReadPayloads(
            gateway_pb2.ReadPayloadsRequest(model_name=m), timeout=10, metadata=md),
        "RepositoryModelLoad": lambda m, md: inference.RepositoryModelLoad(
            oip.RepositoryModelLoadRequest(model_name=m), timeout=30, metadata=md),
        "SubmitJob": submit,
    }


# What each caller gets: alpha owns alpha-private; beta is another tenant; ops holds the admin role.
EXPECTED = {
    #                     own private  another's   public, no admin  public, admin
    "Predict":            (OK,         NOT_FOUND,  OK,               OK),
    "GetModel":           (OK,         NOT_FOUND,  OK,               OK),
    "ListModelVersions":  (OK,         NOT_FOUND,  OK,               OK),
    "ModelMetadata":      (OK,         NOT_FOUND,  OK,               OK),
    "ModelInfer":         (OK,         NOT_FOUND,  OK,               OK),
    "LoadModel":          (OK,         NOT_FOUND,  DENIED,           OK),
    "SetDefaultVersion":  (OK,         NOT_FOUND,  DENIED,           OK),
    "SetCanary":          (OK,         NOT_FOUND,  DENIED,           OK),
    "SetShadow":          (OK,         NOT_FOUND,  DENIED,           OK),
    "ReadPayloads":       (OK,         NOT_FOUND,  OK,               OK),
    "RepositoryModelLoad": (OK,        NOT_FOUND,  DENIED,           OK),
    "SubmitJob":          (OK,         TAKEN,      DENIED,           OK),
}  # fmt: skip


@pytest.mark.parametrize("rpc", sorted(EXPECTED))
def test_the_tenant_isolation_matrix(secured, private_model, rpc):
    _, channel = secured
    wait_for(lambda: served_version(lambda: predict(channel, private_model, "alpha")), what="served")
    jobs: list = []
    call = rpcs(channel, jobs)[rpc]
    cells = [("alpha", private_model), ("beta", private_model), ("beta", "sentiment"), ("ops", "sentiment")]
    got = tuple(status(lambda tenant=tenant, model=model: call(model, key(tenant))) for tenant, model in cells)
    training = training_pb2_grpc.TrainingServiceStub(channel)
    for job_id, md in jobs:  # only the status of the submission was wanted
        with contextlib.suppress(grpc.RpcError):
            training.CancelJob(t.CancelJobRequest(job_id=job_id), timeout=10, metadata=md)
    assert got == EXPECTED[rpc], f"{rpc}: (own, another's, public, admin) got {[c.name for c in got]}"


def test_another_tenant_cannot_unload_a_public_model_for_everyone(secured, private_model):
    _, channel = secured
    models = models_pb2_grpc.ModelServiceStub(channel)
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    for call in (
        lambda: models.UnloadModel(models_pb2.UnloadModelRequest(model_name="sentiment"), timeout=10,
                                   metadata=key("beta")),
        lambda: inference.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="sentiment"), timeout=10,
                                                metadata=key("beta")),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == DENIED
        assert "admin role" in err.value.details()
    assert list(predict(channel, "sentiment", "alpha")[0].labels) == ["positive"]  # still served to everyone


def test_a_tenant_unloads_and_loads_its_own_private_model(secured, private_model):
    _, channel = secured
    wait_for(lambda: served_version(lambda: predict(channel, private_model, "alpha")), what="served")
    models = models_pb2_grpc.ModelServiceStub(channel)
    models.UnloadModel(models_pb2.UnloadModelRequest(model_name=private_model), timeout=10, metadata=key("alpha"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            predict(channel, private_model, "alpha")
        assert err.value.code() == NOT_FOUND
        # Unloaded, it is still only its owner's: another tenant learns nothing of it from the store.
        for call in (
            lambda: models.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=private_model),
                                             timeout=10, metadata=key("beta")),
            lambda: models.LoadModel(models_pb2.LoadModelRequest(model_name=private_model), timeout=10,
                                     metadata=key("beta")),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == NOT_FOUND and err.value.details() == f"model {private_model!r} not found"
        listed = models.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=private_model), timeout=10,
                                          metadata=key("alpha"))  # fmt: skip
        assert {v.state for v in listed.versions} == {model_pb2.MODEL_STATE_UNLOADED}
    finally:
        models.LoadModel(models_pb2.LoadModelRequest(model_name=private_model), timeout=60, metadata=key("alpha"))
    wait_for(lambda: served_version(lambda: predict(channel, private_model, "alpha")), what="served again")


def test_the_example_client_sends_maas_api_key_or_says_it_skipped(secured):
    cluster, _ = secured
    target = cluster.specs["gateway"].target
    env = {k: v for k, v in os.environ.items() if k != "MAAS_API_KEY"}
    skipped = subprocess.run([sys.executable, "-m", "clients.example", target], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr
    assert "example calls skipped: the gateway needs an API key" in skipped.stdout
    ran = subprocess.run([sys.executable, "-m", "clients.example", target], env={**env, "MAAS_API_KEY": KEYS["alpha"]},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "sentiment v1: ['positive', 'negative']" in ran.stdout


def score_links(channel, tenant, graph, **fields):
    stub = gnn_pb2_grpc.GnnServiceStub(channel)
    request = gnn_pb2.PredictLinksRequest(model_name=LESMIS_LINKS, stored_graph=graph,
                                          pairs=from_numpy(np.array([[0], [5]], np.int64)), **fields)  # fmt: skip
    return stub.PredictLinks.with_call(request, timeout=30, metadata=key(tenant))


def update_graph(channel, tenant, graph, new_name=""):
    request = gnn_pb2.UpdateGraphRequest(graph_name=graph, new_graph_name=new_name,
                                         edge_index=from_numpy(np.array([[0], [9]], np.int64)))  # fmt: skip
    return gnn_pb2_grpc.GnnServiceStub(channel).UpdateGraph(request, timeout=60, metadata=key(tenant))


def delete_graph_version(channel, tenant, graph, version):
    request = gnn_pb2.DeleteGraphVersionRequest(graph_name=graph, graph_version=version)
    return gnn_pb2_grpc.GnnServiceStub(channel).DeleteGraphVersion(request, timeout=60, metadata=key(tenant))


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_a_private_graph_the_gateway_has_not_heard_of_is_refused_to_others_at_once(secured):
    """A graph published past this gateway worker (through another worker; here straight at the gnn service)
    is refused to other tenants from the moment it exists, not only after the worker next reads the owners."""
    cluster, channel = secured
    # The worker has just read the graphs: a query naming an unknown graph reads them, and is NOT_FOUND.
    assert refused(lambda: score_links(channel, "beta", "gamma-lesmis")).code() == grpc.StatusCode.NOT_FOUND
    request = gnn_pb2.UpdateGraphRequest(graph_name=LESMIS_GRAPH, new_graph_name="gamma-lesmis",
                                         edge_index=from_numpy(np.array([[0], [9]], np.int64)))  # fmt: skip
    with grpc.insecure_channel(cluster.specs["gnn"].target) as direct:
        gnn_pb2_grpc.GnnServiceStub(direct).UpdateGraph(request, timeout=60, metadata=((TENANT_METADATA, "alpha"),))
    other = refused(lambda: score_links(channel, "beta", "gamma-lesmis"))
    assert other.code() == grpc.StatusCode.NOT_FOUND and "gamma-lesmis" in other.details()
    assert score_links(channel, "alpha", "gamma-lesmis")[0].graph_version == 1


def test_a_graph_a_tenant_publishes_is_its_own_and_the_default_graphs_stay_public(secured):
    _, channel = secured
    published = update_graph(channel, "alpha", LESMIS_GRAPH, new_name="alpha-lesmis")
    assert (published.graph_name, published.graph_version) == ("alpha-lesmis", 1)
    reply, _ = score_links(channel, "alpha", "alpha-lesmis", graph_version=1)
    _, call = score_links(channel, "alpha", "alpha-lesmis", graph_version=1)
    assert reply.graph_version == 1 and dict(call.trailing_metadata())["maas-cache"] == "hit"
    # Others (the admin too) get what a graph that does not exist gets, even where alpha's answer is cached.
    for tenant in ("beta", "ops"):
        for fields in ({}, {"graph_version": 1}):
            other = refused(lambda t=tenant, f=fields: score_links(channel, t, "alpha-lesmis", **f))
            missing = refused(lambda t=tenant, f=fields: score_links(channel, t, "no-such-graph", **f))
            assert other.code() == missing.code() == grpc.StatusCode.NOT_FOUND
            assert other.details().replace("alpha-lesmis", "X") == missing.details().replace("no-such-graph", "X")
        other = refused(lambda t=tenant: update_graph(channel, t, "alpha-lesmis"))
        assert other.code() == grpc.StatusCode.NOT_FOUND and "alpha-lesmis" in other.details()
        other = refused(lambda t=tenant: delete_graph_version(channel, t, "alpha-lesmis", 1))
        assert other.code() == grpc.StatusCode.NOT_FOUND and "alpha-lesmis" in other.details()
    # Its owner updates it in place, and may delete its versions (the service refuses v1: v2 builds on it);
    # the public graph it came from is as it was, for everyone.
    assert update_graph(channel, "alpha", "alpha-lesmis").graph_version == 2
    kept = refused(lambda: delete_graph_version(channel, "alpha", "alpha-lesmis", 1))
    assert kept.code() == grpc.StatusCode.FAILED_PRECONDITION and "base of delta versions" in kept.details()
    for tenant in ("alpha", "beta"):
        assert score_links(channel, tenant, LESMIS_GRAPH)[0].graph_version == 1
    # A new version of a public graph needs the admin role; a name that exists cannot be published again.
    denied = refused(lambda: update_graph(channel, "beta", LESMIS_GRAPH))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admin role" in denied.details() and "new_graph_name" in denied.details()
    taken = refused(lambda: update_graph(channel, "beta", LESMIS_GRAPH, new_name=LESMIS_GRAPH))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_tenants_private_user_item_graph_answers_its_recommendations_only(secured):
    """A tenant's users and interactions, added to a private copy of the shop graph, are recommended from for it;
    to others the graph does not exist, even where the owner's answer is cached."""
    _, channel = secured
    stub = gnn_pb2_grpc.GnnServiceStub(channel)
    fan = np.array([[900] * 4, [600, 606, 612, 618]], np.int64)
    copy = gnn_pb2.UpdateGraphRequest(graph_name="shop-interactions", new_graph_name="alpha-shop",
                                      node_features=from_numpy(np.zeros((1, 385), np.float32)),
                                      edge_index=from_numpy(fan))  # fmt: skip
    stub.UpdateGraph(copy, timeout=60, metadata=key("alpha"))

    def recommend(tenant, **fields):
        request = gnn_pb2.RecommendRequest(model_name="shop-lightgcn", stored_graph="alpha-shop", user_ids=[900],
                                           top_k=5, **fields)  # fmt: skip
        return stub.Recommend.with_call(request, timeout=30, metadata=key(tenant))

    reply, _ = recommend("alpha", graph_version=1)
    _, call = recommend("alpha", graph_version=1)
    assert reply.graph_version == 1 and dict(call.trailing_metadata())["maas-cache"] == "hit"
    assert to_numpy(reply.outputs["popularity_fallback"], "popularity_fallback").tolist() == [False]
    for tenant in ("beta", "ops"):
        for fields in ({}, {"graph_version": 1}):
            other = refused(lambda t=tenant, f=fields: recommend(t, **f))
            assert other.code() == grpc.StatusCode.NOT_FOUND and "alpha-shop" in other.details()
        # The public graph it came from has no node 900: out of range, for everyone.
        public = gnn_pb2.RecommendRequest(model_name="shop-lightgcn", user_ids=[900], top_k=5)
        bad = refused(lambda t=tenant, r=public: stub.Recommend(r, timeout=30, metadata=key(t)))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_ids[0]" in bad.details()


def test_open_inference_cache_entries_stay_with_their_tenant(secured, private_model):
    _, channel = secured
    wait_for(lambda: served_version(lambda: predict(channel, private_model, "alpha")), what="served")
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    request = infer_request(private_model)
    request.id = "cache-crossing"

    def infer(tenant):
        reply, call = inference.ModelInfer.with_call(request, timeout=10, metadata=key(tenant))
        return reply, dict(call.trailing_metadata())["maas-cache"]

    first, _ = infer("alpha")
    again, outcome = infer("alpha")
    assert outcome == "hit" and again == first
    for tenant in ("beta", "ops"):  # another tenant, the admin too: the model is not there for them
        with pytest.raises(grpc.RpcError) as err:
            infer(tenant)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == f"model {private_model!r} not found"


def test_model_stream_infer_keeps_tenants_apart(secured, private_model):
    _, channel = secured
    wait_for(lambda: served_version(lambda: predict(channel, private_model, "alpha")), what="served")
    inference = oip_grpc.GRPCInferenceServiceStub(channel)

    def stream(tenant, *models):
        requests = [infer_request(model) for model in models]
        for i, request in enumerate(requests):
            request.id = f"{tenant}-{i}"
        metadata = key(tenant) if tenant else ()
        return list(inference.ModelStreamInfer(iter(requests), timeout=30, metadata=metadata))

    own = stream("alpha", private_model, "sentiment")
    assert [r.error_message for r in own] == ["", ""]
    theirs = {r.infer_response.id: r.error_message for r in stream("beta", private_model, "sentiment")}
    assert theirs == {"beta-0": f"[StatusCode.NOT_FOUND] model {private_model!r} not found", "beta-1": ""}
    with pytest.raises(grpc.RpcError) as err:
        stream("", "sentiment")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
