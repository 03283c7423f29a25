"""Malformed requests for every rpc of every service, native and Open Inference, at the gateway and at
each model service directly, and malformed data-set uploads (hypothesis).

Every call must end in a status that says what was wrong (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, ...), never INTERNAL or UNKNOWN; every server must stay up; and a health
check sent to each server meanwhile must answer within its one-second deadline.

`MAAS_FUZZ_EXAMPLES` sets the cases per rpc (60 by default, four times that for rpcs with valid
seed requests to mutate: a few thousand in all); set it higher for a longer hunt. Examples are
derandomized, so a CI failure reproduces.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip  # the Open Inference wire protocol (one copy per process)

from maas.gateway.v1 import gateway_pb2
from maas.models.v1 import models_pb2
from maas.training.v1 import training_pb2
from shared.families import FAMILIES
from tests.fuzz.strategies import wire

EXAMPLES = int(os.environ.get("MAAS_FUZZ_EXAMPLES", "60"))
# Rpcs with valid seed requests are fuzzed longer: mutations of a valid request find the most.
SEEDED_EXAMPLES = EXAMPLES * 4
REFUSED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
REAL_MODELS = {"digits-mlp", "digits-cnn", "sine-gru", "karate-gcn", "minilm-l6-v2", "sentiment"}
# Calls that would change the shared cluster for the other tests when they name a real model.
DESTRUCTIVE = {"UnloadModel", "SetDefaultVersion", "SetCanary", "RepositoryModelUnload", "LoadModel",
               "RepositoryModelLoad"}  # fmt: skip


@dataclass(frozen=True)
class Rpc:
    server: str  # "gateway" or a family's process name
    service: str
    method: str
    request: type
    streaming: str  # "unary", "client", "server" or "bidi"

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    def __str__(self) -> str:
        return f"{self.server}:{self.service.rsplit('.', 1)[-1]}.{self.method}"


def _rpcs_of(server: str, module, service_name: str) -> list[Rpc]:
    service = module.DESCRIPTOR.services_by_name[service_name]
    found = []
    for method in service.methods:
        request = getattr(module, method.input_type.name, None) or _nested_class(module, method.input_type)
        kind = ("bidi" if method.client_streaming and method.server_streaming else "client" if method.client_streaming
                else "server" if method.server_streaming else "unary")  # fmt: skip
        found.append(Rpc(server, service.full_name, method.name, request, kind))
    return found


def _nested_class(module, descriptor):
    return getattr(module, descriptor.name)


def all_rpcs() -> list[Rpc]:
    rpcs = []
    for family in FAMILIES:
        pb2 = family.pb2()
        for server in ("gateway", family.name):
            rpcs += _rpcs_of(server, pb2, family.service_name)
            rpcs += _rpcs_of(server, models_pb2, "ModelService")
    rpcs += _rpcs_of("gateway", gateway_pb2, "GatewayService")
    rpcs += _rpcs_of("gateway", training_pb2, "TrainingService")
    rpcs += _rpcs_of("gateway", oip, "GRPCInferenceService")
    unique = {(r.server, r.path): r for r in rpcs}
    return list(unique.values())


RPCS = all_rpcs()


class HealthWatch:
    """Checks every server's health every 0.2 s, with a one-second deadline, while the fuzzing runs."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.channels = {name: grpc.insecure_channel(target) for name, target in targets.items()}
        self.failures: list[str] = []
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, channel in self.channels.items():
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        self.failures.append(
                            f"{name}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                        )
                except grpc.RpcError as exc:
                    self.failures.append(f"{name}: {exc.code().name} {exc.details()}")
                self.checks += 1

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for channel in self.channels.values():
            channel.close()


@pytest.fixture(scope="module")
def servers(cluster):
    targets = {"gateway": cluster.specs["gateway"].target}
    targets.update({family.name: cluster.specs[family.name].target for family in FAMILIES})
    channels = {name: grpc.insecure_channel(target) for name, target in targets.items()}
    with HealthWatch(targets) as watch:
        yield channels, watch
    for channel in channels.values():
        channel.close()
    assert watch.checks > 0
    assert not watch.failures, f"health checks failed while fuzzing: {watch.failures[:5]}"
    for name, process in cluster.processes.items():
        assert process.poll() is None, f"{name} died while fuzzing"


def names_a_real_model(rpc: Rpc, raw: bytes) -> bool:
    try:
        request = rpc.request.FromString(raw)
    except DecodeError:
        return False
    return any(getattr(request, field, "") in REAL_MODELS for field in ("model_name", "name"))


def call(channel: grpc.Channel, rpc: Rpc, parts: list[bytes]) -> grpc.StatusCode:
    try:
        if rpc.streaming == "client":
            channel.stream_unary(rpc.path)(iter(parts), timeout=10)
        elif rpc.streaming == "bidi":  # ModelStreamInfer: a failed message is a response of its own
            for response in channel.stream_stream(rpc.path)(iter(parts), timeout=10):
                assert b"[StatusCode.INTERNAL]" not in response[:32], f"{rpc} answered {response[:200]!r}"
        elif rpc.streaming == "server":
            stream = channel.unary_stream(rpc.path)(parts[0], timeout=2)
            for _ in zip(range(3), stream, strict=False):  # a few events are enough; then the call is cut short
                pass
            stream.cancel()
        else:
            channel.unary_unary(rpc.path)(parts[0], timeout=10)
    except grpc.RpcError as exc:
        if rpc.streaming == "server" and exc.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            return grpc.StatusCode.OK  # cut short by this test, not refused by the server
        assert exc.code() not in REFUSED, f"{rpc} answered {exc.code().name}: {exc.details()}"
        return exc.code()
    return grpc.StatusCode.OK


def seeds() -> dict[str, list]:
    """Valid requests, by message name, that the fuzzer makes one field odd in."""
    import numpy as np

    from maas.dense.v1 import dense_pb2
    from maas.gnn.v1 import gnn_pb2
    from maas.nlp.v1 import nlp_pb2
    from shared.tensors import from_numpy

    pixels = from_numpy(np.zeros((2, 64), np.float32))
    dense = dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": pixels}, output_names=["label"])
    gnn = gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0, 1])
    inline = gnn_pb2.PredictRequest(
        model_name="karate-gcn",
        graph=gnn_pb2.Graph(node_features=from_numpy(np.eye(3, 34, dtype=np.float32)),
                            edge_index=from_numpy(np.array([[0, 1], [1, 2]], np.int64))),
        node_ids=[0],
    )  # fmt: skip
    nlp = nlp_pb2.PredictRequest(model_name="sentiment", texts=["fine", "awful"])
    infer = oip.ModelInferRequest(
        model_name="digits-mlp",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[bytes(256)],
    )
    # Submissions that pass share one idempotency key: at most one small job ever runs.
    submit = training_pb2.SubmitJobRequest(family=training_pb2.FAMILY_DENSE, architecture="mlp", epochs=1,
                                           builtin_dataset="iris", output_model="fuzz-iris",
                                           idempotency_key="fuzz-once")  # fmt: skip
    fanout = gateway_pb2.FanoutRequest(steps=[gateway_pb2.FanoutStep(name="a", dense=dense)])
    return {
        "maas.dense.v1.PredictRequest": [dense],
        "maas.gnn.v1.PredictRequest": [gnn, inline],
        "maas.nlp.v1.PredictRequest": [nlp],
        "inference.ModelInferRequest": [infer],
        "maas.training.v1.SubmitJobRequest": [submit],
        "maas.gateway.v1.FanoutRequest": [fanout],
    }


