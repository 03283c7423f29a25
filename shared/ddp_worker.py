"""`python -m shared.ddp_worker`: one data-parallel worker of a training job, started by torchrun (locally) or
by the Kubeflow training operator (a PyTorchJob's pod), which set RANK, WORLD_SIZE, LOCAL_RANK and MASTER_*.

Each worker reads the data the trainer prepared (shared.data_parallel), builds the same network from the same
initial weights, wraps it in DistributedDataParallel and trains on its own shard of every epoch
(DistributedSampler, reshuffled by set_epoch). The job's batch_size is the global batch: each worker takes
batch_size / world_size of it, so with the same seed an epoch visits the same batches as one worker would.
Held-out outputs are gathered from every worker's shard and measured once. Rank 0 alone writes the
checkpoint (one rename) and the progress lines; a restarted group resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from shared.data_parallel import ATTEMPT_FILE, DATA_FILE, PROGRESS_FILE, NetworkRecipe
from shared.job_files import CHECKPOINT_FILE, JobFiles
from shared.keyring import Keyring
from shared.model_store import ModelStore
from shared.training import loss_and_targets, make_optimizer, task_metrics

# train_minibatch_epoch's shuffle seed is seed * SHUFFLE_STRIDE + epoch; DistributedSampler adds the epoch itself.
SHUFFLE_STRIDE = 100_003


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--owner", default="")
    parser.add_argument("--keys-dir", type=Path)
    parser.add_argument("--kek-id", default="")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--attempt", default="", help="the attempt's token: a superseded attempt's workers stop")
    parser.add_argument("--trainer-pid", type=int, default=0, help="stop the whole group once this process is gone")
    return parser.parse_args(argv)


class Progress:
    """Rank 0's lines to the trainer, one JSON object each, appended whole."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path = path
        self.rank = rank

    def write(self, kind: str, **fields: Any) -> None:
        if self.rank != 0:
            return
        with self.path.open("a") as out:
            out.write(json.dumps({"kind": kind, **fields}) + "\n")


def gathered_outputs(net: torch.nn.Module, x: torch.Tensor, rank: int, world: int) -> np.ndarray:
    """The network's outputs on all of `x`, each worker computing its own rows (every world-th)."""
    with torch.no_grad():
        mine = net(x[rank::world]).cpu().numpy()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    out = np.empty((len(x), *mine.shape[1:]), dtype=mine.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def superseded(job_dir: Path, attempt: str) -> bool:
    """Whether another attempt of the job (another trainer took it over) owns the job's files now."""
    try:
        return bool(attempt) and (job_dir / ATTEMPT_FILE).read_text() != attempt
    except FileNotFoundError:
        return True


def stop_with_trainer(trainer_pid: int) -> None:
    """A local group whose trainer died (SIGKILL, out of memory) stops: SIGTERM to torchrun ends every worker, and
    the trainer that takes the job over starts a group of its own."""

    def watch() -> None:
        while True:
            try:
                os.kill(trainer_pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(os.getppid(), signal.SIGTERM)
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="trainer-watch", daemon=True).start()


def join_group(backend: str, timeout: timedelta) -> tuple[int, int]:
    """init_process_group on the launcher's store, under a prefix of this restart's own: torchrun's store outlives
    a restart, and the addresses the last group's workers left in it would send this group's to dead ports."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # Under torchrun its agent hosts the store; under the training operator (no agent) rank 0 does.
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=hosts,
                          timeout=timeout)  # fmt: skip
    dist.init_process_group(backend, store=dist.PrefixStore(f"maas/restart-{restart}", store), rank=rank,
                            world_size=world, timeout=timeout)  # fmt: skip
    return rank, world


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trainer_pid:
        stop_with_trainer(args.trainer_pid)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    rank, world = join_group(args.backend, timedelta(seconds=args.timeout_s))
    (args.job_dir / "ddp" / f"worker-{rank}.pid").write_text(str(os.getpid()))
    progress = Progress(args.job_dir / PROGRESS_FILE, rank)
    files = JobFiles(ModelStore(args.store, Keyring(args.keys_dir, args.kek_id)), args.job_dir, args.owner, args.job_id)
    data = files.load(DATA_FILE)
    if data is None:
        raise SystemExit(f"job {args.job_id}: {DATA_FILE} is missing or cannot be opened")
    net = NetworkRecipe(**json.loads(data["recipe"])).build()
    net.load_state_dict(data["initial"])
    net.to(device)
    optimizer = make_optimizer(data["optimizer"], net.parameters(), data["learning_rate"])
    start, losses = 0, []
    state = files.load(CHECKPOINT_FILE)  # every worker resumes from the same one
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["epoch"]), [float(v) for v in state["losses"]]
    model = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    task, epochs = data["task"], int(data["epochs"])
    loss_fn = loss_and_targets(task, np.zeros(1))[0]
    x_train, y_train = data["x_train"].to(device), data["y_train"].to(device)
    x_val, y_val = data["x_val"].to(device), data["y_val"].numpy()
    local_batch = max(1, math.ceil(int(data["batch_size"]) / world))
    sampler = DistributedSampler(TensorDataset(x_train), num_replicas=world, rank=rank, shuffle=True,
                                 seed=int(data["seed"]) * SHUFFLE_STRIDE, drop_last=False)  # fmt: skip
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if start:
        progress.write("message", text=f"{world} workers resumed from the checkpoint after epoch {start}"
                       + (f" (restart {restarts})" if restarts else ""))  # fmt: skip
    progress.write("met", start_epoch=start, world_size=world, restarts=restarts)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(sampler), device=device)
        model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss x rows, rows
        for begin in range(0, len(order), local_batch):
            idx = order[begin : begin + local_batch]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            totals += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        losses.append(float(totals[0] / totals[1]))
        net.eval()
        metrics = task_metrics(task, y_val, gathered_outputs(net, x_val, rank, world)) if len(x_val) else {}
        if rank == 0:
            if superseded(args.job_dir, args.attempt):
                raise SystemExit(f"job {args.job_id}: another attempt owns its checkpoint now; stopping")
            files.save(CHECKPOINT_FILE, {"model": {k: v.cpu() for k, v in net.state_dict().items()},
                                         "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                         "losses": losses})  # fmt: skip
            progress.write("epoch", epoch=epoch + 1, epochs=epochs, loss=losses[-1], metrics=metrics)
        dist.barrier()  # no worker runs ahead of the checkpoint a restart would resume from
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
