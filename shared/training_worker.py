"""A trainer process: takes jobs of one family from its Redis Stream and runs them to the end.

Delivery is at-least-once and the effect is applied once:
- an entry is acknowledged only after the job's result is recorded;
- a trainer that dies mid-job leaves its entry pending; another (or a restarted) trainer takes
  it over with XAUTOCLAIM once it has been idle for `claim_idle_ms`, and the job resumes from
  its last per-epoch checkpoint;
- while a job runs, its trainer touches the entry (XCLAIM JUSTID) so it is not taken over;
- after `max_attempts` deliveries the job moves to the dead-letter stream and is marked FAILED;
- the version a job writes is found again by its job id, so a retry never writes a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as redis
import torch
from prometheus_client import Counter

from shared.datasets import DatasetStore
from shared.errors import InvalidArgumentError
from shared.jobs import GROUP, TERMINAL, JobStore, dead_letter_key, queue_key
from shared.model_events import ModelEvent, ModelEvents
from shared.model_store import Manifest, ModelStore

log = logging.getLogger(__name__)

JOBS = Counter("maas_training_jobs_total", "Training job attempts by family and outcome", ["family", "outcome"])

HIGHER_IS_BETTER = {"accuracy", "f1_macro", "cv_accuracy_mean", "cv_f1_macro_mean"}


class JobCancelled(Exception):
    """Raised inside a job when its cancellation was requested; the worker records CANCELLED."""


class TrainerStopping(Exception):
    """Raised inside a job when its trainer is shutting down; the job resumes elsewhere from its checkpoint."""


@dataclass
class JobResult:
    model_version: int
    metrics: dict[str, float]
    promoted: bool
    gate_result: str


@dataclass(frozen=True)
class DataSource:
    """How a family's trainer reads data sets: its parser, what it reports of one, and its built-in sets."""

    parse: Callable[[str, bytes], Any]
    describe: Callable[[Any], dict[str, Any]]
    load_builtin: Callable[[str], Any]
    max_bytes: int = 512 * 1024 * 1024


@dataclass
class JobContext:
    """What a family's training function gets: the spec, data, store, checkpoints and progress hooks.

    Its methods are called from the compute thread; they reach Redis through the worker's loop.
    """

    job_id: str
    family: str
    spec: dict[str, Any]
    store: ModelStore
    datasets: DatasetStore
    checkpoint_dir: Path
    device: torch.device
    loop: asyncio.AbstractEventLoop
    jobs: JobStore
    data: DataSource
    stopping: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir / self.job_id / "checkpoint.pt"

    def dataset(self):
        """The job's data, parsed and checked here in the trainer; a bad data set fails the job."""
        dataset_id = self.spec.get("dataset_id")
        if not dataset_id:
            return self.data.load_builtin(self.spec["builtin_dataset"])
        meta, raw = self.datasets.read(dataset_id, self.data.max_bytes)
        parsed = self.data.parse(meta["format"], raw)
        if not meta.get("task"):
            self.datasets.describe(dataset_id, self.data.describe(parsed))
        return parsed

    def dataset_name(self) -> str:
        if self.spec.get("dataset_id"):
            return self.datasets.meta(self.spec["dataset_id"])["name"]
        return self.spec["builtin_dataset"]

    def raise_if_cancelled(self) -> None:
        """Called between epochs: cancellation and trainer shutdown take effect here."""
        if self.stopping.is_set():
            raise TrainerStopping()
        if self._call(self.jobs.get(self.job_id))["cancel_requested"]:
            raise JobCancelled()

    def message(self, text: str, state: str = "RUNNING") -> None:
        self._call(self.jobs.update(self.job_id, text, state=state))

    def report_epoch(self, epoch: int, epochs: int, loss: float, metrics: dict[str, float], first_epoch: int) -> None:
        done = epoch - first_epoch
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (epochs - epoch) if done > 0 else 0.0
        event = {
            "epoch": epoch,
            "epochs": epochs,
            "train_loss": loss,
            "validation_metrics": metrics,
            "eta_seconds": eta,
        }
        self._call(self.jobs.update(self.job_id, f"epoch {epoch}/{epochs}", event=event, state="RUNNING",
                                    epoch=epoch, train_loss=loss))  # fmt: skip

    def version_written_by_this_job(self, model: str) -> Manifest | None:
        for version in reversed(self.store.versions(model)):
            manifest = self.store.manifest(model, version)
            if manifest.source == f"job:{self.job_id}":
                return manifest
        return None

    def current_default(self, model: str) -> Manifest | None:
        try:
            return self.store.manifest(model, self.store.default_version(model))
        except Exception:  # noqa: BLE001 - a new model has no default yet
            return None

    def publish(self, record: dict[str, Any], artifacts: dict[str, Path], task: str) -> JobResult:
        """Gates, writes the version (once per job, even across retries) and promotes it if it passed."""
        model = self.spec["output_model"]
        passed, explanation = evaluate_gate(self.spec.get("gate") or {}, record["metrics"], task,
                                            self.current_default(model))  # fmt: skip
        manifest = self.version_written_by_this_job(model)
        if manifest is None:
            owner = self.spec.get("tenant", "") if self.spec.get("private") else ""
            manifest = self.store.publish(
                {**record, "name": model, "source": f"job:{self.job_id}", "promotable": passed, "owner": owner},
                artifacts,
            )
        if passed and self.store.pinned_version(model) is not None:
            self.store.pin_default(model, manifest.version)
        return JobResult(manifest.version, manifest.metrics, passed, explanation)


