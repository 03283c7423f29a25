"""Fan-out through the gateway: parallel steps across families, chaining, and per-step failures."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from services.nlp.defaults import SENTIMENT_DATA
from shared.tensors import from_numpy, to_numpy
from tests.e2e.test_training import served_version, upload, wait_for, watch


@pytest.fixture(scope="module")
def fanout(gateway_channel):
    return gateway_pb2_grpc.GatewayServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def embedding_classifier(gateway_channel):
    """A dense classifier trained, through the training API, on MiniLM embeddings of the sentiment set."""
    records = [json.loads(line) for line in SENTIMENT_DATA.read_text().splitlines()]
    texts = [r["text"] for r in records]
    labels = np.array([r["label"] == "positive" for r in records], dtype=np.int64)
    reply = nlp_pb2_grpc.NlpServiceStub(gateway_channel).Predict(
        nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=texts), timeout=60
    )
    buffer = io.BytesIO()
    np.savez(buffer, x=to_numpy(reply.outputs["embedding"], "embedding"), labels=labels)
    training = training_pb2_grpc.TrainingServiceStub(gateway_channel)
    dataset = upload(training, "sentiment-embeddings", t.FAMILY_DENSE, t.DATASET_FORMAT_NPZ, buffer.getvalue())
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[32], learning_rate=0.01,
                           epochs=30, batch_size=16, dataset_id=dataset.dataset_id, output_model="embedding-sentiment"),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    probe = dense_pb2.PredictRequest(
        model_name="embedding-sentiment", inputs={"x": from_numpy(np.zeros((1, 384), np.float32))}
    )
    wait_for(lambda: served_version(lambda: stub.Predict.with_call(probe, timeout=10)), what="classifier served")
    return "embedding-sentiment"


def test_parallel_steps_with_a_chain_and_a_failing_step(fanout, embedding_classifier):
    request = gateway_pb2.FanoutRequest(
        steps=[
            gateway_pb2.FanoutStep(name="embed", nlp=nlp_pb2.PredictRequest(
                model_name="minilm-l6-v2", texts=["What a wonderful day, I love it!", "The worst, I hate it."])),
            gateway_pb2.FanoutStep(
                name="classify",
                dense=dense_pb2.PredictRequest(model_name=embedding_classifier),
                inputs_from=[gateway_pb2.StepInput(input="x", step="embed", output="embedding")],
            ),
            gateway_pb2.FanoutStep(name="graph", gnn=gnn_pb2.PredictRequest(
                model_name="karate-gcn", stored_graph="karate", node_ids=[0, 33])),
            gateway_pb2.FanoutStep(name="broken", dense=dense_pb2.PredictRequest(model_name="no-such-model")),
            gateway_pb2.FanoutStep(
                name="after-broken",
                dense=dense_pb2.PredictRequest(model_name="digits-mlp"),
                inputs_from=[gateway_pb2.StepInput(input="pixels", step="broken", output="label")],
            ),
        ]
    )  # fmt: skip
    results = {r.name: r for r in fanout.Fanout(request, timeout=60).results}
    assert list(results) == ["embed", "classify", "graph", "broken", "after-broken"]
    assert results["embed"].code == 0 and results["classify"].code == 0 and results["graph"].code == 0
    assert to_numpy(results["classify"].dense.outputs["label"], "label").tolist() == [1, 0]
    assert list(results["graph"].gnn.node_ids) == [0, 33]
    assert results["broken"].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-model" in results["broken"].message
    assert results["after-broken"].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "'broken'" in results["after-broken"].message


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([], "at least one step"),
        ([gateway_pb2.FanoutStep(name="a", nlp=nlp_pb2.PredictRequest(model_name="sentiment", texts=["x"])),
          gateway_pb2.FanoutStep(name="a", nlp=nlp_pb2.PredictRequest(model_name="sentiment", texts=["y"]))],
         "'a' is used twice"),
        ([gateway_pb2.FanoutStep(name="a", dense=dense_pb2.PredictRequest(model_name="digits-mlp"),
                                 inputs_from=[gateway_pb2.StepInput(input="pixels", step="later", output="x")])],
         "not an earlier step"),
    ],
)  # fmt: skip
def test_a_malformed_plan_is_invalid_argument(fanout, steps, fragment):
    with pytest.raises(grpc.RpcError) as err:
        fanout.Fanout(gateway_pb2.FanoutRequest(steps=steps), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()


def test_steps_share_the_callers_deadline(fanout):
    request = gateway_pb2.FanoutRequest(steps=[
        gateway_pb2.FanoutStep(name=f"s{i}", nlp=nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=[f"text {i}"]))
        for i in range(3)
    ])  # fmt: skip
    try:
        results = fanout.Fanout(request, timeout=0.001).results
    except grpc.RpcError as exc:  # the deadline ran out before the reply came back
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:  # or each step saw that no time was left for it
        assert [r.code for r in results] == [grpc.StatusCode.DEADLINE_EXCEEDED.value[0]] * 3
