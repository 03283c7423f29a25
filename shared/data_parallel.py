"""Data-parallel training jobs, trainer side: a job with world_size > 1 fits its network on N workers.

The trainer that took the job prepares everything the workers need (the training and validation tensors,
the network's recipe and its initial weights) as one sealed file in the job's checkpoint folder, starts the
workers through an engine made for it (torchrun here; a Kubeflow PyTorchJob on Kubernetes:
shared.pytorchjob), relays rank 0's epochs to the job's events, and stops every worker on cancellation,
shutdown or timeout. Rank 0 writes the checkpoint after each epoch; its last one is the fitted network,
which the trainer then evaluates, gates and publishes with the same code as a one-worker job, once.

Files, under <checkpoint_dir>/<job_id>/:
  checkpoint.pt        the job's checkpoint, as a one-worker job's (weights, optimizer, epoch, losses)
  ddp/data.pt          what the workers read (sealed like the checkpoint)
  ddp/attempt          the token of the attempt that owns the job's files; rank 0 of any other stops
  ddp/progress.jsonl   rank 0's lines: "met" (all workers are up), "message", "epoch"
  ddp/worker-<rank>.pid  each worker's pid, rewritten by every restart
  ddp/workers.log      the engine's output, whose tail a failure quotes
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from shared.errors import UnavailableError
from shared.job_files import CHECKPOINT_FILE

log = logging.getLogger(__name__)

WORKER_MODULE = "shared.ddp_worker"
DATA_FILE = "ddp/data.pt"
ATTEMPT_FILE = "ddp/attempt"
PROGRESS_FILE = "ddp/progress.jsonl"
LOG_FILE = "ddp/workers.log"
POLL_S = 0.25


@dataclass(frozen=True)
class NetworkRecipe:
    """How a worker builds the job's network: an importable factory ("module:callable") and its JSON keyword
    arguments; the trainer's initial weights are loaded into it, so every worker starts from the same ones."""

    factory: str
    kwargs: dict[str, Any]

    def build(self) -> torch.nn.Module:
        import importlib

        module, name = self.factory.split(":")
        return getattr(importlib.import_module(module), name)(**self.kwargs)


@dataclass
class ShardedFit:
    """What a family hands over for a data-parallel fit: all examples as the network reads them, the loss targets,
    the targets its metrics read, the task and the network's recipe. Indices pick the training and validation rows."""

    recipe: NetworkRecipe
    x: torch.Tensor
    y: torch.Tensor
    y_true: np.ndarray
    task: str


class RunningWorkers(Protocol):
    def poll(self) -> int | None: ...

    def stop(self) -> None: ...

    def failure(self, code: int) -> str: ...