def evaluate_gate(gate: dict[str, Any], metrics: dict[str, float], task: str, current: Manifest | None):
    """(passed, why) for a promotion gate; no gate at all always passes."""
    metric = gate.get("metric") or ("accuracy" if task == "classification" else "mse")
    checks = []
    if metric not in metrics and (gate.get("min_value") is not None or gate.get("max_value") is not None
                                  or gate.get("better_than_default")):  # fmt: skip
        return False, f"the gate reads {metric!r}, which this job did not measure ({sorted(metrics)})"
    value = metrics.get(metric)
    if gate.get("min_value") is not None:
        checks.append((value >= gate["min_value"], f"{metric} {value:.4f} >= {gate['min_value']}"))
    if gate.get("max_value") is not None:
        checks.append((value <= gate["max_value"], f"{metric} {value:.4f} <= {gate['max_value']}"))
    if gate.get("better_than_default"):
        if current is None or metric not in current.metrics:
            checks.append((True, "no current default to beat"))
        else:
            old = current.metrics[metric]
            better = value > old if metric in HIGHER_IS_BETTER else value < old
            checks.append((better, f"{metric} {value:.4f} vs {old:.4f} of default v{current.version}"))
    if not checks:
        return True, "no gate: promoted"
    failed = [text for ok, text in checks if not ok]
    if failed:
        return False, "gate failed: " + "; ".join(f"not {text}" for text in failed)
    return True, "gate passed: " + "; ".join(text for _, text in checks)


