"""A training job's files under the checkpoint dir: its checkpoint and, for a distributed job, what its workers read.

Each is written in one rename, and sealed under a fresh data key wrapped by the KEK the job's version will
get when the model store is encrypted; the trainer and a distributed job's workers read and write them alike.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from shared.envelope import is_envelope, new_data_key
from shared.keyring import KeyUnavailableError
from shared.model_store import ModelStore

log = logging.getLogger(__name__)

CHECKPOINT_CONTEXT = b"checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"


class JobFiles:
    def __init__(self, store: ModelStore, directory: Path, owner: str, job_id: str) -> None:
        self.store = store
        self.directory = Path(directory)
        self.owner = owner
        self.job_id = job_id

    def path(self, name: str) -> Path:
        return self.directory / name

    def save(self, name: str, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        raw = buffer.getvalue()
        if self.store.encrypted:
            raw = self.store.keyring.seal(raw, self.store.policy.for_owner(self.owner), new_data_key(),
                                          CHECKPOINT_CONTEXT)  # fmt: skip
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        staging.write_bytes(raw)
        staging.replace(path)

    def load(self, name: str) -> dict[str, Any] | None:
        """The file, decrypted in memory; None when there is none, or when its KEK is gone (the job then starts
        over, saying why)."""
        path = self.path(name)
        if not path.exists():
            return None
        raw = path.read_bytes()
        if is_envelope(raw):
            try:
                raw = self.store.keyring.open(raw, CHECKPOINT_CONTEXT, f"job {self.job_id}: {name}")[0]
            except KeyUnavailableError as exc:
                log.warning("job %s: its %s cannot be opened (%s); starting over", self.job_id, name, exc.message)
                return None
        return torch.load(io.BytesIO(raw), weights_only=True)
