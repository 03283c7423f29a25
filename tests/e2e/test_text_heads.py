"""More than one text-classification head through the training service: multi-class topics and
multi-label aspects, each evaluated with macro-F1 on held-out texts, then served and explained."""

from __future__ import annotations

import pytest

from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from shared.tensors import to_numpy
from tests.e2e.test_training import served_version, wait_for, watch


@pytest.fixture(scope="module")
def training(gateway_channel):
    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


def test_a_multi_class_topic_head(training, gateway_channel):
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="mlp", hidden_sizes=[64], learning_rate=0.01, epochs=40,
                           batch_size=16, builtin_dataset="topics", output_model="e2e-topics",
                           gate=t.PromotionGate(metric="f1_macro", min_value=0.8)),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    print(f"\ntopics (multi-class, mlp [64]) held-out: {dict(done.metrics)}")
    assert done.metrics["f1_macro"] >= 0.8 and done.promoted, done.gate_result
    nlp = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    request = nlp_pb2.PredictRequest(model_name="e2e-topics", texts=[
        "The midfielder was injured in the cup final.", "Bake the bread at a high temperature.",
        "The bank cut its lending rates again."])  # fmt: skip
    reply, _ = wait_for(lambda: served_version(lambda: nlp.Predict.with_call(request, timeout=10)), what="served")
    assert list(reply.labels) == ["sports", "food", "finance"]
    explained = nlp.Explain(nlp_pb2.ExplainRequest(model_name="e2e-topics", text=request.texts[0]), timeout=30)
    assert explained.label == "sports" and len(explained.tokens) > 5


def test_a_multi_label_aspect_head(training, gateway_channel):
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", learning_rate=0.05, epochs=80, batch_size=8,
                           builtin_dataset="aspects", output_model="e2e-aspects"),
        timeout=10,
    ).job  # fmt: skip
    events = watch(training, job.job_id)
    assert events[-1].state == t.JOB_STATE_SUCCEEDED, events[-1].message
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    print(f"\naspects (multi-label, linear) held-out: {dict(done.metrics)}")
    assert {"f1_macro", "f1_micro", "exact_match"} <= set(done.metrics)
    assert done.metrics["f1_macro"] >= 0.6, dict(done.metrics)
    assert "f1_macro" in done.gate_result or done.gate_result == "no gate: promoted"
    nlp = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    request = nlp_pb2.PredictRequest(model_name="e2e-aspects", texts=[
        "The soup was tasty but the waiter was rude.", "Such a cheap and cosy little place."])  # fmt: skip
    reply, _ = wait_for(lambda: served_version(lambda: nlp.Predict.with_call(request, timeout=10)), what="served")
    chosen = to_numpy(reply.outputs["label"], "label")
    probabilities = to_numpy(reply.outputs["probabilities"], "probabilities")
    assert chosen.shape == probabilities.shape == (2, 4)  # one 0/1 per label: food, price, ambience, service
    assert ((probabilities > 0.5) == (chosen == 1)).all()
    first = set(reply.labels[0].split(","))
    assert {"food", "service"} <= first
