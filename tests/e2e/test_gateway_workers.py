"""Two gateway workers on one port: both answer calls, /metrics counts both, and SIGTERM drains both.
A model service drains its calls on SIGTERM too."""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from shared.cluster import ClusterPorts, LocalCluster, health_status
from shared.tensors import from_numpy

NO_CACHE = (("cache-control", "no-store"),)
# The dense service holds each call in its batcher for this long, waiting for batch-mates: calls
# stay in flight for a known time, whatever the speed of the machine.
HOLD_S = 3.0


@pytest.fixture(scope="module")
def two_workers(model_store, tmp_path_factory):
    var = tmp_path_factory.mktemp("workers")
    shutil.copytree(model_store.root, var / "models")
    hold = {"MAAS_DENSE_MAX_QUEUE_DELAY_US": str(int(HOLD_S * 1e6)), "MAAS_DENSE_MAX_BATCH_SIZE": "4096"}
    cluster = LocalCluster(
        ClusterPorts.free(), var / "models", var, log_dir=var / "logs", extra_env=hold, gateway_workers=2
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def channels(target: str, count: int) -> list[grpc.Channel]:
    """Channels that each open their own connection, so the kernel spreads them over the workers."""
    return [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


def workers(cluster) -> list[psutil.Process]:
    return psutil.Process(cluster.processes["gateway"].pid).children()


def connections_on(process: psutil.Process, port: int) -> int:
    return sum(1 for c in process.net_connections("tcp") if c.status == "ESTABLISHED" and c.laddr.port == port)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def gnn_calls_counted(cluster) -> float:
    return sum(
        v
        for (name, labels), v in scrape(cluster.ports.gateway_metrics).items()
        if name == "maas_requests_total" and dict(labels).get("service") == "maas.gnn.v1.GnnService"
        and dict(labels).get("method") == "Predict"
    )  # fmt: skip


def test_both_workers_answer_and_metrics_count_the_calls_of_both(two_workers):
    cluster = two_workers
    assert len(workers(cluster)) == 2
    before = gnn_calls_counted(cluster)
    opened = channels(cluster.specs["gateway"].target, 16)
    try:
        request = gnn_pb2.PredictRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0, 33])
        for channel in opened:
            for _ in range(3):
                reply = gnn_pb2_grpc.GnnServiceStub(channel).Predict(request, timeout=30, metadata=NO_CACHE)
                assert list(reply.node_ids) == [0, 33]
        # 16 connections, hashed over 2 listeners by the kernel: each worker holds some of them.
        per_worker = [connections_on(w, cluster.ports.gateway) for w in workers(cluster)]
        assert all(count > 0 for count in per_worker), per_worker
        assert sum(per_worker) >= 16
        assert gnn_calls_counted(cluster) == before + 16 * 3
    finally:
        for channel in opened:
            channel.close()


def queued(cluster) -> float:
    samples = scrape(cluster.ports.dense_metrics)
    return sum(v for (name, _), v in samples.items() if name == "maas_queue_depth")


def test_sigterm_drains_the_calls_in_flight_on_both_workers(two_workers):
    cluster = two_workers
    gateway = cluster.processes["gateway"]
    serving = workers(cluster)
    opened = channels(cluster.specs["gateway"].target, 16)
    # Distinct inputs, so that no worker coalesces two of them into one backend call.
    requests = [
        dense_pb2.PredictRequest(
            model_name="digits-mlp", inputs={"pixels": from_numpy(np.full((1, 64), i, np.float32))}
        )
        for i in range(16)
    ]
    try:
        with ThreadPoolExecutor(16) as pool:
            calls = [
                pool.submit(dense_pb2_grpc.DenseServiceStub(c).Predict, r, timeout=60, metadata=NO_CACHE)
                for c, r in zip(opened, requests, strict=True)
            ]
            deadline = time.monotonic() + HOLD_S
            while queued(cluster) < 16:  # every call has reached the dense service through a worker
                assert time.monotonic() < deadline, "the calls did not all arrive"
                time.sleep(0.05)
            assert all(connections_on(w, cluster.ports.gateway) > 0 for w in serving)
            gateway.send_signal(signal.SIGTERM)
            replies = [call.result() for call in calls]  # none fails
        assert [r.model_name for r in replies] == ["digits-mlp"] * 16
        assert gateway.wait(30) == 0
        assert not any(w.is_running() for w in serving)
    finally:
        for channel in opened:
            channel.close()
        cluster.start_process("gateway")
        cluster.wait_serving("gateway")


def test_sigterm_drains_a_model_service_after_health_turns_not_serving(two_workers):
    cluster = two_workers
    dense = cluster.processes["dense"]
    requests = [
        dense_pb2.PredictRequest(
            model_name="digits-mlp", inputs={"pixels": from_numpy(np.full((2, 64), i, np.float32))}
        )
        for i in range(4)
    ]
    with grpc.insecure_channel(cluster.specs["dense"].target) as channel, ThreadPoolExecutor(4) as pool:
        stub = dense_pb2_grpc.DenseServiceStub(channel)
        calls = [pool.submit(stub.Predict, r, timeout=60) for r in requests]
        deadline = time.monotonic() + HOLD_S
        while queued(cluster) < 4:
            assert time.monotonic() < deadline, "the calls did not all arrive"
            time.sleep(0.05)
        dense.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Health turns NOT_SERVING first, so balancers stop sending new calls ...
        assert health_status(cluster.specs["dense"].target) != health_pb2.HealthCheckResponse.SERVING
        # ... and the calls in flight still complete.
        assert [len(call.result().outputs["label"].data) for call in calls] == [16] * 4
    assert dense.wait(30) == 0
    cluster.start_process("dense")
    cluster.wait_serving("dense")


def test_workers_stop_when_their_supervisor_is_killed(two_workers):
    cluster = two_workers
    orphans = workers(cluster)
    cluster.processes["gateway"].send_signal(signal.SIGKILL)
    cluster.processes["gateway"].wait(10)
    try:
        _, alive = psutil.wait_procs(orphans, timeout=15)
        assert not alive, "workers outlived their supervisor"
    finally:
        cluster.start_process("gateway")
        cluster.wait_serving("gateway")
