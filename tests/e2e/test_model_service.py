"""maas.models.v1.ModelService: one model-management API for every family, at the gateway and on
each family's service; and the gateway serves exactly the families of the registry."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from maas.common.v1 import model_pb2
from maas.models.v1 import models_pb2, models_pb2_grpc
from shared.families import FAMILIES, family

READY = model_pb2.MODEL_STATE_READY
UNLOADED = model_pb2.MODEL_STATE_UNLOADED
MODEL_SERVICE = "maas.models.v1.ModelService"
# One model of each family that the other tests do not use while this module runs.
MODELS = {"dense": "sine-gru", "gnn": "karate-gcn", "nlp": "sentiment"}


def reflect(channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))


def services_of(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        reply = reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    return {service.name for service in reply.list_services_response.service}


def methods_of(target: str, service: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        reply = reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for entry in proto.service:
            if f"{proto.package}.{entry.name}" == service:
                return [method.name for method in entry.method]
    raise AssertionError(f"{service} not described")


def test_the_gateway_serves_exactly_the_registrys_families(cluster):
    served = services_of(cluster.specs["gateway"].target)
    data_planes = {
        name for name in served if name.startswith("maas.") and name.split(".")[1] in {f.name for f in FAMILIES}
    }
    assert data_planes == {f.service for f in FAMILIES}
    assert MODEL_SERVICE in served
    assert {
        "inference.GRPCInferenceService",
        "maas.gateway.v1.GatewayService",
        "maas.training.v1.TrainingService",
    } <= served


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_family_services_serve_predict_and_model_service_only(cluster, name):
    entry = family(name)
    target = cluster.specs[name].target
    served = services_of(target)
    assert served - {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} == {
        entry.service,
        MODEL_SERVICE,
    }
    # The data plane only: Predict, and the family's other queries, updates and the gateway's own rpcs.
    assert sorted(methods_of(target, entry.service)) == sorted([*entry.queries, *entry.updates, *entry.internal])
    with grpc.insecure_channel(target) as channel:
        old_admin = channel.unary_unary(f"/{entry.service}/ListModels")
        with pytest.raises(grpc.RpcError) as err:
            old_admin(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def wait_until(condition, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_list_versions_load_unload_and_set_default_through_the_gateway(gateway_channel, name):
    stub = models_pb2_grpc.ModelServiceStub(gateway_channel)
    model = MODELS[name]
    listed = stub.ListModels(models_pb2.ListModelsRequest(family=name), timeout=10).models
    assert model in {m.name for m in listed}
    assert all(v.family == name for m in listed for v in m.versions)

    versions = stub.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=model), timeout=10)
    default = versions.default_version
    assert default >= 1 and not versions.default_pinned
    assert {v.version: v.state for v in versions.versions}[default] == READY

    pinned = stub.SetDefaultVersion(
        models_pb2.SetDefaultVersionRequest(model_name=model, model_version=default), timeout=10
    ).model
    assert pinned.default_version == default
    assert stub.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=model), timeout=10).default_pinned
    stub.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name=model), timeout=10)  # unpin

    stub.UnloadModel(models_pb2.UnloadModelRequest(model_name=model), timeout=10)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModel(models_pb2.GetModelRequest(model_name=model), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Unloaded models are still in the store, and the gateway finds their family there.
        stored = stub.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=model), timeout=10)
        assert {v.state for v in stored.versions} == {UNLOADED}
    finally:
        loaded = stub.LoadModel(models_pb2.LoadModelRequest(model_name=model, model_version=default), timeout=60)
    assert loaded.version.state == READY and loaded.version.family == name
    wait_until(
        lambda: model in {m.name for m in stub.ListModels(models_pb2.ListModelsRequest(), timeout=10).models},
        f"{model} to be listed again",
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.GetModel(models_pb2.GetModelRequest(model_name="no-such-model"), timeout=10),
        lambda s: s.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name="no-such-model"), timeout=10),
        lambda s: s.LoadModel(models_pb2.LoadModelRequest(model_name="no-such-model"), timeout=10),
        lambda s: s.UnloadModel(models_pb2.UnloadModelRequest(model_name="no-such-model"), timeout=10),
        lambda s: s.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name="no-such-model"), timeout=10),
    ],
    ids=["GetModel", "ListModelVersions", "LoadModel", "UnloadModel", "SetDefaultVersion"],
)
def test_an_unknown_model_is_not_found(gateway_channel, call):
    with pytest.raises(grpc.RpcError) as err:
        call(models_pb2_grpc.ModelServiceStub(gateway_channel))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "model 'no-such-model' not found"


def test_an_unknown_family_is_invalid(gateway_channel):
    with pytest.raises(grpc.RpcError) as err:
        models_pb2_grpc.ModelServiceStub(gateway_channel).ListModels(models_pb2.ListModelsRequest(family="vision"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'vision' is not one of ['dense', 'gnn', 'nlp']" in err.value.details()