class TrainingWorker:
    def __init__(
        self,
        family: str,
        jobs: JobStore,
        run_job: Callable[[JobContext], JobResult],
        store: ModelStore,
        datasets: DatasetStore,
        checkpoint_dir: Path,
        data: DataSource,
        device: torch.device | None = None,
        claim_idle_ms: int = 30_000,
        max_attempts: int = 3,
        block_ms: int = 1000,
        consumer: str | None = None,
        events: ModelEvents | None = None,
    ) -> None:
        self.family = family
        self.data = data
        self.events = events or ModelEvents(None)
        self.jobs = jobs
        self.run_job = run_job
        self.store = store
        self.datasets = datasets
        self.checkpoint_dir = checkpoint_dir
        self.device = device or torch.device("cpu")
        self.stopping = threading.Event()
        self.claim_idle_ms = claim_idle_ms
        self.max_attempts = max_attempts
        self.block_ms = block_ms
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stream = queue_key(family)
        self._own_pending_checked = False

    @property
    def redis(self) -> redis.Redis:
        return self.jobs.redis

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        log.info("trainer %s for %s jobs started", self.consumer, self.family)
        while not stop.is_set():
            try:
                await self.ensure_group()
                entry = await self.next_entry()
                if entry is not None:
                    await self.handle(*entry)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                # The queue's Redis is down or restarting; the jobs are safe in its AOF.
                log.warning("job queue unreachable, retrying: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def next_entry(self) -> tuple[str, str] | None:
        if not self._own_pending_checked:
            # After a restart with the same name, our own unacknowledged entries come first.
            reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: "0"}, count=1)
            self._own_pending_checked = True
            if reply and reply[0][1]:
                return _entry(reply[0][1][0])
        claimed = await self.redis.xautoclaim(self.stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=1)
        if claimed[1]:
            log.info("took over %s from a trainer that stopped answering", claimed[1][0][0].decode())
            return _entry(claimed[1][0])
        reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=1, block=self.block_ms)
        if reply and reply[0][1]:
            return _entry(reply[0][1][0])
        return None

    async def deliveries(self, entry_id: str) -> int:
        pending = await self.redis.xpending_range(self.stream, GROUP, min=entry_id, max=entry_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 1

    async def handle(self, entry_id: str, job_id: str) -> None:
        try:
            record = await self.jobs.get(job_id)
        except Exception:  # noqa: BLE001 - an entry without a record has nothing left to do
            log.error("queue entry %s names unknown job %s; acknowledging it", entry_id, job_id)
            await self.redis.xack(self.stream, GROUP, entry_id)
            return
        if record["state"] in TERMINAL:
            await self.redis.xack(self.stream, GROUP, entry_id)
            return
        attempt = await self.deliveries(entry_id)
        if attempt > self.max_attempts:
            await self.dead_letter(entry_id, record, attempt - 1)
            return
        if record["cancel_requested"]:
            await self.jobs.update(job_id, "cancelled before it started", state="CANCELLED")
            await self.redis.xack(self.stream, GROUP, entry_id)
            return
        await self.jobs.update(job_id, f"attempt {attempt} on {self.consumer}", state="RUNNING", attempts=attempt)
        heartbeat = asyncio.create_task(self._keep_claimed(entry_id))
        context = JobContext(job_id, self.family, record["spec"], self.store, self.datasets, self.checkpoint_dir,
                             self.device, asyncio.get_running_loop(), self.jobs, self.data, self.stopping)  # fmt: skip
        try:
            result = await asyncio.to_thread(self.run_job, context)
        except TrainerStopping:
            JOBS.labels(self.family, "interrupted").inc()
            # Not acknowledged: another trainer takes the entry over and resumes from the checkpoint.
            await self.jobs.update(job_id, "trainer stopping; the job resumes from its checkpoint", state="QUEUED")
            return
        except InvalidArgumentError as exc:  # the job's input is wrong: retrying cannot help
            JOBS.labels(self.family, "failed").inc()
            error = f"INVALID_ARGUMENT: {exc.message}"
            await self.jobs.update(job_id, error, state="FAILED", error=error)
            await self.redis.xack(self.stream, GROUP, entry_id)
            self._drop_checkpoint(job_id)
            return
        except JobCancelled:
            JOBS.labels(self.family, "cancelled").inc()
            await self.jobs.update(job_id, "cancelled", state="CANCELLED")
            await self.redis.xack(self.stream, GROUP, entry_id)
            self._drop_checkpoint(job_id)
            return
        except Exception as exc:  # noqa: BLE001 - recorded; the entry stays pending and is retried
            JOBS.labels(self.family, "failed_attempt").inc()
            log.exception("job %s failed on attempt %d", job_id, attempt)
            retry = "will retry" if attempt < self.max_attempts else "no attempts left"
            await self.jobs.update(job_id, f"attempt {attempt} failed ({retry}): {exc}", state="QUEUED",
                                   error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return
        finally:
            heartbeat.cancel()
        await self.jobs.update(
            job_id,
            result.gate_result,
            state="SUCCEEDED",
            metrics=result.metrics,
            model_version=result.model_version,
            promoted="1" if result.promoted else "0",
            gate_result=result.gate_result,
            error="",
        )
        await self.redis.xack(self.stream, GROUP, entry_id)
        self._drop_checkpoint(job_id)
        JOBS.labels(self.family, "succeeded").inc()
        # The family's services load the new version now, not at their next poll of the store.
        await self.events.publish(ModelEvent(self.family, record["spec"]["output_model"], "published",
                                             result.model_version))  # fmt: skip
        log.info("job %s succeeded: %s v%d", job_id, record["spec"].get("output_model"), result.model_version)

    async def dead_letter(self, entry_id: str, record: dict[str, Any], failed_attempts: int) -> None:
        job_id = record["job_id"]
        error = f"gave up after {failed_attempts} failed attempts; last error: {record.get('error') or 'unknown'}"
        await self.redis.xadd(dead_letter_key(self.family), {"job_id": job_id, "entry_id": entry_id, "error": error})
        await self.jobs.update(job_id, error, state="FAILED", error=error)
        await self.redis.xack(self.stream, GROUP, entry_id)
        self._drop_checkpoint(job_id)
        JOBS.labels(self.family, "dead_lettered").inc()
        log.error("job %s moved to the dead-letter stream: %s", job_id, error)

    async def _keep_claimed(self, entry_id: str) -> None:
        """Resets the entry's idle time while the job runs, without counting a delivery."""
        while True:
            await asyncio.sleep(max(0.2, self.claim_idle_ms / 3000))
            with contextlib.suppress(redis.RedisError, OSError):
                await self.redis.xclaim(self.stream, GROUP, self.consumer, 0, [entry_id], justid=True)

    def _drop_checkpoint(self, job_id: str) -> None:
        shutil.rmtree(self.checkpoint_dir / job_id, ignore_errors=True)


def _entry(raw: tuple[bytes, dict[bytes, bytes]]) -> tuple[str, str]:
    entry_id, fields = raw
    return entry_id.decode(), fields[b"job_id"].decode()


async def serve_trainer(
    family: str, run_job: Callable[[JobContext], JobResult], settings: Any, data: DataSource
) -> None:
    """Runs one family's trainer until SIGTERM; a job in progress stops at its next epoch boundary."""
    from shared.observability import start_metrics_server
    from shared.torch_device import resolve_torch_device

    torch.set_num_threads(settings.torch_threads)
    start_metrics_server(settings.metrics_port)
    jobs = JobStore.from_url(settings.queue_redis_url)
    worker = TrainingWorker(
        family,
        jobs,
        run_job,
        ModelStore(settings.model_store),
        DatasetStore(settings.dataset_dir),
        Path(settings.checkpoint_dir),
        DataSource(data.parse, data.describe, data.load_builtin, settings.max_dataset_bytes),
        device=resolve_torch_device(settings.device, settings.device_index, settings.gpu_memory_limit_mb),
        claim_idle_ms=settings.claim_idle_ms,
        max_attempts=settings.max_attempts,
        block_ms=settings.block_ms,
        events=ModelEvents(settings.queue_redis_url),
    )
    stop = asyncio.Event()

    def request_stop() -> None:
        worker.stopping.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    try:
        await worker.run(stop)
    finally:
        await jobs.close()
        log.info("trainer %s stopped", worker.consumer)
