"""The training queue and a TrainingWorker, in this process, against a real queue Redis.

Jobs run either the real dense training code (on built-in data sets, in a temporary model store)
or small stand-ins that do nothing but what a test needs (record their order, wait, take time).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis

from gateway.job_spec import normalize
from services.dense import datasets as dense_data
from services.dense.training import run_job as dense_run_job
from shared.cluster import free_port
from shared.datasets import DatasetStore
from shared.job_limits import JobLimits
from shared.jobs import GROUP, JobStore, dead_letter_key, queue_key, tenants_key
from shared.liveness import Heartbeat, start_metrics_and_health_server
from shared.model_store import ModelStore
from shared.training_worker import DataSource, JobContext, JobResult, TrainingWorker

DENSE_DATA = DataSource(dense_data.parse, dense_data.describe, dense_data.load_builtin)


def dense_spec(tenant: str = "", **changes) -> dict:
    request = {"architecture": "mlp", "hidden_sizes": [16], "epochs": 2, "builtin_dataset": "iris",
               "output_model": "queue-iris", **changes}  # fmt: skip
    return {**normalize(request, "dense", None), "tenant": tenant}


def make_worker(jobs: JobStore, tmp_path: Path, run_job, **options) -> TrainingWorker:
    defaults = {"claim_idle_ms": 500, "block_ms": 100, "consumer": "trainer-1"}
    return TrainingWorker("dense", jobs, run_job, ModelStore(tmp_path / "models"), DatasetStore(tmp_path / "datasets"),
                          tmp_path / "checkpoints", DENSE_DATA, **{**defaults, **options})  # fmt: skip


class Running:
    """A worker's loop as a task; stopping it is what SIGTERM does to a trainer."""

    def __init__(self, worker: TrainingWorker) -> None:
        self.worker = worker
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(worker.run(self.stop_event))

    async def stop(self) -> None:
        self.worker.stopping.set()
        self.stop_event.set()
        await asyncio.wait_for(self.task, 60)


