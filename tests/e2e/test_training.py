"""Training as a service, end to end through the gateway, with real trainers and a real queue Redis."""

from __future__ import annotations

import io
import json
import signal
import time

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_wine
from torch_geometric.datasets import KarateClub

from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from services.nlp.defaults import SENTIMENT_DATA
from shared.envelope import CHUNK_BYTES, SEALED_MAGIC, plaintext_size
from shared.jobs import dead_letter_key
from shared.model_store import ModelStore
from shared.tensors import from_numpy, to_numpy

NO_CACHE = (("cache-control", "no-store"),)
BAD_GRAPH = json.dumps({"node_features": [[1.0]] * 4, "edge_index": [[0, 1], [1, 9]], "labels": [0, 1, 0, 1]}).encode()


@pytest.fixture(scope="module")
def training(gateway_channel):
    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


def upload(training, name, family, fmt, data: bytes, chunk=4096):
    def messages():
        yield t.UploadDatasetRequest(info=t.DatasetInfo(name=name, family=family, format=fmt))
        for start in range(0, len(data), chunk):
            yield t.UploadDatasetRequest(chunk=data[start : start + chunk])

    return training.UploadDataset(messages(), timeout=60).dataset


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def watch(training, job_id, timeout=240):
    """The job's events to its end. A stream the gateway ends with UNAVAILABLE (a connection past its maximum
    age) is opened again, as the SDK does; it replays the history first, so the events seen are skipped."""
    events, deadline = [], time.monotonic() + timeout
    while True:
        try:
            stream = training.WatchJob(t.WatchJobRequest(job_id=job_id), timeout=max(deadline - time.monotonic(), 1))
            for index, reply in enumerate(stream):
                if index >= len(events):
                    events.append(reply.event)
            return events
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise


def wait_for(predicate, timeout=60, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def served_version(call):
    """(reply, cache outcome) once the model is served; None while it is not loaded yet."""
    try:
        reply, rpc = call()
        return reply, dict(rpc.trailing_metadata()).get("maas-cache")
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return None
        raise


def wine_dataset(training):
    wine = load_wine()
    return upload(training, "wine", t.FAMILY_DENSE, t.DATASET_FORMAT_NPZ, npz(x=wine.data, labels=wine.target))


def test_dense_job_end_to_end_then_a_new_version_is_served_uncached(training, gateway_channel):
    dataset = wine_dataset(training)
    # The gateway stores and hashes the upload; it does not parse it (the trainer does).
    assert len(dataset.sha256) == 64 and dataset.size_bytes > 0 and dataset.num_examples == 0
    job = training.SubmitJob(
        t.SubmitJobRequest(
            family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[32], learning_rate=0.01, epochs=15,
            dataset_id=dataset.dataset_id, output_model="e2e-wine",
            gate=t.PromotionGate(metric="accuracy", min_value=0.8),
        ),
        timeout=10,
    ).job  # fmt: skip
    assert job.state == t.JOB_STATE_QUEUED
    events = watch(training, job.job_id)
    states = [e.state for e in events]
    assert states[0] == t.JOB_STATE_QUEUED and states[-1] == t.JOB_STATE_SUCCEEDED
    assert t.JOB_STATE_RUNNING in states and t.JOB_STATE_EVALUATING in states
    epochs = [e for e in events if e.epoch]
    assert [e.epoch for e in epochs] == list(range(1, 16))
    assert all(e.train_loss > 0 and "accuracy" in e.validation_metrics for e in epochs)
    assert epochs[-1].eta_seconds == 0 and epochs[0].eta_seconds > 0
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert done.promoted and done.model_version == 1 and done.metrics["accuracy"] >= 0.8
    assert "gate passed" in done.gate_result
    # The trainer that parsed the data set recorded what it found.
    parsed = training.GetDataset(t.GetDatasetRequest(dataset_id=dataset.dataset_id), timeout=10).dataset
    assert parsed.task == "classification" and parsed.num_examples == 178 and list(parsed.feature_shape) == [13]

    wine = load_wine()
    stub = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    request = dense_pb2.PredictRequest(model_name="e2e-wine", inputs={"x": from_numpy(wine.data.astype(np.float32))})
    reply, _ = wait_for(lambda: served_version(lambda: stub.Predict.with_call(request, timeout=10)), what="v1 served")
    assert reply.model_version == 1
    assert (to_numpy(reply.outputs["label"], "label") == wine.target).mean() >= 0.8
    # Once the gateway's catalog knows the new model, repeated calls are cache hits.
    wait_for(lambda: served_version(lambda: stub.Predict.with_call(request, timeout=10))[1] == "hit", what="hit")

    # A second job promotes v2: the same request is then answered by v2, never by v1's cached result.
    job2 = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[32], learning_rate=0.01,
                           epochs=10, seed=7, dataset_id=dataset.dataset_id, output_model="e2e-wine"),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job2.job_id)[-1].state == t.JOB_STATE_SUCCEEDED

    def v2():
        served = served_version(lambda: stub.Predict.with_call(request, timeout=10))
        return served if served is not None and served[0].model_version == 2 else None

    reply, outcome = wait_for(v2, what="v2 served")
    assert outcome != "hit"


