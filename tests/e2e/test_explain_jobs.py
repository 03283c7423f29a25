"""Explanations as jobs on the training queue: submit, watch, fetch, checked at submit, surviving a restart."""

from __future__ import annotations

import signal

import grpc
import numpy as np
import pytest
import redis

from maas.dense.v1 import dense_pb2
from maas.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.nlp.v1 import nlp_pb2
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from services.dense.datasets import digits_split
from services.gnn.datasets import motif_graphs
from shared.jobs import events_key, job_key, result_key
from shared.tensors import from_numpy, to_numpy


@pytest.fixture(scope="module")
def explanations(gateway_channel):
    return gateway_pb2_grpc.ExplanationServiceStub(gateway_channel)


def watch(explanations, job_id: str) -> list[t.JobEvent]:
    request = gateway_pb2.WatchExplanationRequest(job_id=job_id)
    return [reply.event for reply in explanations.WatchExplanation(request, timeout=240)]


def pixels(rows: int) -> np.ndarray:
    return digits_split()[1][:rows]


def test_a_dense_explanation_job_is_submitted_watched_and_fetched(explanations, gateway_channel):
    x = pixels(3)
    request = gateway_pb2.SubmitExplanationRequest(
        dense=dense_pb2.ExplainRequest(model_name="digits-cnn", inputs={"image": from_numpy(x.reshape(3, 1, 8, 8))},
                                       method="kernel_shap", steps=300),  # fmt: skip
        idempotency_key="explain-dense-1",
    )
    submitted = explanations.SubmitExplanation(request, timeout=30)
    job = submitted.job
    assert submitted.created and job.job_id.startswith("job-")
    assert job.model_name == "digits-cnn" and job.model_version >= 1  # the default version, pinned at submit
    events = watch(explanations, job.job_id)
    assert events[0].state == t.JOB_STATE_QUEUED and events[-1].state == t.JOB_STATE_SUCCEEDED
    fetched = explanations.GetExplanation(gateway_pb2.GetExplanationRequest(job_id=job.job_id), timeout=10)
    assert fetched.job.state == t.JOB_STATE_SUCCEEDED and fetched.WhichOneof("result") == "dense"
    assert fetched.dense.method == "kernel_shap" and fetched.dense.model_version == job.model_version
    assert to_numpy(fetched.dense.attributions["image"], "attributions").shape == (3, 1, 8, 8)
    again = explanations.SubmitExplanation(request, timeout=30)
    assert not again.created and again.job.job_id == job.job_id
    # Training's API does not mistake it for a training job.
    training = training_pb2_grpc.TrainingServiceStub(gateway_channel)
    listed = training.ListJobs(t.ListJobsRequest(), timeout=10).jobs
    assert job.job_id not in [j.job_id for j in listed]


def test_nlp_and_gnn_explanation_jobs(explanations):
    nlp_job = explanations.SubmitExplanation(
        gateway_pb2.SubmitExplanationRequest(nlp=nlp_pb2.ExplainRequest(model_name="sentiment",
                                                                        text="What a lovely, kind host.")),
        timeout=30,
    ).job  # fmt: skip
    gnn_job = explanations.SubmitExplanation(
        gateway_pb2.SubmitExplanationRequest(gnn=gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate",
                                                                        node_ids=[5], epochs=50)),
        timeout=30,
    ).job  # fmt: skip
    assert watch(explanations, nlp_job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    assert watch(explanations, gnn_job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    nlp = explanations.GetExplanation(gateway_pb2.GetExplanationRequest(job_id=nlp_job.job_id), timeout=10).nlp
    assert nlp.label == "positive" and len(nlp.tokens) == 7
    gnn = explanations.GetExplanation(gateway_pb2.GetExplanationRequest(job_id=gnn_job.job_id), timeout=10).gnn
    assert list(gnn.node_ids) == [5] and to_numpy(gnn.edge_mask, "edge_mask").max() > 0


def test_graph_and_link_explanation_jobs_share_the_rpc_and_pin_the_graph_version(explanations, gateway_channel):
    """A graph classifier's and a link predictor's explanations as jobs equal the sync rpc's answers; the job on a
    graph-store graph runs on the graph version that was the latest when it was submitted."""
    x, edges, _ = motif_graphs(1, seed=3)[0]
    graph_request = gnn_pb2.ExplainRequest(
        model_name="motif-gin", graph=gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(edges)),
        method="saliency",
    )
    link_request = gnn_pb2.ExplainRequest(model_name="lesmis-links", stored_graph="les-miserables", epochs=30,
                                          pairs=from_numpy(np.array([[11, 0], [48, 1]], np.int64)))  # fmt: skip
    jobs = [explanations.SubmitExplanation(gateway_pb2.SubmitExplanationRequest(gnn=request), timeout=30).job
            for request in (graph_request, link_request)]  # fmt: skip
    for job in jobs:
        assert watch(explanations, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    graph, links = (explanations.GetExplanation(gateway_pb2.GetExplanationRequest(job_id=job.job_id), timeout=10).gnn
                    for job in jobs)  # fmt: skip
    stub = gnn_pb2_grpc.GnnServiceStub(gateway_channel)
    direct = stub.Explain(graph_request, timeout=60)
    assert to_numpy(graph.edge_mask, "edge_mask").shape == (edges.shape[1],)
    np.testing.assert_allclose(to_numpy(graph.edge_mask, "edge_mask"), to_numpy(direct.edge_mask, "edge_mask"),
                               rtol=1e-3, atol=1e-5)  # fmt: skip
    assert links.graph_version >= 1 and to_numpy(links.outputs["scores"], "scores").shape == (2,)
    pinned = gnn_pb2.ExplainRequest()
    pinned.CopyFrom(link_request)
    pinned.graph_version = links.graph_version
    direct = stub.Explain(pinned, timeout=60)
    assert list(links.subgraph_node_ids) == list(direct.subgraph_node_ids)
    np.testing.assert_allclose(to_numpy(links.outputs["scores"], "scores"),
                               to_numpy(direct.outputs["scores"], "scores"), rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (gateway_pb2.SubmitExplanationRequest(), grpc.StatusCode.INVALID_ARGUMENT, "request: set one of"),
        (gateway_pb2.SubmitExplanationRequest(dense=dense_pb2.ExplainRequest(
            model_name="digits-mlp", inputs={"pixels": from_numpy(np.zeros((1, 64), np.float32))}, method="magic")),
         grpc.StatusCode.INVALID_ARGUMENT, "method: unknown method 'magic'"),
        (gateway_pb2.SubmitExplanationRequest(nlp=nlp_pb2.ExplainRequest(model_name="sentiment", text="go " * 300)),
         grpc.StatusCode.INVALID_ARGUMENT, "over the model's limit of 128"),
        (gateway_pb2.SubmitExplanationRequest(gnn=gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate",
                                                                         node_ids=[0], epochs=10**6)),
         grpc.StatusCode.INVALID_ARGUMENT, "epochs: must be 0 (the default) to"),
        (gateway_pb2.SubmitExplanationRequest(gnn=gnn_pb2.ExplainRequest(
            model_name="lesmis-links", stored_graph="les-miserables",
            pairs=from_numpy(np.array([[0], [77]], np.int64)))),
         grpc.StatusCode.INVALID_ARGUMENT, "pairs[1]: node 77 is out of range"),
        (gateway_pb2.SubmitExplanationRequest(dense=dense_pb2.ExplainRequest(model_name="no-such-model")),
         grpc.StatusCode.NOT_FOUND, "no-such-model"),
    ],
)  # fmt: skip
def test_bad_explanation_jobs_are_refused_at_submit(explanations, request_, code, fragment):
    with pytest.raises(grpc.RpcError) as caught:
        explanations.SubmitExplanation(request_, timeout=30)
    assert caught.value.code() == code
    assert fragment in caught.value.details()