async def wait_until(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def finished(jobs: JobStore, job_id: str, timeout=120.0) -> dict:
    async def done():
        try:
            record = await jobs.get(job_id)
        except (redis.RedisError, OSError):  # a connection from before a restart of the test's Redis
            return None
        return record if record["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None

    return await wait_until(done, timeout, f"job {job_id} to finish")


def quick_result(context: JobContext) -> JobResult:
    return JobResult(1, {"accuracy": 1.0}, True, "no gate: promoted")


async def test_a_redis_restart_while_a_trainer_reads_a_job_loses_nothing_and_runs_it_once(jobs, queue_redis, tmp_path):
    """Regression: any error reading the record used to be taken for an unknown job, acknowledged and lost."""
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    trainer_jobs = JobStore.from_url(queue_redis.url)  # the trainer's own client
    real_get, restarted = trainer_jobs.get, []

    async def get_across_a_restart(job, tenant=None):
        if not restarted:  # the first read finds Redis gone; it is back (from its AOF) right after
            restarted.append(job)
            await asyncio.to_thread(queue_redis.stop)
            try:
                return await real_get(job, tenant)
            finally:
                await asyncio.to_thread(queue_redis.start)
        return await real_get(job, tenant)

    trainer_jobs.get = get_across_a_restart
    running = Running(make_worker(trainer_jobs, tmp_path, dense_run_job))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
        await trainer_jobs.close()
    assert restarted == [job_id]
    assert record["state"] == "SUCCEEDED" and record["attempts"] == 1
    store = ModelStore(tmp_path / "models")
    assert store.versions("queue-iris") == [1] and store.manifest("queue-iris", 1).source == f"job:{job_id}"
    history = [event["state"] for _, event in await jobs.history(job_id)]
    assert history.count("SUCCEEDED") == 1


async def test_only_an_entry_whose_job_does_not_exist_is_acknowledged_unseen(jobs, tmp_path):
    await jobs.redis.xgroup_create(queue_key("dense", "t1"), GROUP, id="0", mkstream=True)
    await jobs.redis.xadd(queue_key("dense", "t1"), {"job_id": "job-nonexistent"})
    await jobs.redis.sadd(tenants_key("dense"), "t1")
    job_id, _ = await jobs.submit("dense", dense_spec("t1"), tenant="t1")
    running = Running(make_worker(jobs, tmp_path, quick_result))
    try:
        assert (await finished(jobs, job_id))["state"] == "SUCCEEDED"
    finally:
        await running.stop()
    assert await jobs.redis.xlen(queue_key("dense", "t1")) == 0  # both entries acknowledged and deleted
    assert not await jobs.redis.sismember(tenants_key("dense"), "t1")  # an empty queue leaves the set


async def test_one_tenants_backlog_does_not_starve_another_tenants_job(jobs, tmp_path):
    backlog = [(await jobs.submit("dense", dense_spec("tenant-a"), tenant="tenant-a"))[0] for _ in range(8)]
    single, _ = await jobs.submit("dense", dense_spec("tenant-b"), tenant="tenant-b")
    started: list[str] = []

    def record_order(context: JobContext) -> JobResult:
        started.append(context.job_id)
        return quick_result(context)

    running = Running(make_worker(jobs, tmp_path, record_order))
    try:
        for job_id in [*backlog, single]:
            assert (await finished(jobs, job_id))["state"] == "SUCCEEDED"
    finally:
        await running.stop()
    assert len(started) == 9
    assert started.index(single) <= 1, f"tenant-b's job started as number {started.index(single) + 1} of 9"
    assert [job for job in started if job != single] == backlog  # each tenant's own jobs stay in order


async def test_a_job_handed_back_by_stopping_trainers_spends_no_attempt(jobs, tmp_path):
    """Five shutdowns mid-job (more than max_attempts): the job still succeeds, with one attempt counted."""
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    progress = {"epochs": 0, "hold": True}
    epoch_done = threading.Event()

    def epochs(context: JobContext) -> JobResult:
        while progress["epochs"] < 30:
            context.raise_if_cancelled()
            progress["epochs"] += 1  # what a checkpoint keeps across attempts
            epoch_done.set()
            if progress["hold"]:  # mid-job until its trainer is told to stop
                context.stopping.wait(60)
        return quick_result(context)

    for shutdown in range(5):
        epoch_done.clear()
        running = Running(make_worker(jobs, tmp_path, epochs, max_attempts=3, consumer=f"trainer-{shutdown}"))
        await asyncio.to_thread(epoch_done.wait, 60)
        await running.stop()
        record = await jobs.get(job_id)
        assert record["state"] == "QUEUED" and record["attempts"] == 0, record
    progress["hold"] = False
    running = Running(make_worker(jobs, tmp_path, epochs, max_attempts=3, consumer="trainer-last"))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "SUCCEEDED" and record["attempts"] == 1 and progress["epochs"] == 30
    assert await jobs.redis.xlen(dead_letter_key("dense")) == 0
    messages = [event["message"] for _, event in await jobs.history(job_id)]
    assert sum("trainer stopping" in m for m in messages) == 5


async def test_a_job_past_its_timeout_fails_at_its_next_epoch_boundary_and_is_not_retried(jobs, tmp_path):
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    epochs_run = []

    def slow_epochs(context: JobContext) -> JobResult:
        for epoch in range(1000):
            context.raise_if_cancelled()
            time.sleep(0.05)  # each epoch takes longer than the whole timeout
            epochs_run.append(epoch)
        return quick_result(context)

    running = Running(make_worker(jobs, tmp_path, slow_epochs, job_timeout_s=0.02))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "FAILED" and record["attempts"] == 1
    assert record["error"].startswith("DEADLINE_EXCEEDED: ") and "job_timeout_s" in record["error"]
    assert epochs_run in ([], [0])  # stopped at the first boundary past the timeout
    assert await jobs.redis.xlen(dead_letter_key("dense")) == 0
    assert await jobs.redis.xlen(queue_key("dense", "")) == 0  # acknowledged: never run again


async def test_the_trainer_refuses_a_network_past_its_parameter_limit(jobs, tmp_path):
    # Queued as the gateway would have with looser limits; this trainer's are tighter, and it checks exactly.
    job_id, _ = await jobs.submit("dense", dense_spec(hidden_sizes=[64, 64]), tenant="")
    limits = JobLimits(max_parameters=1000, max_hidden_layers=8, max_epoch_rows=10**9)
    running = Running(make_worker(jobs, tmp_path, dense_run_job, limits=limits))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "FAILED" and record["attempts"] == 1
    assert record["error"].startswith("INVALID_ARGUMENT: hidden_sizes: mlp [64, 64] has 4,675 parameters")
    assert "max_parameters" in record["error"]
    assert ModelStore(tmp_path / "models").versions("queue-iris") == []
    assert await jobs.limits("dense") == limits  # published for the gateway's check at submit


async def test_the_trainer_refuses_an_upload_with_too_many_epochs_times_rows(jobs, tmp_path):
    datasets = DatasetStore(tmp_path / "datasets")
    writer = datasets.writer(1 << 20)
    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(0).normal(size=(500, 4)), labels=np.arange(500) % 2)
    writer.write(buffer.getvalue())
    meta = writer.commit("big", "dense", "npz")
    request = {"architecture": "mlp", "epochs": 50, "dataset_id": meta["dataset_id"], "output_model": "queue-big"}
    spec = {**normalize(request, "dense", meta), "tenant": ""}  # not parsed yet: the gateway cannot count rows
    job_id, _ = await jobs.submit("dense", spec, tenant="")
    limits = JobLimits(max_parameters=10**8, max_hidden_layers=8, max_epoch_rows=10_000)
    running = Running(make_worker(jobs, tmp_path, dense_run_job, limits=limits))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "FAILED" and record["attempts"] == 1
    assert record["error"] == (
        "INVALID_ARGUMENT: epochs: 50 epochs x 500 rows = 25,000 rows trained; at most 10,000 (max_epoch_rows)"
    )


def publish_dummy(store: ModelStore, tmp_path: Path, name: str, owner: str, family="dense", config=None) -> None:
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(b"not a model")
    store.publish({"name": name, "family": family, "framework": "onnx", "inputs": [], "outputs": [],
                   "owner": owner, "config": config or {}}, {"artifact.bin": artifact})  # fmt: skip


async def test_publishing_into_a_model_another_tenant_took_first_fails_the_job(jobs, tmp_path):
    """Both tenants passed the gateway's check while the name was new; the first version decides the owner."""
    store = ModelStore(tmp_path / "models")
    publish_dummy(store, tmp_path, "queue-iris", owner="alpha")
    job_id, _ = await jobs.submit("dense", dense_spec("beta", private=True), tenant="beta")
    running = Running(make_worker(jobs, tmp_path, dense_run_job))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "FAILED" and record["attempts"] == 1
    assert record["error"].startswith("FAILED_PRECONDITION: output_model: 'queue-iris' belongs to another owner")
    assert "alpha" not in record["error"]  # the other tenant's name is not told
    assert store.versions("queue-iris") == [1]


async def test_a_job_may_not_change_a_models_kind(tmp_path):
    store = ModelStore(tmp_path / "models")
    publish_dummy(store, tmp_path, "encoder", owner="", family="nlp", config={"kind": "embedding"})
    context = JobContext("job-x", "nlp", {"output_model": "encoder", "tenant": ""}, store, DatasetStore(tmp_path),
                         tmp_path, None, None, None, DENSE_DATA)  # fmt: skip
    with pytest.raises(Exception, match="'encoder' is a nlp embedding model and this job trains a nlp classifier"):
        context.check_still_writable("encoder", "", {"family": "nlp", "config": {"kind": "classifier"}})
    with pytest.raises(Exception, match="is a nlp embedding model and this job trains a dense one"):
        context.check_still_writable("encoder", "", {"family": "dense", "config": {}})
    context.check_still_writable("encoder", "", {"family": "nlp", "config": {"kind": "embedding"}})


async def test_idempotency_keys_of_tenants_with_colons_do_not_collide(jobs):
    first, created_first = await jobs.submit("dense", dense_spec("a:b"), "c", tenant="a:b")
    second, created_second = await jobs.submit("dense", dense_spec("a"), "b:c", tenant="a")
    assert created_first and created_second and first != second
    again, created_again = await jobs.submit("dense", dense_spec("a"), "b:c", tenant="a")
    assert again == second and not created_again


async def test_healthz_turns_503_while_a_job_hangs_and_200_once_it_moves_again(jobs, tmp_path):
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    heartbeat, port = Heartbeat(), free_port()
    server = start_metrics_and_health_server(port, heartbeat, max_silence_s=0.3, host="127.0.0.1")
    hung, release = threading.Event(), threading.Event()

    def hangs(context: JobContext) -> JobResult:
        hung.set()
        release.wait(120)  # no epoch, no report: stuck
        return quick_result(context)

    def healthz() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code

    async def status(code: int):
        return await asyncio.to_thread(healthz) == code

    running = Running(make_worker(jobs, tmp_path, hangs, heartbeat=heartbeat))
    try:
        await asyncio.to_thread(hung.wait, 60)
        await wait_until(lambda: status(503), what="/healthz to report the hang")
        release.set()
        await finished(jobs, job_id)
        await wait_until(lambda: status(200), what="/healthz to recover")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"maas_training_jobs_total" in reply.read()
    finally:
        release.set()
        await running.stop()
        server.shutdown()


async def test_a_trainer_that_died_mid_job_counts_as_a_failed_attempt_and_is_taken_over(jobs, tmp_path):
    """A trainer killed without a word (SIGKILL, out of memory) leaves the job RUNNING: that attempt counts."""
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    dead = make_worker(jobs, tmp_path, quick_result, consumer="killed")
    entry = await dead.queue.next()
    await jobs.update(job_id, "attempt 1 on killed", state="RUNNING", attempts=1, trainer="killed")
    assert entry is not None and entry.job_id == job_id  # delivered, then the trainer vanished
    running = Running(make_worker(jobs, tmp_path, quick_result, consumer="survivor", claim_idle_ms=200))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "SUCCEEDED" and record["attempts"] == 2
    messages = [event["message"] for _, event in await jobs.history(job_id)]
    assert any("attempt 2 on survivor; attempt 1 on killed ended without a result" in m for m in messages)


async def test_jobs_queued_by_an_earlier_version_in_the_single_stream_still_run(jobs, tmp_path):
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    # Move it to where the single-stream version queued jobs.
    await jobs.redis.delete(queue_key("dense", ""), tenants_key("dense"))
    await jobs.redis.xgroup_create("maas:jobs:dense", GROUP, id="0", mkstream=True)
    await jobs.redis.xadd("maas:jobs:dense", {"job_id": job_id})
    running = Running(make_worker(jobs, tmp_path, quick_result))
    try:
        assert (await finished(jobs, job_id))["state"] == "SUCCEEDED"
    finally:
        await running.stop()
    assert await jobs.redis.xlen("maas:jobs:dense") == 0


async def test_a_redis_failure_under_a_running_job_is_not_a_failed_attempt(jobs, tmp_path):
    """A failover while the job reports an epoch: the job goes on from its checkpoint, on the same attempt."""
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    calls = []

    def reports_into_a_failover(context: JobContext) -> JobResult:
        calls.append(context.job_id)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return quick_result(context)

    running = Running(make_worker(jobs, tmp_path, reports_into_a_failover, max_attempts=1))
    try:
        record = await finished(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "SUCCEEDED" and record["attempts"] == 1 and len(calls) == 2
    assert await jobs.redis.xlen(dead_letter_key("dense")) == 0


async def test_a_job_finishes_when_its_claim_keeper_swallows_the_cancellation(jobs, tmp_path):
    """Regression: the task that keeps a running job's entry claimed was stopped by cancel() alone. Python 3.11's
    asyncio.timeout (redis-py's socket timeout) turns a cancel racing the timeout into TimeoutError, which the
    keeper suppressed as a Redis error; it then kept going, `await keeper` never returned, and the job stayed
    EVALUATING while its trainer took no other job. Here the keeper's Redis call swallows every cancel so."""
    job_id, _ = await jobs.submit("dense", dense_spec(), tenant="")
    inside = threading.Event()

    def run_job(context: JobContext) -> JobResult:
        assert inside.wait(30), "the keeper never touched the entry"
        return quick_result(context)

    worker = make_worker(jobs, tmp_path, run_job)
    real_keep_claimed = worker.queue.keep_claimed

    async def keep_claimed_swallowing_cancel(entry):
        await real_keep_claimed(entry)
        inside.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise redis.TimeoutError("Timeout reading from socket") from None

    worker.queue.keep_claimed = keep_claimed_swallowing_cancel
    running = Running(worker)
    try:
        record = await finished(jobs, job_id, timeout=20)
    finally:
        await running.stop()
    assert record["state"] == "SUCCEEDED" and record["attempts"] == 1