def test_gnn_job_end_to_end(training, gateway_channel):
    data = KarateClub()[0]
    rng = np.random.default_rng(0)
    mask = np.zeros(34, dtype=bool)
    mask[rng.permutation(34)[:22]] = True
    mask[[0, 33, 8, 24]] = True  # one node of each community
    graph = {
        "node_features": data.x.tolist(),
        "edge_index": data.edge_index.tolist(),
        "labels": data.y.tolist(),
        "train_mask": mask.tolist(),
    }
    dataset = upload(training, "club", t.FAMILY_GNN, t.DATASET_FORMAT_JSON, json.dumps(graph).encode())
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_GNN, architecture="gcn", learning_rate=0.01, epochs=100,
                           dataset_id=dataset.dataset_id, output_model="e2e-club"),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert done.promoted and done.metrics["accuracy"] >= 0.6
    parsed = training.GetDataset(t.GetDatasetRequest(dataset_id=dataset.dataset_id), timeout=10).dataset
    assert list(parsed.feature_shape) == [34] and parsed.num_examples == 34
    stub = gnn_pb2_grpc.GnnServiceStub(gateway_channel)
    request = gnn_pb2.PredictRequest(model_name="e2e-club", stored_graph="club")
    reply, _ = wait_for(lambda: served_version(lambda: stub.Predict.with_call(request, timeout=10)), what="gnn served")
    assert reply.model_version == done.model_version
    assert (to_numpy(reply.outputs["label"], "label") == data.y.numpy()).mean() >= 0.7


def test_nlp_job_end_to_end(training, gateway_channel):
    dataset = upload(training, "reviews", t.FAMILY_NLP, t.DATASET_FORMAT_JSONL, SENTIMENT_DATA.read_bytes())
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", learning_rate=0.01, epochs=40, batch_size=16,
                           k_folds=3, dataset_id=dataset.dataset_id, output_model="e2e-reviews"),
        timeout=10,
    ).job  # fmt: skip
    events = watch(training, job.job_id)
    assert events[-1].state == t.JOB_STATE_SUCCEEDED
    assert sum("fold" in e.message for e in events) == 3
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert "cv_accuracy_mean" in done.metrics and done.metrics["accuracy"] >= 0.8
    parsed = training.GetDataset(t.GetDatasetRequest(dataset_id=dataset.dataset_id), timeout=10).dataset
    assert list(parsed.class_names) == ["negative", "positive"]
    stub = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    request = nlp_pb2.PredictRequest(model_name="e2e-reviews", texts=["I love this!", "This is awful."])
    reply, _ = wait_for(lambda: served_version(lambda: stub.Predict.with_call(request, timeout=10)), what="nlp served")
    assert list(reply.labels) == ["positive", "negative"]


