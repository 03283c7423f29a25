"""Dynamic batching in a running dense service: a lone call takes the fast path, concurrent calls
still form batches, and each caller gets its own answer."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from services.dense.datasets import digits_split
from shared.tensors import from_numpy, to_numpy
from tests.tolerance import served

MODEL = "digits-cnn"


def metric(cluster, name: str, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.ports.dense_metrics}/metrics", timeout=5).read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("model") == f"{model}:1"
    )


def request(rows: np.ndarray) -> dense_pb2.PredictRequest:
    return dense_pb2.PredictRequest(model_name=MODEL, inputs={"image": from_numpy(rows.reshape(-1, 1, 8, 8))})


def test_a_lone_call_runs_at_once_on_the_fast_path(cluster):
    _, x_test, _, _ = digits_split()
    before = metric(cluster, "maas_batcher_fast_path_total", MODEL)
    with grpc.insecure_channel(cluster.specs["dense"].target) as channel:
        reply = dense_pb2_grpc.DenseServiceStub(channel).Predict(request(x_test[:1]), timeout=30)
    assert to_numpy(reply.outputs["label"], "label").shape == (1,)
    assert metric(cluster, "maas_batcher_fast_path_total", MODEL) == before + 1


def test_concurrent_calls_form_batches_and_each_gets_its_own_answer(cluster):
    _, x_test, _, _ = digits_split()
    requests = [request(x_test[i : i + 1]) for i in range(64)]
    count = metric(cluster, "maas_batch_size_count", MODEL)
    rows = metric(cluster, "maas_batch_size_sum", MODEL)
    with grpc.insecure_channel(cluster.specs["dense"].target) as channel:
        stub = dense_pb2_grpc.DenseServiceStub(channel)
        alone = [stub.Predict(r, timeout=30) for r in requests[:8]]
        batches_before = metric(cluster, "maas_batch_size_count", MODEL)
        for _ in range(5):  # 64 calls in flight at once, five times over
            futures = [stub.Predict.future(r, timeout=30) for r in requests]
            replies = [f.result() for f in futures]
    batches = metric(cluster, "maas_batch_size_count", MODEL) - batches_before
    batched_rows = metric(cluster, "maas_batch_size_sum", MODEL) - rows - 8
    assert metric(cluster, "maas_batch_size_count", MODEL) - count - 8 == batches
    assert batched_rows == 5 * 64
    assert batched_rows / batches > 1, f"{batches} batches for {batched_rows} rows: none was batched"
    for single, batched in zip(alone, replies, strict=False):
        np.testing.assert_allclose(
            to_numpy(batched.outputs["probabilities"], "p"), to_numpy(single.outputs["probabilities"], "p"), **served()
        )


def gateway_metric(cluster, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.ports.gateway_metrics}/metrics", timeout=5).read()
    return sum(
        s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == name and s.labels.get("family") == "dense"
    )


def test_calls_merged_on_the_gateway_hop_give_each_caller_its_own_answer(cluster, gateway_channel):
    _, x_test, _, _ = digits_split()
    requests = [request(x_test[i : i + 1 + i % 3]) for i in range(64)]  # one to three rows each
    uncached = (("cache-control", "no-store"),)
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    alone = [stub.Predict(r, timeout=30, metadata=uncached) for r in requests]
    calls = gateway_metric(cluster, "maas_gateway_hop_batch_requests_count")
    merged = gateway_metric(cluster, "maas_gateway_hop_batch_requests_sum")
    for _ in range(5):  # 64 calls in flight at once through the gateway, five times over
        futures = [stub.Predict.future(r, timeout=30, metadata=uncached) for r in requests]
        replies = [f.result() for f in futures]
        for single, together in zip(alone, replies, strict=True):
            assert together.model_version == single.model_version
            np.testing.assert_allclose(to_numpy(together.outputs["probabilities"], "p"),
                                       to_numpy(single.outputs["probabilities"], "p"), **served())  # fmt: skip
    calls = gateway_metric(cluster, "maas_gateway_hop_batch_requests_count") - calls
    merged = gateway_metric(cluster, "maas_gateway_hop_batch_requests_sum") - merged
    assert merged == 5 * 64
    assert merged / calls > 1, f"{calls} gateway → dense calls for {merged} requests: none was merged"
