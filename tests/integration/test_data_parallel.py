"""Data-parallel jobs (world_size > 1): a TrainingWorker in this process, against a real queue Redis, starts real
torchrun workers (gloo, one process each) on the real dense and nlp training code, in a sealed model store."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from gateway.job_spec import normalize
from services.dense import datasets as dense_data
from services.dense.training import run_job as dense_run_job
from shared.data_parallel import TorchrunLauncher
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
