"""The gateway's Redis result cache: hits, misses, bypass, and failing open when Redis is down."""

import time
import urllib.request

import grpc
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from shared.tensors import from_numpy, to_numpy


def predict_digits(channel, pixels, metadata=()):
    reply, call = dense_pb2_grpc.DenseServiceStub(channel).Predict.with_call(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(pixels)}),
        timeout=10,
        metadata=metadata,
    )
    return reply, dict(call.trailing_metadata())["maas-cache"]


def unique_pixels(seed):
    return np.random.default_rng(seed).integers(0, 17, size=(4, 64)).astype(np.float32)


def test_a_repeated_call_is_served_from_the_cache_and_a_changed_one_is_not(gateway_channel):
    pixels = unique_pixels(1)
    first, outcome = predict_digits(gateway_channel, pixels)
    assert outcome == "miss"
    second, outcome = predict_digits(gateway_channel, pixels)
    assert outcome == "hit"
    assert second == first
    changed = pixels.copy()
    changed[0, 0] += 1
    _, outcome = predict_digits(gateway_channel, changed)
    assert outcome == "miss"


def test_entries_have_a_ttl_and_a_key_naming_model_and_version(cluster, gateway_channel):
    predict_digits(gateway_channel, unique_pixels(2))
    client = redis.Redis.from_url(cluster.redis_url)
    keys = client.keys("maas:v1:result:dense:digits-mlp:1:*")
    assert keys
    assert all(0 < client.pttl(key) <= 300_000 * 1.1 for key in keys)


def test_a_call_can_bypass_the_cache(gateway_channel):
    pixels = unique_pixels(3)
    predict_digits(gateway_channel, pixels)
    _, outcome = predict_digits(gateway_channel, pixels, metadata=(("cache-control", "no-cache"),))
    assert outcome == "bypass"
    _, outcome = predict_digits(gateway_channel, pixels, metadata=(("cache-control", "no-store"),))
    assert outcome == "bypass"


def test_texts_are_cached_too(gateway_channel):
    stub = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    request = nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=["cache me", "twice"])
    first, call = stub.Predict.with_call(request, timeout=10)
    second, call = stub.Predict.with_call(request, timeout=10)
    assert dict(call.trailing_metadata())["maas-cache"] == "hit"
    np.testing.assert_array_equal(to_numpy(first.outputs["embedding"], "e"), to_numpy(second.outputs["embedding"], "e"))


def test_errors_are_not_cached(gateway_channel):
    stub = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(nlp_pb2.PredictRequest(model_name="sentiment", texts=[""]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def cache_errors(cluster) -> float:
    """The gateway's Prometheus counter of cache failures for dense calls."""
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{cluster.ports.gateway_metrics}/metrics", timeout=5).read().decode()
    )
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "maas_gateway_cache_total" and sample.labels == {"family": "dense", "outcome": "error"}:
                return sample.value
    return 0.0


def test_with_redis_stopped_calls_still_succeed_and_the_cache_comes_back(cluster, gateway_channel):
    expected, _ = predict_digits(gateway_channel, unique_pixels(4))
    errors_before = cache_errors(cluster)
    cluster.redis.stop()
    try:
        for seed in range(100, 103):  # inputs no worker has in memory, so each call needs Redis
            reply, outcome = predict_digits(gateway_channel, unique_pixels(seed))
            assert outcome == "error"
            assert len(reply.outputs["label"].data) == len(expected.outputs["label"].data)
        assert cache_errors(cluster) >= errors_before + 3
    finally:
        cluster.redis.start()
    # The gateway retries Redis after its back-off interval (1 s by default).
    deadline = time.monotonic() + 30
    outcomes = []
    seed = 200
    while time.monotonic() < deadline:
        seed += 1
        _, outcome = predict_digits(gateway_channel, unique_pixels(seed))
        outcomes.append(outcome)
        if outcome == "miss":  # Redis answered the read
            break
        time.sleep(0.2)
    assert outcomes[-1] == "miss", outcomes
    assert redis.Redis.from_url(cluster.redis_url).keys("maas:v1:result:dense:digits-mlp:*")


def redis_reads(client) -> int:
    return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_a_hit_in_the_workers_memory_makes_no_redis_call(cluster, gateway_channel):
    client = redis.Redis.from_url(cluster.redis_url)
    pixels = unique_pixels(5)
    first, outcome = predict_digits(gateway_channel, pixels)
    assert outcome == "miss"
    reads = redis_reads(client)
    for _ in range(5):  # one channel is one connection, so one gateway worker: the one that stored it
        reply, outcome = predict_digits(gateway_channel, pixels)
        assert outcome == "hit"
        assert reply == first
    assert redis_reads(client) == reads
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(
            urllib.request.urlopen(f"http://127.0.0.1:{cluster.ports.gateway_metrics}/metrics", timeout=5)
            .read()
            .decode()
        )
        for s in f.samples
    }
    assert samples[("maas_gateway_cache_local_hits_total", (("family", "dense"),))] >= 5