def test_a_training_job_id_is_not_an_explanation(explanations, gateway_channel):
    with pytest.raises(grpc.RpcError) as caught:
        explanations.GetExplanation(gateway_pb2.GetExplanationRequest(job_id="job-doesnotexist"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never existed" in caught.value.details() and "kept for 86400 s" in caught.value.details()


def test_a_finished_explanation_expires_after_the_default_day(explanations, cluster):
    job = explanations.SubmitExplanation(
        gateway_pb2.SubmitExplanationRequest(nlp=nlp_pb2.ExplainRequest(model_name="sentiment", text="Kind host.")),
        timeout=30,
    ).job
    assert watch(explanations, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    queue = redis.Redis.from_url(cluster.queue_redis_url)
    ttls = [queue.ttl(key) for key in (job_key(job.job_id), events_key(job.job_id), result_key(job.job_id))]
    assert all(86400 - 120 < ttl <= 86400 for ttl in ttls), ttls  # MAAS_GATEWAY_EXPLANATION_RESULT_TTL_S


def test_an_explanation_job_survives_a_trainer_restart(explanations, cluster):
    """Queued while the dense trainer is down, killed as it runs: a restarted trainer takes it and finishes it."""
    cluster.stop_process("dense-trainer")
    try:
        job = explanations.SubmitExplanation(
            gateway_pb2.SubmitExplanationRequest(dense=dense_pb2.ExplainRequest(
                model_name="digits-mlp", inputs={"pixels": from_numpy(pixels(8))}, method="kernel_shap",
                steps=2000)),
            timeout=30,
        ).job  # fmt: skip
        fetched = explanations.GetExplanation(gateway_pb2.GetExplanationRequest(job_id=job.job_id), timeout=10)
        assert fetched.job.state == t.JOB_STATE_QUEUED  # no trainer: it waits in the queue
    finally:
        cluster.start_process("dense-trainer")
    for reply in explanations.WatchExplanation(gateway_pb2.WatchExplanationRequest(job_id=job.job_id), timeout=240):
        if reply.event.state in (t.JOB_STATE_RUNNING, t.JOB_STATE_SUCCEEDED):
            break
    # Killed as it runs (or just after it finished, on a fast machine): the job still ends once, with its result.
    cluster.stop_process("dense-trainer", signal.SIGKILL)
    cluster.start_process("dense-trainer")
    events = watch(explanations, job.job_id)
    assert events[-1].state == t.JOB_STATE_SUCCEEDED
    done = explanations.GetExplanation(gateway_pb2.GetExplanationRequest(job_id=job.job_id), timeout=10)
    assert done.dense.method == "kernel_shap"
    assert to_numpy(done.dense.attributions["pixels"], "attributions").shape == (8, 64)
    assert done.job.attempts in (1, 2)
