"""ModelInfer's own cache entries: keyed on the Open Inference request, answered with its encoded response."""

from __future__ import annotations

import time

import grpc
import numpy as np
import redis
from tritonclient.grpc import service_pb2 as oip  # the same wire protocol; one copy of it per process
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from tests.e2e.test_cache import unique_pixels


def infer_digits(pixels, request_id="", outputs=(), parameters=None) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(
        model_name="digits-mlp", id=request_id,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=list(pixels.shape))],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
        raw_input_contents=[pixels.astype("<f4").tobytes()],
    )  # fmt: skip
    for name, value in (parameters or {}).items():
        request.parameters[name].string_param = value
    return request


def infer(channel, request, metadata=()) -> tuple[oip.ModelInferResponse, str]:
    reply, call = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=10,
                                                                                  metadata=metadata)  # fmt: skip
    return reply, dict(call.trailing_metadata())["maas-cache"]


def labels(reply: oip.ModelInferResponse) -> np.ndarray:
    index = [output.name for output in reply.outputs].index("label")
    return np.frombuffer(reply.raw_output_contents[index], dtype="<i8")


def test_a_repeated_infer_is_a_hit_with_the_same_answer_and_the_callers_id(gateway_channel):
    pixels = unique_pixels(301)
    first, outcome = infer(gateway_channel, infer_digits(pixels, "first-call"))
    assert outcome == "miss" and first.id == "first-call"
    second, outcome = infer(gateway_channel, infer_digits(pixels, "second-call"))
    assert outcome == "hit"
    assert second.id == "second-call"  # another id shares the entry and gets its own id back
    second.id = "first-call"
    assert second == first
    anonymous, outcome = infer(gateway_channel, infer_digits(pixels))
    assert outcome == "hit" and anonymous.id == "" and list(labels(anonymous)) == list(labels(first))


def test_another_input_output_or_parameter_is_another_entry(gateway_channel):
    pixels = unique_pixels(302)
    base, _ = infer(gateway_channel, infer_digits(pixels))
    changed = pixels.copy()
    changed[1, 5] += 1
    assert infer(gateway_channel, infer_digits(changed))[1] == "miss"
    only_label, outcome = infer(gateway_channel, infer_digits(pixels, outputs=["label"]))
    assert outcome == "miss" and [o.name for o in only_label.outputs] == ["label"]
    assert len(base.outputs) > 1  # the hit of the full request still has every output
    again, outcome = infer(gateway_channel, infer_digits(pixels))
    assert outcome == "hit" and again == base
    assert infer(gateway_channel, infer_digits(pixels, parameters={"note": "x"}))[1] == "miss"


def test_a_version_named_or_resolved_shares_one_entry(cluster, gateway_channel):
    pixels = unique_pixels(303)
    request = infer_digits(pixels)
    first, outcome = infer(gateway_channel, request)
    assert outcome == "miss" and first.model_version == "1"
    request.model_version = "1"
    named, outcome = infer(gateway_channel, request)
    assert outcome == "hit" and named == first
    # The entry is the encoded Open Inference response itself, without an id: a hit translates nothing.
    client = redis.Redis.from_url(cluster.redis_url)
    first.id = ""
    values = client.mget(client.keys("maas:v1:result:dense:digits-mlp:1:*"))
    assert first.SerializeToString() in values


def test_cache_control_bypasses_or_skips_the_read(gateway_channel):
    pixels = unique_pixels(304)
    infer(gateway_channel, infer_digits(pixels))
    assert infer(gateway_channel, infer_digits(pixels), (("cache-control", "no-cache"),))[1] == "bypass"
    assert infer(gateway_channel, infer_digits(pixels), (("cache-control", "no-store"),))[1] == "bypass"
    fresh = unique_pixels(305)
    assert infer(gateway_channel, infer_digits(fresh), (("cache-control", "no-store"),))[1] == "bypass"
    assert infer(gateway_channel, infer_digits(fresh))[1] == "miss"  # no-store stored nothing


def test_a_bad_request_is_refused_and_not_cached(gateway_channel):
    bad = infer_digits(np.zeros((1, 63), np.float32))
    for _ in range(2):
        try:
            infer(gateway_channel, bad)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("a 63-feature row was answered")


def test_with_redis_stopped_infer_still_answers(cluster, gateway_channel):
    expected, _ = infer(gateway_channel, infer_digits(unique_pixels(306)))
    cluster.redis.stop()
    try:
        for seed in range(400, 403):  # inputs no worker holds in memory, so each call would need Redis
            reply, outcome = infer(gateway_channel, infer_digits(unique_pixels(seed)))
            assert outcome == "error"
            assert len(labels(reply)) == len(labels(expected))
    finally:
        cluster.redis.start()
    # Redis is retried after the gateway's back-off interval (1 s by default): then entries are kept again.
    deadline, seed = time.monotonic() + 30, 500
    while time.monotonic() < deadline and infer(gateway_channel, infer_digits(unique_pixels(seed)))[1] != "miss":
        seed += 1
        time.sleep(0.2)
    assert infer(gateway_channel, infer_digits(unique_pixels(seed)))[1] == "hit"
