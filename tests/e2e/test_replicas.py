"""Two replicas of the dense service behind the gateway: round robin, a replica killed under
load, and traffic back on it once it returns."""

from __future__ import annotations

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
    cluster = LocalCluster(ClusterPorts.free(), var / "models", var, log_dir=var / "logs", replicas={"dense": 2})
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
