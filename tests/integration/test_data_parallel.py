"""Data-parallel jobs (world_size > 1): a TrainingWorker in this process, against a real queue Redis, starts real
torchrun workers (gloo, one process each) on the real dense and nlp training code, in a sealed model store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.job_spec import normalize
from services.dense import datasets as dense_data
from services.dense.training import run_job as dense_run_job
from shared.cluster import free_port
from shared.data_parallel import ATTEMPT_FILE, LOG_FILE, PROGRESS_FILE, WORKER_MODULE, TorchrunLauncher
from shared.datasets import DatasetStore
from shared.jobs import JobStore
from shared.keyring import Keyring, create_kek
from shared.model_store import ModelStore
from shared.training_worker import DataSource, TrainingWorker
from tests.integration.test_queue_worker import Running, finished, wait_until

DENSE_DATA = DataSource(dense_data.parse, dense_data.describe, dense_data.load_builtin)
# Held-out accuracy of a 2-worker job against the 1-worker job on the same seed. The global batch and the
# order of examples are the same (shared/ddp_worker.py), so the two differ only by float summation order and
# the last, padded batch of each epoch; 0.02 is 7 of digits' 360 test images.
ACCURACY_TOLERANCE = 0.02


def sealed_store(tmp_path: Path) -> ModelStore:
    create_kek(tmp_path / "keys", "test-1")
    return ModelStore(tmp_path / "models", Keyring(tmp_path / "keys", "test-1"))


def make_worker(jobs: JobStore, tmp_path: Path, store: ModelStore, launcher=None, **options) -> TrainingWorker:
    defaults = {"claim_idle_ms": 2000, "block_ms": 100, "consumer": "trainer-1"}
    return TrainingWorker("dense", jobs, dense_run_job, store, DatasetStore(tmp_path / "datasets"),
                          tmp_path / "checkpoints", DENSE_DATA, launcher=launcher or TorchrunLauncher(),
                          **{**defaults, **options})  # fmt: skip


def spec(**changes) -> dict:
    request = {"architecture": "mlp", "hidden_sizes": [32], "epochs": 6, "batch_size": 32, "builtin_dataset": "digits",
               "output_model": "ddp-digits", "seed": 7, **changes}  # fmt: skip
    return {**normalize(request, "dense", None), "tenant": ""}


def versions_of(store: ModelStore, model: str, job_id: str) -> list[int]:
    return [v for v in store.versions(model) if store.manifest(model, v).source == f"job:{job_id}"]


async def test_two_workers_reach_the_accuracy_of_one_on_the_same_seed_and_write_one_version(jobs, tmp_path):
    store = sealed_store(tmp_path)
    running = Running(make_worker(jobs, tmp_path, store))
    try:
        one, _ = await jobs.submit("dense", spec(output_model="ddp-one"), tenant="")
        two, _ = await jobs.submit("dense", spec(output_model="ddp-two", world_size=2), tenant="")
        single, double = await finished(jobs, one, 300), await finished(jobs, two, 300)
    finally:
        await running.stop()
    assert single["state"] == "SUCCEEDED" and double["state"] == "SUCCEEDED", double.get("error")
    assert abs(double["metrics"]["accuracy"] - single["metrics"]["accuracy"]) <= ACCURACY_TOLERANCE
    assert double["metrics"]["accuracy"] > 0.8
    assert versions_of(store, "ddp-two", two) == [1] and double["model_version"] == 1 and double["promoted"]
    events = [event for _, event in await jobs.history(two)]
    assert [e["epoch"] for e in events if e.get("epochs")] == [1, 2, 3, 4, 5, 6]  # rank 0's epochs, in order
    assert all(e["validation_metrics"]["accuracy"] > 0 for e in events if e.get("epochs"))
    assert any("starting 2 data-parallel workers (gloo)" in e["message"] for e in events)
    assert not (tmp_path / "checkpoints" / two).exists()  # the job's files go with its success


@pytest.mark.parametrize(
    ("architecture", "dataset", "metric", "tolerance"),
    [("cnn", "digits-images", "accuracy", ACCURACY_TOLERANCE), ("gru", "sine", "mse", 0.05)],
)
async def test_cnn_and_gru_train_on_two_workers_as_on_one(jobs, tmp_path, architecture, dataset, metric, tolerance):
    """mse within 5% of the 1-worker job's; accuracy within ACCURACY_TOLERANCE."""
    store = ModelStore(tmp_path / "models")
    running = Running(make_worker(jobs, tmp_path, store))
    changes = {"architecture": architecture, "hidden_sizes": [8], "epochs": 3, "builtin_dataset": dataset}
    try:
        one, _ = await jobs.submit("dense", spec(output_model="ddp-one", **changes), tenant="")
        two, _ = await jobs.submit("dense", spec(output_model="ddp-two", world_size=2, **changes), tenant="")
        single, double = await finished(jobs, one, 300), await finished(jobs, two, 300)
    finally:
        await running.stop()
    assert double["state"] == "SUCCEEDED", double.get("error")
    expected, got = single["metrics"][metric], double["metrics"][metric]
    assert abs(got - expected) <= (tolerance * expected if metric == "mse" else tolerance), (expected, got)
    assert versions_of(store, "ddp-two", two) == [1]


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def worker_pids(jobs: JobStore, tmp_path: Path, job_id: str, world_size: int, past_epoch: int) -> list[int]:
    """The workers' pids, once rank 0 has reported `past_epoch` epochs (so they are mid-job)."""
    ddp = tmp_path / "checkpoints" / job_id / "ddp"

    async def running():
        record = await jobs.get(job_id)
        files = [ddp / f"worker-{rank}.pid" for rank in range(world_size)]
        if record["epoch"] >= past_epoch and all(f.exists() for f in files):
            return [int(f.read_text()) for f in files]
        return None

    return await wait_until(running, 120, f"job {job_id} past epoch {past_epoch}")