@pytest.mark.parametrize(
    ("family", "architecture", "dataset", "epochs", "lr", "metric", "served"),
    [
        (t.FAMILY_DENSE, "mlp", "digits", 8, 0.001, "accuracy", "dense"),
        (t.FAMILY_NLP, "mlp", "sentiment", 8, 0.01, "accuracy", "nlp"),
        (t.FAMILY_NLP, "linear", "aspects", 80, 0.05, "f1_macro", "nlp"),  # a multi-label head
    ],
)  # fmt: skip
def test_a_two_worker_job_streams_rank_0s_epochs_and_publishes_one_served_version(
    training, gateway_channel, cluster, family, architecture, dataset, epochs, lr, metric, served
):
    name = f"e2e-ddp-{architecture}-{dataset}"
    job = training.SubmitJob(
        t.SubmitJobRequest(family=family, architecture=architecture, epochs=epochs, batch_size=8, learning_rate=lr,
                           builtin_dataset=dataset, output_model=name, seed=3, world_size=2),
        timeout=10,
    ).job  # fmt: skip
    assert job.spec.world_size == 2
    events = watch(training, job.job_id)
    assert events[-1].state == t.JOB_STATE_SUCCEEDED, [e.message for e in events]
    assert any("starting 2 data-parallel workers" in e.message for e in events)
    reported = [e for e in events if e.epoch]
    assert [e.epoch for e in reported] == list(range(1, epochs + 1))
    assert all(metric in e.validation_metrics for e in reported)
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert done.model_version == 1 and done.promoted and done.metrics[metric] > 0.5
    store = ModelStore(cluster.specs["nlp"].env["MAAS_NLP_MODEL_STORE"])
    assert store.versions(name) == [1] and store.manifest(name, 1).source == f"job:{job.job_id}"
    if served == "nlp":
        stub = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
        request = nlp_pb2.PredictRequest(model_name=name, texts=["I love this!"])
        reply, _ = wait_for(lambda: served_version(lambda: stub.Predict.with_call(request, timeout=10)), what="served")
        assert reply.model_version == 1


def test_a_duplicate_submit_with_the_same_key_is_the_same_job(training):
    request = t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=2, builtin_dataset="iris",
                                 output_model="e2e-iris", idempotency_key="iris-once")  # fmt: skip
    first = training.SubmitJob(request, timeout=10)
    second = training.SubmitJob(request, timeout=10)
    assert first.created and not second.created
    assert first.job.job_id == second.job.job_id
    jobs = training.ListJobs(t.ListJobsRequest(family=t.FAMILY_DENSE), timeout=10).jobs
    assert sum(job.spec.idempotency_key == "iris-once" for job in jobs) == 1
    assert watch(training, first.job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", learning_rate=-0.1, builtin_dataset="iris",
                            output_model="x"), grpc.StatusCode.INVALID_ARGUMENT, "learning_rate"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", learning_rate=0, builtin_dataset="iris",
                            output_model="x"), grpc.StatusCode.INVALID_ARGUMENT, "learning_rate: must be > 0"),
        (t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="transformer", builtin_dataset="sentiment",
                            output_model="x"), grpc.StatusCode.INVALID_ARGUMENT, "architecture: 'transformer'"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="cnn", builtin_dataset="iris", output_model="x"),
         grpc.StatusCode.INVALID_ARGUMENT, "cnn needs image-shaped"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=-3, builtin_dataset="iris",
                            output_model="x"), grpc.StatusCode.INVALID_ARGUMENT, "epochs"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", builtin_dataset="iris", output_model="Bad Name"),
         grpc.StatusCode.INVALID_ARGUMENT, "output_model"),
        (t.SubmitJobRequest(architecture="mlp", builtin_dataset="iris", output_model="x"),
         grpc.StatusCode.INVALID_ARGUMENT, "family"),
        (t.SubmitJobRequest(family=t.FAMILY_GNN, architecture="gcn", dataset_id="ds-doesnotexist", output_model="x"),
         grpc.StatusCode.NOT_FOUND, "ds-doesnotexist"),
        # Unbounded jobs: each layer may be wide, but not the whole network, nor the training work.
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[16384] * 64,
                            builtin_dataset="iris", output_model="x"),
         grpc.StatusCode.INVALID_ARGUMENT, "hidden_sizes: 64 layers; at most 32 (max_hidden_layers)"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[16384, 16384],
                            builtin_dataset="iris", output_model="x"),
         grpc.StatusCode.INVALID_ARGUMENT, "at most 50,000,000 (max_parameters)"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=10_000, k_folds=20,
                            builtin_dataset="digits", output_model="x"),
         grpc.StatusCode.INVALID_ARGUMENT, "(max_epoch_rows)"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", world_size=-2, builtin_dataset="iris",
                            output_model="x"), grpc.StatusCode.INVALID_ARGUMENT, "world_size: must be 1..4"),
        (t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", world_size=99, builtin_dataset="iris",
                            output_model="x"), grpc.StatusCode.INVALID_ARGUMENT, "(the trainers' max_world_size)"),
        (t.SubmitJobRequest(family=t.FAMILY_GNN, architecture="gcn", world_size=2, builtin_dataset="karate",
                            output_model="x"), grpc.StatusCode.INVALID_ARGUMENT, "world_size: gnn jobs train"),
    ],
)  # fmt: skip
def test_bad_jobs_are_refused_with_the_field_named(training, request_, code, fragment):
    with pytest.raises(grpc.RpcError) as err:
        training.SubmitJob(request_, timeout=10)
    assert err.value.code() == code
    assert fragment in err.value.details()


