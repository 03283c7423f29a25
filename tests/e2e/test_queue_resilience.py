"""The training queue on a whole cluster: rollouts that stop trainers, tenants that share them, liveness."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import pytest
import redis

from gateway.job_spec import normalize
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from shared.jobs import JobStore, dead_letter_key, events_key
from shared.model_store import ModelStore
from tests.e2e.test_training import wait_for, watch


@pytest.fixture(scope="module")
def training(gateway_channel):
    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


def test_a_trainer_stopped_mid_job_again_and_again_hands_the_job_back_without_spending_attempts(training, cluster):
    """A rollout or a preemption (SIGTERM) is not a failure: four in a row (max_attempts is 3) cost the job nothing."""
    job = training.SubmitJob(
        t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", hidden_sizes=[256], batch_size=8,
                           epochs=120, builtin_dataset="digits", output_model="e2e-rollouts"),
        timeout=10,
    ).job  # fmt: skip

    def current():
        return training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job

    def trained_past(epoch: int):
        now = current()
        return now.epoch if now.state == t.JOB_STATE_RUNNING and now.epoch > epoch else None

    epoch = 0
    for _ in range(4):
        # Mid-job: it has trained at least one more epoch under this trainer, and has not finished.
        epoch = wait_for(lambda e=epoch: trained_past(e), timeout=180, interval=0.02, what="an epoch under a trainer")
        cluster.stop_process("dense-trainer", signal.SIGTERM, timeout_s=60)
        stopped = current()
        assert stopped.state == t.JOB_STATE_QUEUED and stopped.attempts == 0, stopped
        assert stopped.epoch < 120
        cluster.start_process("dense-trainer")
    events = watch(training, job.job_id, timeout=600)
    assert events[-1].state == t.JOB_STATE_SUCCEEDED
    done = current()
    assert done.attempts == 1 and not done.error
    assert sum("trainer stopping" in e.message for e in events) == 4
    assert sum("resumed from the checkpoint" in e.message for e in events) == 4
    dead = redis.Redis.from_url(cluster.queue_redis_url).xrange(dead_letter_key("dense"))
    assert all(fields[b"job_id"].decode() != job.job_id for _, fields in dead)
    store = ModelStore(cluster.specs["dense"].env["MAAS_DENSE_MODEL_STORE"])
    written = [v for v in store.versions("e2e-rollouts")
               if store.manifest("e2e-rollouts", v).source == f"job:{job.job_id}"]  # fmt: skip
    assert written == [done.model_version]


async def test_one_tenants_backlog_does_not_hold_back_another_tenants_job(cluster):
    jobs = JobStore.from_url(cluster.queue_redis_url)

    def spec(tenant: str) -> dict:
        request = {"architecture": "gcn", "epochs": 3, "builtin_dataset": "karate", "output_model": f"e2e-{tenant}",
                   "private": True}  # fmt: skip
        return {**normalize(request, "gnn", None), "tenant": tenant}

    cluster.stop_process("gnn-trainer")  # so that both tenants' jobs are queued before one starts
    try:
        backlog = [(await jobs.submit("gnn", spec("fair-a"), tenant="fair-a"))[0] for _ in range(5)]
        single, _ = await jobs.submit("gnn", spec("fair-b"), tenant="fair-b")
    finally:
        cluster.start_process("gnn-trainer")
    try:
        for job_id in [*backlog, single]:
            deadline = time.monotonic() + 300
            while (await jobs.get(job_id))["state"] != "SUCCEEDED":
                assert time.monotonic() < deadline, f"{job_id} did not succeed"
                await asyncio.sleep(0.2)

        async def started(job_id: str) -> str:
            """The stream id (a Redis timestamp) of the job's first attempt."""
            entries = await jobs.redis.xrange(events_key(job_id))
            return next(entry_id.decode() for entry_id, fields in entries
                        if fields[b"message"].startswith(b"attempt 1 on"))  # fmt: skip

        started_ids = {job_id: await started(job_id) for job_id in [*backlog, single]}
        order = sorted(started_ids, key=lambda job_id: tuple(map(int, started_ids[job_id].split("-"))))
    finally:
        await jobs.close()
    assert order.index(single) <= 1, f"fair-b's job started as number {order.index(single) + 1} of 6"


def test_every_trainer_answers_its_liveness_probe_beside_its_metrics(cluster):
    for family in ("dense", "gnn", "nlp"):
        port = cluster.specs[f"{family}-trainer"].env[f"MAAS_{family.upper()}_TRAINER_METRICS_PORT"]

        def healthy(url=f"http://127.0.0.1:{port}/healthz"):
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    return reply.status == 200 and reply.read().startswith(b"ok")
            except OSError:
                return False  # a trainer another test restarted may still be starting

        wait_for(healthy, timeout=60, what=f"{family}-trainer's /healthz")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"maas_training_jobs_total" in reply.read()
