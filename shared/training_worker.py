"""A trainer process: takes jobs of one family from its tenants' queues and runs them to the end.

Delivery is at-least-once and the effect is applied once:
- an entry is acknowledged only after the job's result is recorded;
- the tenants' queues are read round robin (shared.jobs.JobQueue), so tenants share trainers fairly;
- attempts are counted in the job's record: each attempt that fails, or whose trainer dies mid-job,
  counts; after `max_attempts` of them the job moves to the dead-letter stream and is marked FAILED;
- a trainer that is shut down (SIGTERM) stops at the job's next epoch boundary and hands the job
  back without spending an attempt: any trainer takes it at once and resumes from the checkpoint;
- a trainer that dies mid-job leaves its entry pending; another (or a restarted) trainer takes it
  over with XAUTOCLAIM once it has been idle for `claim_idle_ms`, and resumes from the checkpoint;
- while a job runs, its trainer touches the entry (XCLAIM JUSTID) so it is not taken over;
- a Redis error leaves the entry pending, to be read again; only a job whose record does not exist
  is acknowledged unseen;
- a job's input that is wrong (INVALID_ARGUMENT: its data, or its size past the limits), an output
  model that belongs to another owner (FAILED_PRECONDITION) and a job past its timeout
  (DEADLINE_EXCEEDED) fail the job at once, without retrying;
- the version a job writes is found again by its job id, so a retry never writes a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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
from shared.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    MaasError,
    NotFoundError,
)
from shared.job_files import CHECKPOINT_FILE, JobFiles
from shared.job_limits import JobLimits, check_job_size
from shared.jobs import EXPLAIN, TERMINAL, JobQueue, JobStore, QueueEntry
from shared.keyring import Keyring
from shared.liveness import Heartbeat, start_metrics_and_health_server
from shared.model_events import ModelEvent, ModelEvents
from shared.model_store import Manifest, ModelStore
from shared.workers import stop_with_parent_if_asked

log = logging.getLogger(__name__)

JOBS = Counter("maas_training_jobs_total", "Training job attempts by family and outcome", ["family", "outcome"])

HIGHER_IS_BETTER = {"accuracy", "f1_macro", "f1_micro", "exact_match", "cv_accuracy_mean", "cv_f1_macro_mean",
                    "recall@10", "ndcg@10"}


class JobCancelled(Exception):
    """Raised inside a job when its cancellation was requested; the worker records CANCELLED."""


class TrainerStopping(Exception):
    """Raised inside a job when its trainer is shutting down; the job resumes elsewhere from its checkpoint."""


def refused(exc: BaseException) -> bool:
    """Errors that are the job's own (its input, its output name, its timeout): retrying cannot help.
    A file that fails its sha256 check is retried: storage may heal."""
    return isinstance(exc, (InvalidArgumentError, FailedPreconditionError, DeadlineExceededError)) and not isinstance(
        exc, IntegrityError
    )


@dataclass
class JobResult:
    model_version: int
    metrics: dict[str, float]
    promoted: bool
    gate_result: str
    # A job that makes bytes rather than a version (an explanation): stored with the job.
    result: bytes | None = None



def by_kind(train: Callable[[JobContext], JobResult],
            explain: Callable[[JobContext], JobResult]) -> Callable[[JobContext], JobResult]:  # fmt: skip
    """A family's job function: explanation jobs (spec kind "explain") share the queue with training jobs."""

    def run(context: JobContext) -> JobResult:
        return explain(context) if context.spec.get("kind") == EXPLAIN else train(context)

    return run


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
    limits: JobLimits = field(default_factory=JobLimits.defaults)
    timeout_s: float = 3600.0
    # Training time earlier attempts used; this attempt's runs from `attempt_started`.
    prior_run_s: float = 0.0
    attempt_started: float = field(default_factory=time.monotonic)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    # Starts a data-parallel job's workers (shared.data_parallel.WorkerLauncher); torchrun on this machine if None.
    launcher: Any = None

    def __post_init__(self) -> None:
        if self.launcher is None:
            from shared.data_parallel import TorchrunLauncher

            self.launcher = TorchrunLauncher()

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def run_s(self) -> float:
        """Training time the job has used, over all its attempts."""
        return self.prior_run_s + time.monotonic() - self.attempt_started

    def check_size(self, in_shape: list[int], outputs: int, rows: int) -> None:
        """The exact size check, once the data is parsed: past a limit, the job fails with INVALID_ARGUMENT."""
        check_job_size(self.spec, self.limits, [int(n) for n in in_shape], outputs, rows)

    @property
    def owner(self) -> str:
        """Who the job's version (and its files) belong to: its tenant for a private job, else everyone."""
        return self.spec.get("tenant", "") if self.spec.get("private") else ""

    @property
    def files(self) -> JobFiles:
        return JobFiles(self.store, self.checkpoint_dir / self.job_id, self.owner, self.job_id)

    @property
    def checkpoint_path(self) -> Path:
        return self.files.path(CHECKPOINT_FILE)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Writes the job's checkpoint (weights, optimizer, epoch) in one rename, sealed when the store is."""
        self.files.save(CHECKPOINT_FILE, state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The job's last checkpoint, decrypted in memory; None when there is none or its KEK is gone."""
        return self.files.load(CHECKPOINT_FILE)

    def dataset(self):
        """The job's data, parsed and checked here in the trainer; a bad data set fails the job."""
        dataset_id = self.spec.get("dataset_id")
        if not dataset_id:
            return self.data.load_builtin(self.spec["builtin_dataset"])
        meta, raw = self.datasets.read(dataset_id, self.data.max_bytes)
        parsed = self.data.parse(meta["format"], raw)
        self.heartbeat.beat()
        if not meta.get("task"):
            self.datasets.describe(dataset_id, self.data.describe(parsed))
        return parsed

    def dataset_name(self) -> str:
        if self.spec.get("dataset_id"):
            return self.datasets.meta(self.spec["dataset_id"])["name"]
        return self.spec["builtin_dataset"]

    def raise_if_cancelled(self) -> None:
        """Called between epochs (and folds): trainer shutdown, the job's timeout and cancellation take effect here."""
        self.heartbeat.beat()
        if self.stopping.is_set():
            raise TrainerStopping()
        used = self.run_s()
        if used > self.timeout_s:
            raise DeadlineExceededError(
                f"the job has trained for {used:.1f} s, past its timeout of {self.timeout_s:g} s (job_timeout_s); "
                "it stopped at an epoch boundary"
            )
        if self._call(self.jobs.get(self.job_id))["cancel_requested"]:
            raise JobCancelled()

    def message(self, text: str, state: str = "RUNNING") -> None:
        self.heartbeat.beat()
        self._call(self.jobs.update(self.job_id, text, state=state))

    def report_epoch(self, epoch: int, epochs: int, loss: float, metrics: dict[str, float], first_epoch: int) -> None:
        self.heartbeat.beat()
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
                                    epoch=epoch, train_loss=loss, run_s=round(self.run_s(), 3)))  # fmt: skip

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

    def publish(self, record: dict[str, Any], artifacts: dict[str, Path | bytes], task: str) -> JobResult:
        """Gates, writes the version (once per job, even across retries) and promotes it if it passed.

        Right before writing, and under a lock every trainer takes, the model is checked again: it must
        still belong to the owner this job writes for, and keep its family and kind."""
        model = self.spec["output_model"]
        passed, explanation = evaluate_gate(self.spec.get("gate") or {}, record["metrics"], task,
                                            self.current_default(model))  # fmt: skip
        owner = self.owner
        with self._publish_lock(model):
            manifest = self.version_written_by_this_job(model)
            if manifest is None:
                self.check_still_writable(model, owner, record)
                manifest = self.store.publish(
                    {**record, "name": model, "source": f"job:{self.job_id}", "promotable": passed, "owner": owner},
                    artifacts,
                )
        if passed and self.store.pinned_version(model) is not None:
            self.store.pin_default(model, manifest.version)
        return JobResult(manifest.version, manifest.metrics, passed, explanation)

    def check_still_writable(self, model: str, owner: str, record: dict[str, Any]) -> None:
        """The submit-time check, again against the store: two jobs may have raced for one new name."""
        versions = self.store.versions(model)
        if not versions:
            return
        latest = self.store.manifest(model, versions[-1])
        if latest.owner != owner:
            held = (
                "public" if not latest.owner
                else "private to this job's tenant" if latest.owner == self.spec.get("tenant", "")
                else "private to another tenant"
            )  # fmt: skip
            writes = "a version private to its tenant" if owner else "a public version"
            raise FailedPreconditionError(
                f"output_model: {model!r} belongs to another owner: it is {held}, and this job would write "
                f"{writes}; nothing was written, choose another name"
            )
        old = (latest.family, latest.config.get("kind"))
        new = (record["family"], record.get("config", {}).get("kind"))
        if old != new:
            raise InvalidArgumentError(
                f"output_model: {model!r} is {_kind(*old)} model and this job trains {_kind(*new)} one; a new "
                "version may not change a model's kind: choose another name"
            )

    @contextlib.contextmanager
    def _publish_lock(self, model: str):
        """One check-and-write at a time per model, across trainers sharing the store."""
        directory = self.store.root / model
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ".publish.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _kind(family: str, kind: str | None) -> str:
    return f"a {family} {kind}" if kind else f"a {family}"


