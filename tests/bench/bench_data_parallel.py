"""Data-parallel training: samples/s of a job on 2 DDP workers against 1, in the same run.

Run with `make bench`. Both go through the real path of a distributed job (shared.data_parallel:
torchrun, gloo on CPU, or NCCL where each worker has a GPU of its own), on a synthetic classification
set and an MLP wide enough that compute, not the per-step gradient all-reduce, should dominate. Each worker
runs torch on one thread, so 2 workers use 2 cores; samples/s counts training rows over the epochs' wall
time, from the moment all workers met (start-up and data loading are left out). On a machine with 2 cores
that other processes share, expect little or no gain: the figure is reported as it comes.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.data_parallel import NetworkRecipe, ShardedFit, TorchrunLauncher, choose_backend, fit_data_parallel
from shared.job_files import JobFiles
from shared.liveness import Heartbeat
from shared.model_store import ModelStore
from shared.training import MLP

ROWS = int(os.environ.get("MAAS_BENCH_DDP_ROWS", "16384"))
FEATURES, HIDDEN, CLASSES = 256, [1024, 1024], 10
EPOCHS = int(os.environ.get("MAAS_BENCH_DDP_EPOCHS", "3"))
BATCH = 256


class BenchJob:
    """What fit_data_parallel asks of a job's context, without a queue: it times the epochs instead."""

    def __init__(self, root: Path, world_size: int) -> None:
        self.job_id = f"bench-{world_size}"
        self.spec = {"world_size": world_size, "optimizer": "sgd", "learning_rate": 0.01, "batch_size": BATCH,
                     "seed": 0, "epochs": EPOCHS}  # fmt: skip
        self.store = ModelStore(root / "models")
        self.owner = ""
        self.files = JobFiles(self.store, root / "checkpoints" / self.job_id, "", self.job_id)
        self.launcher = TorchrunLauncher(max_restarts=0, threads=1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.heartbeat = Heartbeat()
        self.started = time.monotonic()
        self.ended = self.started

    def message(self, text: str, state: str = "RUNNING") -> None:
        pass

    def report_epoch(self, epoch, epochs, loss, metrics, first_epoch) -> None:
        self.ended = time.monotonic()

    def raise_if_cancelled(self) -> None:
        pass


def run(root: Path, world_size: int, fit: ShardedFit, train: np.ndarray) -> float:
    job = BenchJob(root, world_size)
    torch.manual_seed(0)
    net = fit.recipe.build()
    fit_data_parallel(job, net, fit, train, None)
    return EPOCHS * len(train) / (job.ended - job.started)


def main() -> None:
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.standard_normal((ROWS, FEATURES)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, CLASSES, ROWS))
    recipe = NetworkRecipe("shared.training:MLP", {"in_features": FEATURES, "hidden": HIDDEN, "out_features": CLASSES})
    params = sum(p.numel() for p in MLP(FEATURES, HIDDEN, CLASSES).parameters())
    fit = ShardedFit(recipe, x, y, y.numpy(), "classification")
    train = np.arange(ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp), 1, fit, train)
        two = run(Path(tmp), 2, fit, train)
    backend = choose_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"), 2)
    print(f"\ndata-parallel training, MLP {FEATURES}-{HIDDEN}-{CLASSES} ({params:,} parameters), {ROWS} rows, "
          f"global batch {BATCH}, {EPOCHS} epochs, {os.cpu_count()} cores, 2 workers on {backend}")  # fmt: skip
    print(f"{'workers':>7} | {'samples/s':>9}")
    for workers, rate in ((1, one), (2, two)):
        print(f"{workers:>7} | {rate:>9.0f}")
    print(f"2 workers / 1 worker: {two / one:.2f}x samples/s")


if __name__ == "__main__":
    main()