async def test_a_worker_killed_mid_job_is_restarted_from_the_checkpoint_and_the_job_completes_once(jobs, tmp_path):
    store = sealed_store(tmp_path)
    running = Running(make_worker(jobs, tmp_path, store))
    try:
        # Many short epochs: the kill lands after the second, long before the last, on any machine.
        job_id, _ = await jobs.submit("dense", spec(world_size=2, epochs=80, batch_size=16), tenant="")
        pids = await worker_pids(jobs, tmp_path, job_id, 2, past_epoch=2)
        os.kill(pids[1], signal.SIGKILL)
        record = await finished(jobs, job_id, 600)
    finally:
        await running.stop()
    assert record["state"] == "SUCCEEDED", record.get("error")
    assert record["attempts"] == 1  # torchrun restarted the workers; the queue did not need to retry
    assert versions_of(store, "ddp-digits", job_id) == [1] and store.versions("ddp-digits") == [1]
    events = [event for _, event in await jobs.history(job_id)]
    resumed = [e["message"] for e in events if "resumed from the checkpoint after epoch" in e["message"]]
    assert len(resumed) == 1 and "(restart 1)" in resumed[0], [e["message"] for e in events]
    epochs = [e["epoch"] for e in events if e.get("epochs")]
    assert epochs[-1] == 80 and epochs == sorted(epochs)  # resumed, not started over
    assert [e["state"] for e in events].count("SUCCEEDED") == 1
    assert record["metrics"]["accuracy"] > 0.8


async def test_workers_that_cannot_meet_fail_the_job_with_a_clear_error_not_a_hang(jobs, tmp_path):
    # Two machines' agents are expected at the rendezvous, and only this one comes.
    launcher = TorchrunLauncher(max_restarts=0, rendezvous_timeout_s=3, nnodes=2)
    running = Running(make_worker(jobs, tmp_path, ModelStore(tmp_path / "models"), launcher, max_attempts=1))
    try:
        job_id, _ = await jobs.submit("dense", spec(world_size=2), tenant="")
        record = await finished(jobs, job_id, 300)
    finally:
        await running.stop()
    assert record["state"] == "FAILED"
    assert "the job's workers did not meet within 3 s (rendezvous_timeout_s)" in record["error"], record["error"]
    assert ModelStore(tmp_path / "models").versions("ddp-digits") == []