@pytest.mark.parametrize(
    ("family", "fmt", "data", "fragment"),
    [
        (t.FAMILY_NLP, t.DATASET_FORMAT_JSONL, b'not json\n{"text": "ok", "label": "a"}\n', "jsonl line 1"),
        (t.FAMILY_DENSE, t.DATASET_FORMAT_CSV, b"a,b,c\n1,2,0\n", "'label' or 'target'"),
        (t.FAMILY_DENSE, t.DATASET_FORMAT_NPZ, b"not an npz", "npz: not a zip archive"),
        (t.FAMILY_GNN, t.DATASET_FORMAT_JSON, b"[1, 2]", "json: expected an object"),
        (t.FAMILY_DENSE, t.DATASET_FORMAT_JSONL, b'{"text": "a", "label": "b"}\n', "info.format"),
    ],
)  # fmt: skip
def test_uploads_whose_framing_is_wrong_are_refused_at_once(training, family, fmt, data, fragment):
    with pytest.raises(grpc.RpcError) as err:
        upload(training, "bad", family, fmt, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()


@pytest.mark.parametrize(
    ("family", "architecture", "fmt", "data", "fragment"),
    [
        (t.FAMILY_NLP, "linear", t.DATASET_FORMAT_JSONL, b'{"text": "ok", "label": "a"}\n'
         b'{"text": "fine", "label": "b"}\n{"text": 3}\n', "jsonl line 3"),
        (t.FAMILY_NLP, "linear", t.DATASET_FORMAT_JSONL, b'{"text": "ok", "label": "a"}\nnot json\n', "jsonl line 2"),
        (t.FAMILY_DENSE, "mlp", t.DATASET_FORMAT_CSV, b"a,b,label\n1,2,0\n3,x,1\n", "csv line 3: 'x' is not a number"),
        (t.FAMILY_GNN, "gcn", t.DATASET_FORMAT_JSON, BAD_GRAPH, "'edge_index' names node 9"),
    ],
)  # fmt: skip
def test_a_malformed_data_set_fails_its_job_at_once_naming_the_line_or_field(
    training, family, architecture, fmt, data, fragment
):
    dataset = upload(training, "malformed", family, fmt, data)  # stored: the gateway does not parse it
    job = training.SubmitJob(
        t.SubmitJobRequest(family=family, architecture=architecture, epochs=2, dataset_id=dataset.dataset_id,
                           output_model="e2e-malformed"),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job.job_id)[-1].state == t.JOB_STATE_FAILED
    failed = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert failed.error.startswith("INVALID_ARGUMENT: ") and fragment in failed.error
    assert failed.attempts == 1  # a bad input is not retried


def test_a_job_that_fails_its_gate_leaves_the_default_unchanged(training, gateway_channel):
    request = t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=3, builtin_dataset="digits",
                                 output_model="e2e-gated")  # fmt: skip
    first = training.SubmitJob(request, timeout=10).job
    assert watch(training, first.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    request.gate.CopyFrom(t.PromotionGate(metric="accuracy", min_value=0.9999))
    request.epochs = 1
    gated = training.SubmitJob(request, timeout=10).job
    assert watch(training, gated.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    done = training.GetJob(t.GetJobRequest(job_id=gated.job_id), timeout=10).job
    assert not done.promoted and done.model_version == 2 and "gate failed" in done.gate_result
    stub = models_pb2_grpc.ModelServiceStub(gateway_channel)

    def both_loaded():
        try:
            reply = stub.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name="e2e-gated"), timeout=10)
        except grpc.RpcError:
            return None
        ready = [v for v in reply.versions if v.state == model_pb2.MODEL_STATE_READY]
        return reply if len(ready) == 2 else None

    listed = wait_for(both_loaded, what="both versions loaded")
    assert listed.default_version == 1
    pixels = from_numpy(np.zeros((1, 64), np.float32))
    dense = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    reply = dense.Predict(dense_pb2.PredictRequest(model_name="e2e-gated", inputs={"x": pixels}), timeout=10)
    assert reply.model_version == 1
    # The gated version is still there to inspect, by number.
    reply = dense.Predict(dense_pb2.PredictRequest(model_name="e2e-gated", model_version=2, inputs={"x": pixels}))
    assert reply.model_version == 2