class WorkerLauncher(Protocol):
    rendezvous_timeout_s: float

    def start(self, job_id: str, job_dir: Path, world_size: int, backend: str, args: list[str]) -> RunningWorkers:
        ...  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class TorchrunProcess:
    """torchrun and its workers, in a process group of their own so that one signal reaches them all."""

    def __init__(self, process: subprocess.Popen, job_dir: Path, rendezvous_timeout_s: float) -> None:
        self.process = process
        self.job_dir = job_dir
        self.rendezvous_timeout_s = rendezvous_timeout_s

    def poll(self) -> int | None:
        return self.process.poll()

    def _signal_all(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
        # torchrun may start its workers in sessions of their own: each is signalled by its pid too.
        for pid_file in (self.job_dir / "ddp").glob("worker-*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text()), sig)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self._signal_all(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_all(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace_s)

    def failure(self, code: int) -> str:
        tail = _tail(self.job_dir / LOG_FILE)
        if "RendezvousTimeoutError" in tail or "RendezvousClosedError" in tail:
            return (f"the job's workers did not meet within {self.rendezvous_timeout_s:g} s (rendezvous_timeout_s); "
                    f"torchrun exited with {code}")  # fmt: skip
        return f"the job's workers failed (torchrun exited with {code}, its restarts spent); last lines:\n{tail}"


class TorchrunLauncher:
    """Starts the workers on this machine with torch.distributed.run: c10d rendezvous on a free local port, and
    `max_restarts` restarts of the whole group when a worker dies (each resumes from the last checkpoint)."""

    def __init__(self, max_restarts: int = 3, rendezvous_timeout_s: float = 120.0, nnodes: int = 1,
                 threads: int = 1) -> None:  # fmt: skip
        self.max_restarts = max_restarts
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.nnodes = nnodes  # more than 1 waits for other machines' agents, at the same endpoint
        self.threads = threads

    def command(self, world_size: int, port: int, worker_args: list[str]) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={self.nnodes}", f"--nproc-per-node={world_size // self.nnodes}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-conf=join_timeout={int(self.rendezvous_timeout_s)}",
            f"--max-restarts={self.max_restarts}", "--monitor-interval=0.5",
            "-m", WORKER_MODULE, *worker_args, "--trainer-pid", str(os.getpid()),
        ]  # fmt: skip

    def start(self, job_id: str, job_dir: Path, world_size: int, backend: str, args: list[str]) -> TorchrunProcess:
        log_path = job_dir / LOG_FILE
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        with log_path.open("ab") as out:
            process = subprocess.Popen(self.command(world_size, free_port(), args), stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)  # fmt: skip
        log.info("job %s: torchrun (pid %d) starts %d %s workers", job_id, process.pid, world_size, backend)
        return TorchrunProcess(process, job_dir, self.rendezvous_timeout_s)


def choose_backend(device: torch.device, world_size: int) -> str:
    """NCCL when every worker gets a GPU of its own; else gloo on CPU (NCCL cannot put two ranks on one GPU)."""
    if device.type == "cuda" and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def fit_data_parallel(context: Any, net: torch.nn.Module, fit: ShardedFit, train: np.ndarray,
                      val: np.ndarray | None) -> list[float]:  # fmt: skip
    """Fits `net` on context.spec["world_size"] workers; returns each epoch's mean training loss, with `net`
    holding the fitted weights. Raises what raise_if_cancelled raises (after stopping every worker), and
    UnavailableError when the workers cannot meet or keep failing."""
    spec = context.spec
    world_size = int(spec["world_size"])
    files = context.files
    job_dir = files.directory
    (job_dir / "ddp").mkdir(parents=True, exist_ok=True)
    for stale in [job_dir / PROGRESS_FILE, *(job_dir / "ddp").glob("worker-*.pid")]:
        stale.unlink(missing_ok=True)
    val_idx = val if val is not None else np.array([], dtype=np.int64)
    files.save(DATA_FILE, {
        "recipe": json.dumps({"factory": fit.recipe.factory, "kwargs": fit.recipe.kwargs}),
        "initial": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "x_train": fit.x[torch.as_tensor(train)].cpu(), "y_train": fit.y[torch.as_tensor(train)].cpu(),
        "x_val": fit.x[torch.as_tensor(val_idx)].cpu(), "y_val": torch.as_tensor(fit.y_true[val_idx]),
        "task": fit.task, "optimizer": spec["optimizer"], "learning_rate": float(spec["learning_rate"]),
        "batch_size": int(spec["batch_size"]), "seed": int(spec["seed"]), "epochs": int(spec["epochs"]),
    })  # fmt: skip
    attempt = uuid.uuid4().hex
    (job_dir / ATTEMPT_FILE).write_text(attempt)  # fences off the workers of an attempt that was taken over
    launcher: WorkerLauncher = context.launcher
    backend = choose_backend(context.device, world_size)
    keyring = context.store.keyring
    worker_args = [
        "--job-id", context.job_id, "--job-dir", str(job_dir), "--store", str(context.store.root),
        "--owner", context.owner, "--backend", backend,
        "--timeout-s", str(launcher.rendezvous_timeout_s), "--attempt", attempt,
    ]  # fmt: skip
    if keyring.enabled:
        worker_args += ["--keys-dir", str(keyring.keys_dir), "--kek-id", keyring.kek_id]
    context.message(f"starting {world_size} data-parallel workers ({backend})")
    workers = launcher.start(context.job_id, job_dir, world_size, backend, worker_args)
    try:
        _follow(context, workers, job_dir / PROGRESS_FILE, launcher.rendezvous_timeout_s, world_size)
    except BaseException:
        workers.stop()
        raise
    state = files.load(CHECKPOINT_FILE)
    if state is None or int(state["epoch"]) != int(spec["epochs"]):
        raise UnavailableError(f"the job's workers ended without their last checkpoint (epoch "
                               f"{None if state is None else state['epoch']} of {spec['epochs']})")  # fmt: skip
    net.load_state_dict(state["model"])
    return [float(v) for v in state["losses"]]


def _follow(context: Any, workers: RunningWorkers, progress: Path, rendezvous_timeout_s: float,
            world_size: int) -> None:  # fmt: skip
    """Relays rank 0's lines to the job until the workers exit; checks for cancellation, shutdown and timeout
    as it goes, and gives up on workers that have not all met within the rendezvous timeout."""
    offset, met, first_epoch = 0, False, 0
    started = time.monotonic()
    last_check = 0.0
    while True:
        code = workers.poll()
        if progress.exists():
            with progress.open("rb") as lines:
                lines.seek(offset)
                chunk = lines.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for raw in complete.splitlines():
                line = json.loads(raw)
                if line["kind"] == "met":
                    met, first_epoch = True, int(line["start_epoch"])
                    context.started = time.monotonic()  # the ETA counts epochs only
                elif line["kind"] == "message":
                    context.message(line["text"])
                elif line["kind"] == "epoch":
                    context.report_epoch(line["epoch"], line["epochs"], line["loss"], line["metrics"], first_epoch)
        if code is not None:
            if code != 0:
                raise UnavailableError(workers.failure(code))
            return
        if not met and time.monotonic() - started > rendezvous_timeout_s + 30:
            raise UnavailableError(f"the job's {world_size} workers did not all start within "
                                   f"{rendezvous_timeout_s:g} s (rendezvous_timeout_s); they were stopped")  # fmt: skip
        if time.monotonic() - last_check >= 1.0:
            context.raise_if_cancelled()  # cancellation, trainer shutdown and the job's timeout
            last_check = time.monotonic()
        else:
            context.heartbeat.beat()
        time.sleep(POLL_S)
