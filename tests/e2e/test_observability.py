"""Metrics on every server, request ids end to end, and JSON logs."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.tensors import from_numpy


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels) -> float:
    return sum(v for (n, have), v in samples.items() if n == name and labels.items() <= dict(have).items())


def test_each_server_exposes_requests_batches_and_model_state(cluster, gateway_channel):
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    request = dense_pb2.PredictRequest(
        model_name="digits-mlp", inputs={"pixels": from_numpy(np.ones((3, 64), np.float32))}
    )
    stub.Predict(request, timeout=10, metadata=(("cache-control", "no-store"),))
    dense = scrape(cluster.ports.dense_metrics)
    assert value(dense, "maas_requests_total", service="maas.dense.v1.DenseService", method="Predict",
                 model="digits-mlp", code="OK") >= 1  # fmt: skip
    assert value(dense, "maas_request_seconds_count", method="Predict", model="digits-mlp") >= 1
    assert value(dense, "maas_batch_size_count", model="digits-mlp:1") >= 1
    assert value(dense, "maas_model_state", model="digits-mlp", version="1", state="READY") == 1
    assert value(dense, "maas_queue_depth", model="digits-mlp:1") == 0
    gateway = scrape(cluster.ports.gateway_metrics)
    assert value(gateway, "maas_requests_total", service="maas.dense.v1.DenseService", code="OK") >= 1
    assert value(gateway, "maas_gateway_cache_total", family="dense") >= 1
    for family in ("gnn", "nlp"):
        assert value(scrape(getattr(cluster.ports, f"{family}_metrics")), "maas_model_state", state="READY") >= 1


def test_errors_are_counted_by_status_code(cluster, gateway_channel):
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    before = value(scrape(cluster.ports.dense_metrics), "maas_requests_total", code="NOT_FOUND")
    with pytest.raises(grpc.RpcError):  # a model the service holds, in a version it does not
        stub.Predict(dense_pb2.PredictRequest(model_name="digits-mlp", model_version=999), timeout=10)
    assert value(scrape(cluster.ports.dense_metrics), "maas_requests_total", code="NOT_FOUND") == before + 1
    # A model no service holds is answered at the gateway (its catalog fails closed): the service never sees it.
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(dense_pb2.PredictRequest(model_name="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope' not found" in err.value.details()
    assert value(scrape(cluster.ports.dense_metrics), "maas_requests_total", code="NOT_FOUND") == before + 1


def test_the_request_id_comes_back_and_reaches_the_backends_json_log(cluster, gateway_channel):
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    _, call = stub.Predict.with_call(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(np.ones((1, 64), np.float32))}),
        timeout=10,
        metadata=(("x-request-id", "req-ok-1"),),
    )
    assert dict(call.trailing_metadata())["x-request-id"] == "req-ok-1"
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(dense_pb2.PredictRequest(model_name="digits-mlp", model_version=999), timeout=10,
                     metadata=(("x-request-id", "req-failed-2"),))  # fmt: skip
    assert dict(err.value.trailing_metadata())["x-request-id"] == "req-failed-2"
    # Without an id from the caller, the gateway makes one.
    _, call = stub.Predict.with_call(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(np.ones((1, 64), np.float32))}),
        timeout=10,
    )
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 32

    log_file = cluster.log_dir / "dense.log"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
        failed = [line for line in lines if line.get("request_id") == "req-failed-2"]
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert failed and "NOT_FOUND" in failed[0]["message"] and failed[0]["process"] == "dense"


def test_trainers_expose_metrics_too(cluster):
    for family in ("dense", "gnn", "nlp"):
        port = getattr(cluster.ports, f"{family}_trainer_metrics")
        deadline = time.monotonic() + 60  # a trainer has no health port; it may still be importing torch
        while True:
            try:
                samples = scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline, f"{family} trainer serves no metrics"
                time.sleep(0.5)
        assert value(samples, "process_resident_memory_bytes") > 0