def evaluate_gate(gate: dict[str, Any], metrics: dict[str, float], task: str, current: Manifest | None):
    """(passed, why) for a promotion gate; no gate at all always passes."""
    metric = gate.get("metric") or {"classification": "accuracy", "multilabel": "f1_macro",
                                    "ranking": "recall@10"}.get(task, "mse")  # fmt: skip
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
        limits: JobLimits | None = None,
        job_timeout_s: float = 3600.0,
        heartbeat: Heartbeat | None = None,
        launcher: Any = None,
    ) -> None:
        self.launcher = launcher
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
        self.limits = limits or JobLimits.defaults()
        self.job_timeout_s = job_timeout_s
        self.heartbeat = heartbeat or Heartbeat()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.queue = JobQueue(jobs, family, self.consumer, claim_idle_ms, block_ms)
        self._limits_published = False
        # Jobs whose attempt here a Redis failure cut short: read again, they go on with the same attempt.
        self._cut_short: set[str] = set()

    @property
    def redis(self) -> redis.Redis:
        return self.jobs.redis

    async def run(self, stop: asyncio.Event) -> None:
        log.info("trainer %s for %s jobs started", self.consumer, self.family)
        while not stop.is_set():
            self.heartbeat.beat()
            try:
                if not self._limits_published:
                    await self.jobs.publish_limits(self.family, self.limits)
                    self._limits_published = True
                entry = await self.queue.next()
                if entry is not None:
                    await self.handle(entry)
            except (redis.RedisError, OSError) as exc:
                # The queue's Redis is down, restarting or failing over; the jobs are safe in its AOF, and
                # an entry whose handling this cut short is still pending: read it again first.
                log.warning("job queue unreachable, retrying: %s", exc)
                self.queue.check_own_pending = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def handle(self, entry: QueueEntry) -> None:
        job_id = entry.job_id
        try:
            record = await self.jobs.get(job_id)
        except NotFoundError:  # only a record that is not there; a Redis error leaves the entry pending
            log.error("queue entry %s names unknown job %s; acknowledging it", entry.entry_id, job_id)
            await self.queue.ack(entry)
            return
        if record["state"] in TERMINAL:
            await self.queue.ack(entry)
            return
        if self.stopping.is_set():  # read as the trainer was stopping: not started, so it costs nothing
            await self.queue.release(entry)
            return
        if record["cancel_requested"]:
            await self.jobs.update(job_id, "cancelled before it started", state="CANCELLED")
            await self.queue.ack(entry)
            return
        note, extra = "", {}
        if job_id in self._cut_short:  # our own attempt, stopped by the queue's Redis, not by the job
            self._cut_short.discard(job_id)
            record["attempts"] = max(record["attempts"] - 1, 0)
        elif record["state"] in ("RUNNING", "EVALUATING") and record["attempts"]:
            # The last attempt never reported back: its trainer was killed (SIGKILL, out of memory) or hung.
            error = (f"attempt {record['attempts']} on {record.get('trainer') or 'a trainer'} ended without a "
                     "result: its trainer was killed or stopped answering")  # fmt: skip
            note, extra, record["error"] = f"; {error}", {"error": error}, error
        if record["attempts"] >= self.max_attempts:
            await self.dead_letter(entry, record, record["attempts"])
            return
        attempt = record["attempts"] + 1
        await self.jobs.update(job_id, f"attempt {attempt} on {self.consumer}{note}", state="RUNNING",
                               attempts=attempt, trainer=self.consumer, **extra)  # fmt: skip
        keeping = asyncio.Event()
        keeper = asyncio.create_task(self._keep_claimed(entry, keeping))
        context = JobContext(
            job_id, self.family, record["spec"], self.store, self.datasets, self.checkpoint_dir, self.device,
            asyncio.get_running_loop(), self.jobs, self.data, self.stopping, limits=self.limits,
            timeout_s=self.job_timeout_s, prior_run_s=record["run_s"], heartbeat=self.heartbeat,
            launcher=self.launcher,
        )  # fmt: skip
        outcome: Exception | None = None
        try:
            result = await asyncio.to_thread(self.run_job, context)
        except Exception as exc:  # noqa: BLE001 - every outcome but a result is handled below
            outcome = exc
        finally:
            # Stopped before the entry changes hands, so a late touch cannot undo a hand-back. The event
            # ends it even if a Redis call swallows the cancellation (Python 3.11's asyncio.timeout turns a
            # cancel that races the socket timeout into TimeoutError, a RedisError it would suppress).
            keeping.set()
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if outcome is not None:
            await self.ended_without_result(entry, record, attempt, context, outcome)
            return
        await self.jobs.update(
            job_id,
            result.gate_result,
            state="SUCCEEDED",
            metrics=result.metrics,
            model_version=result.model_version,
            promoted="1" if result.promoted else "0",
            gate_result=result.gate_result,
            error="",
            run_s=round(context.run_s(), 3),
            result=result.result,
        )
        await self.queue.ack(entry)
        self._drop_checkpoint(job_id)
        JOBS.labels(self.family, "succeeded").inc()
        if result.result is not None:
            log.info("job %s succeeded: %s", job_id, result.gate_result)
            return
        # The family's services load the new version now, not at their next poll of the store.
        await self.events.publish(ModelEvent(self.family, record["spec"]["output_model"], "published",
                                             result.model_version))  # fmt: skip
        log.info("job %s succeeded: %s v%d", job_id, record["spec"].get("output_model"), result.model_version)

    async def ended_without_result(
        self, entry: QueueEntry, record: dict[str, Any], attempt: int, context: JobContext, exc: Exception
    ) -> None:
        job_id = entry.job_id
        if isinstance(exc, redis.RedisError):
            # The queue's Redis failed under the job (an epoch report, a cancellation check): not the job's
            # failure. The entry stays pending; the worker's loop reads it again once Redis answers.
            self._cut_short.add(job_id)
            raise exc
        if isinstance(exc, TrainerStopping):
            JOBS.labels(self.family, "handed_back").inc()
            # Not an attempt: the entry is any trainer's to take at once, and the job resumes from its checkpoint.
            await self.queue.hand_back(entry, "trainer stopping; the job is back in the queue and resumes from its "
                                       "checkpoint", state="QUEUED", attempts=attempt - 1,
                                       run_s=round(context.run_s(), 3))  # fmt: skip
            return
        if isinstance(exc, JobCancelled):
            JOBS.labels(self.family, "cancelled").inc()
            await self.jobs.update(job_id, "cancelled", state="CANCELLED")
        elif refused(exc):
            assert isinstance(exc, MaasError)
            JOBS.labels(self.family, "failed").inc()
            error = f"{exc.code.name}: {exc.message}"
            await self.jobs.update(job_id, error, state="FAILED", error=error, run_s=round(context.run_s(), 3))
        else:
            JOBS.labels(self.family, "failed_attempt").inc()
            log.exception("job %s failed on attempt %d", job_id, attempt, exc_info=exc)
            error = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_attempts:
                # The entry stays pending: a trainer takes it again once it has been idle for claim_idle_ms.
                await self.jobs.update(job_id, f"attempt {attempt} failed (will retry): {exc}", state="QUEUED",
                                       error=error, run_s=round(context.run_s(), 3))  # fmt: skip
                return
            await self.jobs.update(job_id, f"attempt {attempt} failed (no attempts left): {exc}", error=error)
            await self.dead_letter(entry, {**record, "error": error}, attempt)
            return
        await self.queue.ack(entry)
        self._drop_checkpoint(job_id)

    async def dead_letter(self, entry: QueueEntry, record: dict[str, Any], failed_attempts: int) -> None:
        job_id = record["job_id"]
        error = f"gave up after {failed_attempts} failed attempts; last error: {record.get('error') or 'unknown'}"
        await self.jobs.update(job_id, error, state="FAILED", error=error)
        await self.queue.dead_letter(entry, error)
        self._drop_checkpoint(job_id)
        JOBS.labels(self.family, "dead_lettered").inc()
        log.error("job %s moved to the dead-letter stream: %s", job_id, error)

    async def _keep_claimed(self, entry: QueueEntry, keeping: asyncio.Event) -> None:
        """Resets the entry's idle time while the job runs, without counting a delivery, until `keeping` is set."""
        while not keeping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(keeping.wait(), max(0.2, self.claim_idle_ms / 3000))
            if keeping.is_set():
                return
            with contextlib.suppress(redis.RedisError, OSError):
                await self.queue.keep_claimed(entry)

    def _drop_checkpoint(self, job_id: str) -> None:
        shutil.rmtree(self.checkpoint_dir / job_id, ignore_errors=True)