def test_a_job_may_not_turn_a_model_into_another_kind(training, cluster):
    """The embedding model is nlp, like a text classifier: only the check at publish sees the kinds differ."""
    store = ModelStore(cluster.specs["nlp"].env["MAAS_NLP_MODEL_STORE"])
    before = store.versions("minilm-l6-v2")
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", epochs=1, builtin_dataset="sentiment",
                           output_model="minilm-l6-v2"),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job.job_id)[-1].state == t.JOB_STATE_FAILED
    failed = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert failed.error.startswith("INVALID_ARGUMENT: output_model: 'minilm-l6-v2' is a nlp embedding model")
    assert failed.attempts == 1
    assert store.versions("minilm-l6-v2") == before


def test_cancellation_takes_effect_within_one_epoch(training, cluster):
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[512, 512], batch_size=16,
                           epochs=500, builtin_dataset="digits", output_model="e2e-cancelled"),
        timeout=10,
    ).job  # fmt: skip
    stream = training.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=240)
    seen = []
    for reply in stream:
        seen.append(reply.event)
        if reply.event.epoch >= 2:
            break
    cancelled = training.CancelJob(t.CancelJobRequest(job_id=job.job_id), timeout=10).job
    events = watch(training, job.job_id)
    assert events[-1].state == t.JOB_STATE_CANCELLED
    # The epoch running when the cancel arrived finishes; the next one never starts.
    assert max(e.epoch for e in events) <= cancelled.epoch + 1
    assert ModelStore(cluster.specs["dense"].env["MAAS_DENSE_MODEL_STORE"]).versions("e2e-cancelled") == []
    with pytest.raises(grpc.RpcError) as err:
        training.CancelJob(t.CancelJobRequest(job_id=job.job_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_trainer_killed_mid_job_is_taken_over_and_the_job_completes_once(training, cluster):
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[512, 512], batch_size=16,
                           epochs=12, builtin_dataset="digits", output_model="e2e-killed"),
        timeout=10,
    ).job  # fmt: skip
    for reply in training.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=240):
        if reply.event.epoch >= 3:
            break
    cluster.stop_process("dense-trainer", signal.SIGKILL)
    cluster.start_process("dense-trainer")
    events = watch(training, job.job_id)
    assert events[-1].state == t.JOB_STATE_SUCCEEDED
    resumed = [e for e in events if "resumed from the checkpoint" in e.message]
    assert len(resumed) == 1
    epochs_after_resume = [e.epoch for e in events[events.index(resumed[0]) :] if e.epoch]
    assert epochs_after_resume[0] > 1 and epochs_after_resume[-1] == 12
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert done.attempts == 2
    store = ModelStore(cluster.specs["dense"].env["MAAS_DENSE_MODEL_STORE"])
    written = [v for v in store.versions("e2e-killed") if store.manifest("e2e-killed", v).source == f"job:{job.job_id}"]
    assert written == [done.model_version]