SEEDS = seeds()


def requests_for(rpc: Rpc):
    if rpc.streaming == "client":  # UploadDataset: an info message (or not), then chunks (or not)
        return st.lists(wire(rpc.request), min_size=0, max_size=4)
    if rpc.streaming == "bidi":  # ModelStreamInfer: several calls, each odd in its own way
        return st.lists(wire(rpc.request, SEEDS.get(rpc.request.DESCRIPTOR.full_name, ())), min_size=0, max_size=4)
    return wire(rpc.request, SEEDS.get(rpc.request.DESCRIPTOR.full_name, ())).map(lambda raw: [raw])


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_malformed_requests_get_a_status_never_internal(servers, rpc):
    channels, watch = servers
    channel = channels[rpc.server]

    @settings(
        max_examples=SEEDED_EXAMPLES if rpc.request.DESCRIPTOR.full_name in SEEDS else EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(requests_for(rpc))
    def fuzz(parts):
        if rpc.method in DESTRUCTIVE and any(names_a_real_model(rpc, raw) for raw in parts):
            return
        if rpc.streaming not in ("client", "bidi") and not parts:
            return
        call(channel, rpc, parts)

    fuzz()
    assert not watch.failures, f"health checks failed while fuzzing {rpc}: {watch.failures[:3]}"


@settings(max_examples=EXAMPLES * 3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(
    family=st.sampled_from([f.training_code for f in FAMILIES] + [0, 99]),
    fmt=st.integers(0, 6),
    chunks=st.lists(st.one_of(st.binary(max_size=2048), st.sampled_from([
        b"PK\x03\x04" + b"\x00" * 64,  # a zip header and nothing behind it
        b"a,b,label\n1,2,x\n",
        b'{"text": "ok", "label": 1}\n{"text": ',
        b'{"node_features": [[1e999]], "edge_index": [[0], [5]], "labels": [0]}',
        b"\xff\xfe\x00\x00",
    ])), max_size=5),
)  # fmt: skip
def test_malformed_data_set_uploads_are_refused_or_stored_never_internal(servers, family, fmt, chunks):
    channels, _ = servers
    info = training_pb2.UploadDatasetRequest(info=training_pb2.DatasetInfo(name="fuzz", family=family, format=fmt))
    parts = [info.SerializeToString()] + [
        training_pb2.UploadDatasetRequest(chunk=c).SerializeToString() for c in chunks
    ]
    rpc = next(r for r in RPCS if r.method == "UploadDataset")
    call(channels["gateway"], rpc, parts)


def test_every_rpc_is_fuzzed():
    """A new rpc is fuzzed without anyone listing it: the list is read off the services' descriptors."""
    names = {f"{r.server}:{r.method}" for r in RPCS}
    for expected in ("gateway:Predict", "gateway:ModelInfer", "gateway:UploadDataset", "gateway:WatchJob",
                     "gateway:Fanout", "gateway:LoadModel", "dense:Predict", "nlp:SetDefaultVersion"):  # fmt: skip
        assert expected in names
    assert len(RPCS) >= 45