async def test_cancelling_a_distributed_job_stops_every_worker(jobs, tmp_path):
    running = Running(make_worker(jobs, tmp_path, ModelStore(tmp_path / "models")))
    try:
        job_id, _ = await jobs.submit("dense", spec(world_size=2, epochs=5000, batch_size=8), tenant="")
        pids = await worker_pids(jobs, tmp_path, job_id, 2, past_epoch=1)
        await jobs.request_cancel(job_id)
        record = await finished(jobs, job_id, 120)
        await wait_until(lambda: asyncio.sleep(0, not any(alive(pid) for pid in pids)), 30, "the workers to exit")
    finally:
        await running.stop()
    assert record["state"] == "CANCELLED"
    assert ModelStore(tmp_path / "models").versions("ddp-digits") == []


STOPPED = "another attempt owns its checkpoint now; stopping"  # rank 0's last words, in the workers' log


async def epochs_reported(jobs: JobStore, job_id: str) -> list[int]:
    return [event["epoch"] for _, event in await jobs.history(job_id) if event.get("epochs")]


async def test_workers_of_an_attempt_that_was_taken_over_stop_without_writing_the_checkpoint(jobs, tmp_path):
    """Another trainer that takes the job over writes its own attempt token: the first attempt's rank 0 stops at
    its next epoch's end, before it would write the checkpoint the new attempt resumes from."""
    launcher = TorchrunLauncher(max_restarts=0)
    running = Running(make_worker(jobs, tmp_path, ModelStore(tmp_path / "models"), launcher, max_attempts=1))
    try:
        job_id, _ = await jobs.submit("dense", spec(world_size=2, epochs=5000, batch_size=8), tenant="")
        pids = await worker_pids(jobs, tmp_path, job_id, 2, past_epoch=1)
        (tmp_path / "checkpoints" / job_id / ATTEMPT_FILE).write_text("a-later-attempt")  # as a taker-over does
        checkpointed = int(json.loads((tmp_path / "checkpoints" / job_id / PROGRESS_FILE).read_text()
                                      .splitlines()[-1]).get("epoch", 0))  # fmt: skip
        log = tmp_path / "checkpoints" / job_id / LOG_FILE  # read before the failed job's files are removed
        await wait_until(lambda: asyncio.sleep(0, log.exists() and STOPPED in log.read_text()), 120, "rank 0 to stop")
        record = await finished(jobs, job_id, 120)
        await wait_until(lambda: asyncio.sleep(0, not any(alive(pid) for pid in pids)), 30, "the workers to exit")
        reported = await epochs_reported(jobs, job_id)
    finally:
        await running.stop()
    assert record["state"] == "FAILED", record
    # At most the epoch that was past the check when the token changed is checkpointed and reported after it.
    assert max(reported) <= max(checkpointed, 1) + 1, (checkpointed, reported)
    assert ModelStore(tmp_path / "models").versions("ddp-digits") == []


def test_a_worker_whose_trainer_dies_stops_its_launcher_and_itself(tmp_path):
    """A stand-in trainer process is SIGKILLed; the worker (waiting at its rendezvous for a rank that never
    comes) sends SIGTERM to its parent, the launcher, and exits, instead of training on unwatched."""
    trainer = subprocess.Popen(["sleep", "600"])
    port = free_port()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    worker = [sys.executable, "-m", WORKER_MODULE, "--job-id", "j", "--job-dir", str(tmp_path), "--store",
              str(tmp_path / "models"), "--timeout-s", "600", "--trainer-pid", str(trainer.pid)]  # fmt: skip
    # The launcher stand-in: a shell that runs the worker and waits for it, as torchrun's agent does.
    launcher = subprocess.Popen(["sh", "-c", 'echo "$$" > launcher.pid; "$@" & echo "$!" > worker.pid; wait', "sh",
                                 *worker], cwd=tmp_path, env=env, start_new_session=True)  # fmt: skip
    try:
        for _ in range(600):  # the worker is up and waiting for rank 1 at its rendezvous
            if (tmp_path / "worker.pid").exists() and _listening(port):
                break
            time.sleep(0.1)
        worker_pid = int((tmp_path / "worker.pid").read_text())
        assert alive(worker_pid) and launcher.poll() is None
        trainer.kill()
        trainer.wait()
        assert launcher.wait(60) == -signal.SIGTERM  # the worker told its launcher to stop
        for _ in range(300):
            if not alive(worker_pid):
                break
            time.sleep(0.1)
        assert not alive(worker_pid)
    finally:
        trainer.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