def test_jobs_queued_while_redis_restarts_are_not_lost(training, cluster):
    cluster.stop_process("gnn-trainer")  # so the jobs stay queued
    try:
        jobs = [
            training.SubmitJob(
                t.SubmitJobRequest(family=t.FAMILY_GNN, architecture="gcn", epochs=5, builtin_dataset="karate",
                                   output_model="e2e-durable", seed=seed),
                timeout=10,
            ).job.job_id
            for seed in range(3)
        ]  # fmt: skip
        cluster.queue_redis.stop(signal.SIGKILL)  # a crash: only the append-only file survives
        with pytest.raises(grpc.RpcError) as err:
            training.GetJob(t.GetJobRequest(job_id=jobs[0]), timeout=10)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        cluster.queue_redis.start()
    finally:
        cluster.start_process("gnn-trainer")
    for job_id in jobs:
        assert watch(training, job_id)[-1].state == t.JOB_STATE_SUCCEEDED


def test_a_job_failing_every_attempt_moves_to_the_dead_letter_stream(training, cluster):
    wine = load_wine()
    # Over one sealed chunk (1 MiB), so that the check at submit, which decrypts the first chunk only, passes.
    x, labels = np.tile(wine.data, (60, 1)), np.tile(wine.target, 60)
    dataset = upload(training, "doomed", t.FAMILY_DENSE, t.DATASET_FORMAT_NPZ, npz(x=x, labels=labels), chunk=1 << 20)
    # One byte of the last chunk's ciphertext flipped after the upload: the trainer's decryption refuses it.
    stored = cluster.var_dir / "datasets" / dataset.dataset_id / "data.npz"
    sealed = bytearray(stored.read_bytes())
    sealed[-20] ^= 0x01
    stored.write_bytes(bytes(sealed))
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=2, dataset_id=dataset.dataset_id,
                           output_model="e2e-doomed"),
        timeout=10,
    ).job  # fmt: skip
    events = watch(training, job.job_id)
    assert events[-1].state == t.JOB_STATE_FAILED
    assert sum(e.message.startswith("attempt") and "failed" in e.message for e in events) == 3
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert "gave up after 3 failed attempts" in done.error and "chunk 1 does not authenticate" in done.error
    import redis

    queue = redis.Redis.from_url(cluster.queue_redis_url)
    # The job's record says FAILED a moment before its entry reaches the dead-letter stream.
    wait_for(
        lambda: any(fields[b"job_id"].decode() == job.job_id for _, fields in queue.xrange(dead_letter_key("dense"))),
        timeout=10, what="the job's entry in the dead-letter stream",
    )  # fmt: skip


def test_a_gateway_restart_loses_no_job_and_a_late_watcher_gets_the_history(training, cluster):
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", epochs=3, builtin_dataset="sentiment",
                           output_model="e2e-restart"),
        timeout=10,
    ).job  # fmt: skip
    cluster.stop_process("gateway")
    cluster.start_process("gateway")
    cluster.wait_serving("gateway")
    with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        wait_for(
            lambda: stub.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job.state == t.JOB_STATE_SUCCEEDED,
            what="the job to finish",
        )
        history = watch(stub, job.job_id)  # connects after the job ended
    assert history[0].state == t.JOB_STATE_QUEUED and history[-1].state == t.JOB_STATE_SUCCEEDED
    assert [e.epoch for e in history if e.epoch] == [1, 2, 3]


