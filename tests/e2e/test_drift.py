"""Input drift in a cluster of its own: the dense service compares a trained version's logged inputs
(payload logging on) with the training reference sample it was published with; a shifted input
distribution raises the drift metric and queues exactly one retraining job, the job's own spec."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from shared.cluster import ClusterPorts, LocalCluster
from shared.model_store import ModelStore
from shared.tensors import from_numpy
from tests.e2e.test_training import wait_for, watch
from tests.stores import copy_store

MODEL = "drift-iris"


@pytest.fixture(scope="module")
def drifting(model_store, tmp_path_factory):
    """(cluster, channel, training stub) with every call logged, drift checked twice a second, retraining on,
    and drift-iris v1 trained by a job."""
    var = tmp_path_factory.mktemp("drift")
    copy_store(model_store, ModelStore(var / "models"))
    env = {"MAAS_GATEWAY_PAYLOAD_LOGGING": '{"*": 1.0}', "MAAS_DENSE_DRIFT_INTERVAL_S": "0.5",
           "MAAS_DENSE_DRIFT_MIN_ROWS": "40", "MAAS_DENSE_DRIFT_RETRAIN": "true"}  # fmt: skip
    cluster = LocalCluster(ClusterPorts.free(), var / "models", var, log_dir=var / "logs", extra_env=env)
    try:
        cluster.start()
        with grpc.insecure_channel(cluster.specs["gateway"].target) as channel:
            training = training_pb2_grpc.TrainingServiceStub(channel)
            job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=20,
                                                        learning_rate=0.01, builtin_dataset="iris",
                                                        output_model=MODEL), timeout=10).job  # fmt: skip
            assert watch(training, job.job_id)[-1].state == t.JOB_STATE_SUCCEEDED
            yield cluster, channel, training, job.job_id
    finally:
        cluster.stop()


def gauge(cluster, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.ports.dense_metrics}/metrics", timeout=5).read()
    return sum(s.value for family in text_string_to_metric_families(text.decode()) for s in family.samples
               if s.name == name and s.labels.get("model") == MODEL and s.labels.get("version") == "1")  # fmt: skip


def send(channel, rows: np.ndarray, prefix: str) -> None:
    stub = dense_pb2_grpc.DenseServiceStub(channel)
    wait_for(lambda: _served(stub), what=f"{MODEL} served")
    for i, row in enumerate(rows):
        request = dense_pb2.PredictRequest(model_name=MODEL, inputs={"x": from_numpy(row[None].astype(np.float32))})
        stub.Predict(request, timeout=10, metadata=(("x-request-id", f"{prefix}-{i}"), ("cache-control", "no-store")))


def _served(stub) -> bool:
    row = load_iris().data[:1].astype(np.float32)  # a row like the training data: it is logged too
    request = dense_pb2.PredictRequest(model_name=MODEL, inputs={"x": from_numpy(row)})
    try:
        stub.Predict(request, timeout=10, metadata=(("cache-control", "no-store"),))
        return True
    except grpc.RpcError as exc:
        if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            raise
        return False


def retraining_jobs(training, first_job: str) -> list:
    return [job for job in training.ListJobs(t.ListJobsRequest(family=t.FAMILY_DENSE), timeout=10).jobs
            if job.spec.output_model == MODEL and job.job_id != first_job]  # fmt: skip


def test_inputs_like_the_training_data_do_not_drift_and_shifted_ones_queue_one_retraining_job(drifting):
    cluster, channel, training, first_job = drifting
    iris = load_iris().data
    # 75 rows from the training distribution, shuffled: the data set is sorted by species, and a check
    # that ran while only the first 40 to 50 rows of it were logged (mostly one species) saw drift.
    alike = iris[::2][np.random.default_rng(0).permutation(75)]
    send(channel, alike, "alike")
    wait_for(lambda: gauge(cluster, "maas_model_drift_rows") >= 75, timeout=60, what="the logged rows compared")
    # The first retraining decision is the drift check's, not the trainer's: none so far.
    checks = gauge(cluster, "maas_model_drift_checks_total")
    wait_for(lambda: gauge(cluster, "maas_model_drift_checks_total") >= checks + 2, what="two more checks")
    assert gauge(cluster, "maas_model_drift_features") == 0
    assert retraining_jobs(training, first_job) == []

    send(channel, iris[1::2] + 4.0, "shifted")  # the same flowers, every measurement 4 cm larger
    wait_for(lambda: gauge(cluster, "maas_model_drift_features") > 0, timeout=60, what="drift to be seen")
    # Drift may show before every shifted row is logged; the score is read once all are compared.
    wait_for(lambda: gauge(cluster, "maas_model_drift_rows") >= 150, timeout=60, what="every row compared")
    assert gauge(cluster, "maas_model_drift_score") > 0.3  # half the window shifted: about 0.5
    (job,) = wait_for(lambda: retraining_jobs(training, first_job), timeout=60, what="a retraining job")
    # The job's own spec, its gate included.
    assert (job.spec.builtin_dataset, job.spec.architecture, job.spec.epochs) == ("iris", "mlp", 20)
    # More checks see the same drift: still that one job.
    checks = gauge(cluster, "maas_model_drift_checks_total")
    wait_for(lambda: gauge(cluster, "maas_model_drift_checks_total") >= checks + 3, what="three more checks")
    assert [j.job_id for j in retraining_jobs(training, first_job)] == [job.job_id]
