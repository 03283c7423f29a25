"""Two replicas of the dense service behind the gateway: round robin, a replica killed under
load, and traffic back on it once it returns."""

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


def test_a_replica_killed_under_load_costs_under_a_thousandth_of_the_calls(replicated):
    request = dense_pb2.PredictRequest(
        model_name="digits-mlp", inputs={"pixels": from_numpy(np.ones((2, 64), np.float32))}
    )
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def caller():
        with grpc.insecure_channel(replicated.specs["gateway"].target) as channel:
            stub = dense_pb2_grpc.DenseServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.Predict(request, timeout=10, metadata=NO_CACHE)
                    outcome = "ok"
                except grpc.RpcError as exc:
                    outcome = "failed"
                    errors.append(f"{exc.code().name}: {exc.details()}")
                with lock:
                    counts[outcome] += 1

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    assert predictions_served(replicated, "dense-2") > 0  # both replicas take traffic
    replicated.stop_process("dense-2", signal.SIGKILL)
    time.sleep(3)
    replicated.start_process("dense-2")
    replicated.wait_serving("dense-2")
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join()
    total = counts["ok"] + counts["failed"]
    assert total > 500
    assert counts["failed"] / total < 0.001, errors[:5]
    # The restarted replica is back in the rotation.
    assert predictions_served(replicated, "dense-2") > 0


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