def test_a_200_mb_upload_streams_through_the_gateway_without_growing_its_memory(training, cluster):
    import threading

    import psutil

    supervisor = psutil.Process(cluster.processes["gateway"].pid)
    gateway = supervisor.children() or [supervisor]
    baseline = {p.pid: p.memory_info().rss for p in gateway}
    peak = dict(baseline)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for p in gateway:
                peak[p.pid] = max(peak[p.pid], p.memory_info().rss)
            time.sleep(0.02)

    row = b",".join(b"%d.5" % i for i in range(63)) + b",1\n"
    rows_per_chunk = (1 << 20) // len(row)
    chunks = (200 << 20) // (rows_per_chunk * len(row)) + 1

    def messages():
        yield t.UploadDatasetRequest(info=t.DatasetInfo(name="big", family=t.FAMILY_DENSE, format=t.DATASET_FORMAT_CSV))
        yield t.UploadDatasetRequest(chunk=b",".join(b"f%d" % i for i in range(63)) + b",label\n")
        for _ in range(chunks):
            yield t.UploadDatasetRequest(chunk=row * rows_per_chunk)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        dataset = training.UploadDataset(messages(), timeout=300).dataset
    finally:
        done.set()
        sampler.join()
    assert dataset.size_bytes >= 200 << 20
    growth = max(peak[pid] - baseline[pid] for pid in baseline)
    print(f"gateway RSS growth during a {dataset.size_bytes >> 20} MiB upload: {growth >> 20} MiB")
    assert growth < 64 << 20, f"the gateway grew by {growth >> 20} MiB while streaming the upload"
    stored = cluster.var_dir / "datasets" / dataset.dataset_id / "data.csv"
    with stored.open("rb") as sealed:  # sealed as it streamed in, chunk by chunk
        assert sealed.read(len(SEALED_MAGIC)) == SEALED_MAGIC
    assert plaintext_size(stored.stat().st_size, CHUNK_BYTES) == dataset.size_bytes


@pytest.mark.parametrize("architecture", ["sage", "gat"])
def test_gnn_architectures_train_on_a_built_in_graph_and_are_served_with_their_metrics(
    training, gateway_channel, architecture
):
    name = f"e2e-sbm-{architecture}"
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_GNN, architecture=architecture, learning_rate=0.01, epochs=40,
                           builtin_dataset="sbm", output_model=name),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert done.metrics["accuracy"] >= 0.8
    models = models_pb2_grpc.ModelServiceStub(gateway_channel)
    described = wait_for(lambda: served_version(lambda: models.GetModel.with_call(
        models_pb2.GetModelRequest(model_name=name), timeout=10)), what="described")[0]  # fmt: skip
    assert described.model.versions[-1].metrics["accuracy"] == pytest.approx(done.metrics["accuracy"])
    stub = gnn_pb2_grpc.GnnServiceStub(gateway_channel)
    request = gnn_pb2.PredictRequest(model_name=name, stored_graph="sbm", node_ids=[0, 1, 2])
    reply, _ = wait_for(lambda: served_version(lambda: stub.Predict.with_call(request, timeout=10)), what="served")
    assert reply.model_version == done.model_version and list(reply.node_ids) == [0, 1, 2]


def test_gin_trains_as_a_graph_classifier_and_serves_classify_graphs(training, gateway_channel):
    from services.gnn.datasets import motif_graphs

    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_GNN, architecture="gin", learning_rate=0.01, epochs=15, batch_size=64,
                           builtin_dataset="motifs", output_model="e2e-motifs"),
        timeout=10,
    ).job  # fmt: skip
    assert watch(training, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
    done = training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job
    assert done.metrics["accuracy"] >= 0.9
    graphs = motif_graphs(40, seed=77)
    request = gnn_pb2.ClassifyGraphsRequest(model_name="e2e-motifs", graphs=[
        gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(e)) for x, e, _ in graphs])  # fmt: skip
    stub = gnn_pb2_grpc.GnnServiceStub(gateway_channel)
    reply, _ = wait_for(lambda: served_version(lambda: stub.ClassifyGraphs.with_call(request, timeout=10)),
                        what="served")  # fmt: skip
    assert (to_numpy(reply.outputs["label"], "label") == np.array([y for *_, y in graphs])).mean() >= 0.9