def worker_launcher(family: str, settings: Any) -> Any:
    """How this trainer starts a data-parallel job's workers: torchrun here, or a PyTorchJob on Kubernetes."""
    if getattr(settings, "distributed_launcher", "torchrun") == "kubernetes":
        from shared.pytorchjob import PyTorchJobLauncher

        return PyTorchJobLauncher.from_settings(family, settings)
    from shared.data_parallel import TorchrunLauncher

    return TorchrunLauncher(settings.max_worker_restarts, settings.rendezvous_timeout_s,
                            threads=settings.torch_threads)  # fmt: skip


async def serve_trainer(
    family: str, run_job: Callable[[JobContext], JobResult], settings: Any, data: DataSource
) -> None:
    """Runs one family's trainer until SIGTERM; a job in progress stops at its next epoch boundary and
    goes back to the queue."""
    from shared.torch_device import resolve_torch_device

    stop_with_parent_if_asked()
    torch.set_num_threads(settings.torch_threads)
    heartbeat = Heartbeat()
    start_metrics_and_health_server(settings.metrics_port, heartbeat, settings.liveness_timeout_s)
    jobs = JobStore.from_url(settings.queue_redis_url)
    keyring = Keyring.from_settings(settings)
    (log.info if keyring.enabled else log.warning)("model, data-set and checkpoint stores: %s", keyring.describe())
    worker = TrainingWorker(
        family,
        jobs,
        run_job,
        ModelStore(settings.model_store, keyring),
        DatasetStore(settings.dataset_dir, keyring),
        Path(settings.checkpoint_dir),
        DataSource(data.parse, data.describe, data.load_builtin, settings.max_dataset_bytes),
        device=resolve_torch_device(settings.device, settings.device_index, settings.gpu_memory_limit_mb),
        claim_idle_ms=settings.claim_idle_ms,
        max_attempts=settings.max_attempts,
        block_ms=settings.block_ms,
        events=ModelEvents(settings.queue_redis_url),
        limits=JobLimits.from_settings(settings),
        job_timeout_s=settings.job_timeout_s,
        heartbeat=heartbeat,
        launcher=worker_launcher(family, settings),
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
