"""Triton's ModelStreamInfer on the gateway: many calls on one stream, errors per response."""

from __future__ import annotations

import queue
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as oip  # the same wire protocol; one copy of it per process
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from services.dense.datasets import digits_split
from tests.e2e.test_open_inference import perf_analyzer
from tests.e2e.test_open_inference_cache import infer_digits


def stream(channel, requests, metadata=(), timeout=30) -> list[oip.ModelStreamInferResponse]:
    return list(oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=timeout,
                                                                            metadata=metadata))  # fmt: skip


def test_tritonclient_streams_calls_and_gets_each_answer_by_id(cluster):
    _, x_test, _, y_test = digits_split()
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(cluster.specs["gateway"].target) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(40):
            pixels = triton.InferInput("pixels", [1, 64], "FP32")
            pixels.set_data_from_numpy(x_test[i : i + 1])
            client.async_stream_infer("digits-mlp", [pixels], request_id=f"row-{i}",
                                      outputs=[triton.InferRequestedOutput("label")])  # fmt: skip
        got = {}
        for _ in range(40):
            result, error = answers.get(timeout=30)
            assert error is None, error
            got[result.get_response().id] = int(result.as_numpy("label")[0])
        client.stop_stream()
    assert sorted(got) == sorted(f"row-{i}" for i in range(40))
    accuracy = np.mean([got[f"row-{i}"] == y_test[i] for i in range(40)])
    assert accuracy >= 0.9


def test_one_bad_call_fails_alone_and_the_stream_goes_on(gateway_channel):
    good = infer_digits(np.ones((1, 64), np.float32), "good-1")
    short_row = infer_digits(np.ones((1, 63), np.float32), "short-row")
    unknown = oip.ModelInferRequest(model_name="no-such-model", id="unknown")
    later = infer_digits(np.zeros((1, 64), np.float32), "good-2")
    responses = {r.infer_response.id: r for r in stream(gateway_channel, [good, short_row, unknown, later])}
    assert set(responses) == {"good-1", "short-row", "unknown", "good-2"}
    assert responses["good-1"].error_message == "" and responses["good-2"].error_message == ""
    assert "label" in [o.name for o in responses["good-2"].infer_response.outputs]  # outputs come in any order
    assert responses["short-row"].error_message.startswith("[StatusCode.INVALID_ARGUMENT]")
    assert "pixels" in responses["short-row"].error_message  # it names the input
    assert responses["unknown"].error_message == "[StatusCode.NOT_FOUND] model 'no-such-model' not found"
    assert responses["unknown"].infer_response.model_name == "no-such-model"


def test_stream_answers_equal_unary_ones_for_every_family(gateway_channel):
    texts = oip.ModelInferRequest(model_name="sentiment", id="nlp",
                                  inputs=[oip.ModelInferRequest.InferInputTensor(name="texts", datatype="BYTES",
                                                                                 shape=[1])],
                                  raw_input_contents=[len(b"great").to_bytes(4, "little") + b"great"])  # fmt: skip
    requests = [infer_digits(np.ones((2, 64), np.float32), "dense"), texts]
    unary = oip_grpc.GRPCInferenceServiceStub(gateway_channel).ModelInfer
    streamed = {r.infer_response.id: r for r in stream(gateway_channel, requests)}
    for request in requests:
        assert streamed[request.id].error_message == ""
        assert streamed[request.id].infer_response == unary(request, timeout=10)


def test_the_gateway_keeps_serving_after_a_client_drops_its_stream(cluster, gateway_channel):
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        requests = (infer_digits(np.random.default_rng(i).random((1, 64), np.float32), f"r{i}") for i in range(10_000))
        call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests, timeout=60)
        next(call)
        call.cancel()
    after = stream(gateway_channel, [infer_digits(np.ones((1, 64), np.float32), "after")])
    assert after[0].error_message == "" and after[0].infer_response.id == "after"


def test_a_client_that_writes_without_reading_stops_being_read_and_then_gets_every_answer(cluster):
    # 16 KiB requests, offered without end (up to `cap`, 640 MB): what the transports buffer both ways
    # (flow-control windows grow with BDP probing) is some thousands, far below it.
    cap, pulled, stop = 40_000, 0, threading.Event()
    request = infer_digits(np.ones((64, 64), np.float32), "unread")

    def requests():
        nonlocal pulled
        while pulled < cap and not stop.is_set():
            pulled += 1
            yield request

    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=300)
        # Nothing is read: the gateway holds a bounded number of answers and stops taking requests.
        last, unchanged, deadline = -1, 0, time.monotonic() + 120
        while unchanged < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
            unchanged, last = (unchanged + 1, last) if pulled == last else (0, pulled)
        assert unchanged == 4 and pulled < cap, f"the gateway kept reading ({pulled} requests) while no answer was read"
        # Reading frees it: the stream goes on, every request sent is answered, and it ends.
        stop.set()
        answers = list(call)
    assert len(answers) == pulled
    assert all(a.error_message == "" and a.infer_response.id == "unread" for a in answers)


def test_a_message_that_is_not_a_request_ends_the_stream_with_invalid_argument(cluster):
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(iter([b"\xff\xff\xff"]),
                                                                                          timeout=10)  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_perf_analyzer_streams_against_the_gateway(cluster):
    binary, env = perf_analyzer()
    result = subprocess.run(
        [str(binary), "-m", "digits-mlp", "-u", cluster.specs["gateway"].target, "-i", "grpc", "--streaming",
         "--concurrency-range", "4", "--measurement-interval", "1000", "--stability-percentage", "999"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Concurrency: 4, throughput:" in result.stdout
