"""Two replicas of the dense service behind the gateway: round robin, a replica killed or stopped
under load while the gateway merges calls to them, and traffic back on it once it returns."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.cluster import ClusterPorts, LocalCluster
from shared.tensors import from_numpy
from tests.metrics import hop_batch_totals

NO_CACHE = (("cache-control", "no-store"),)


@pytest.fixture(scope="module")
def replicated(model_store, tmp_path_factory):
    var = tmp_path_factory.mktemp("replicated")
    shutil.copytree(model_store.root, var / "models")
    # This cluster also traces, into files, so a test can follow one call across processes.
    tracing = {"MAAS_GATEWAY_TRACING": f"file:{var / 'gateway-spans.jsonl'}",
               "MAAS_DENSE_TRACING": f"file:{var / 'dense-spans.jsonl'}"}  # fmt: skip
    cluster = LocalCluster(ClusterPorts.free(), var / "models", var, log_dir=var / "logs", replicas={"dense": 2},
                           extra_env=tracing)  # fmt: skip
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def predictions_served(cluster, name: str) -> float:
    spec = cluster.specs[name]
    port = spec.env["MAAS_DENSE_METRICS_PORT"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "maas_requests_total" and sample.labels.get("method") == "Predict"
    )


class Load:
    """Callers sending distinct dense Predicts through the gateway until stopped: nothing is coalesced
    or cached, so the hop batcher merges the requests that queue while its calls are busy."""

    def __init__(self, cluster, callers: int = 16) -> None:
        self.target = cluster.specs["gateway"].target
        self.counts = {"ok": 0, "failed": 0}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._caller, args=(i,)) for i in range(callers)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @property
    def total(self) -> int:
        return self.counts["ok"] + self.counts["failed"]

    def _caller(self, index: int) -> None:
        rows = np.zeros((1, 64), np.float32)
        rows[0, 0] = index
        with grpc.insecure_channel(self.target) as channel:
            stub = dense_pb2_grpc.DenseServiceStub(channel)
            calls = 0
            while not self._stop.is_set():
                calls += 1
                rows[0, 1] = calls  # every call of every caller differs
                request = dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(rows)})
                try:
                    reply = stub.Predict(request, timeout=10, metadata=NO_CACHE)
                    outcome = "ok" if list(reply.outputs["label"].shape) == [1] else "failed"
                    if outcome == "failed":
                        self.errors.append(f"a reply of shape {list(reply.outputs['label'].shape)} for 1 row")
                except grpc.RpcError as exc:
                    outcome = "failed"
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                with self._lock:
                    self.counts[outcome] += 1


def test_a_replica_killed_under_load_costs_under_a_thousandth_of_the_calls(replicated):
    metrics_port = replicated.specs["gateway"].env["MAAS_GATEWAY_METRICS_PORT"]
    sent_before = hop_batch_totals(metrics_port)
    with Load(replicated) as load:
        time.sleep(2)
        assert predictions_served(replicated, "dense-2") > 0  # both replicas take traffic
        replicated.stop_process("dense-2", signal.SIGKILL)
        time.sleep(3)
        replicated.start_process("dense-2")
        replicated.wait_serving("dense-2")
        time.sleep(4)
    sent_after = hop_batch_totals(metrics_port)
    requests, calls = (after - before for after, before in zip(sent_after, sent_before, strict=True))
    assert requests > calls, "no merged call travelled to the replicas: the test did not load the hop"
    assert load.total > 500
    assert load.counts["failed"] / load.total < 0.001, load.errors[:5]
    # The restarted replica is back in the rotation.
    assert predictions_served(replicated, "dense-2") > 0


def test_a_replica_stopped_under_load_drains_with_no_failed_call(replicated):
    # Two things keep this at zero: the replica's drain (the calls it holds finish) and the channel's
    # UNAVAILABLE retries (a call it cancels goes to the other replica). Either alone holds; with
    # neither, merged calls in flight on the stopped replica fail.
    metrics_port = replicated.specs["gateway"].env["MAAS_GATEWAY_METRICS_PORT"]
    sent_before = hop_batch_totals(metrics_port)
    with Load(replicated) as load:
        time.sleep(2)
        assert predictions_served(replicated, "dense-2") > 0
        before_stop = load.total
        replicated.stop_process("dense-2", signal.SIGTERM)  # returns once it has exited
        assert load.total > before_stop
        time.sleep(2)
    replicated.start_process("dense-2")
    replicated.wait_serving("dense-2")
    sent_after = hop_batch_totals(metrics_port)
    requests, calls = (after - before for after, before in zip(sent_after, sent_before, strict=True))
    assert requests > calls, "no merged call travelled to the replicas: the test did not load the hop"
    assert load.total > 500
    assert load.counts["failed"] == 0, load.errors[:5]


def spans(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_trace_runs_from_the_gateway_into_the_model_service(replicated):
    stub_channel = grpc.insecure_channel(replicated.specs["gateway"].target)
    stub = dense_pb2_grpc.DenseServiceStub(stub_channel)
    request = dense_pb2.PredictRequest(
        model_name="digits-mlp", inputs={"pixels": from_numpy(np.ones((1, 64), np.float32))}
    )
    stub.Predict(request, timeout=10, metadata=NO_CACHE + (("x-request-id", "traced-call-1"),))
    stub_channel.close()
    var = replicated.var_dir

    def find():
        server = [s for s in spans(var / "gateway-spans.jsonl")
                  if s["attributes"].get("maas.request_id") == "traced-call-1"]  # fmt: skip
        if not server:
            return None
        trace_id = server[0]["context"]["trace_id"]
        client = [s for s in spans(var / "gateway-spans.jsonl")
                  if s["context"]["trace_id"] == trace_id and s["kind"] == "SpanKind.CLIENT"]  # fmt: skip
        backend = [s for s in spans(var / "dense-spans.jsonl") if s["context"]["trace_id"] == trace_id]
        return (server[0], client, backend) if client and backend else None

    deadline = time.monotonic() + 10
    while (found := find()) is None:
        assert time.monotonic() < deadline, "the trace did not reach the dense service"
        time.sleep(0.2)
    server, client, backend = found
    assert server["name"].endswith("maas.dense.v1.DenseService/Predict") and server["kind"] == "SpanKind.SERVER"
    assert server["attributes"]["rpc.method"] == "Predict"
    assert client[0]["parent_id"] == server["context"]["span_id"]
    assert client[0]["name"].endswith("maas.dense.v1.DenseService/Predict")
    assert backend[0]["parent_id"] == client[0]["context"]["span_id"]
    assert backend[0]["attributes"]["maas.request_id"] == "traced-call-1"
    assert backend[0]["resource"]["attributes"]["service.name"] == "maas-dense"
