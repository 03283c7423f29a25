"""Training data sets: the store that keeps uploads, and what every family's parser shares.

The gateway streams an upload into the store (`DatasetWriter`), checking its size and its
sha256 as the bytes arrive, and records it: it never parses one. A cheap check of the
format's framing (`sniff`) runs at upload and when a job is submitted; the family's trainer
parses and validates the whole file, within byte, row, column and class caps, and a bad data
set fails its job with the parser's message. The trainer then records what it found (examples,
feature shape, task, classes) in the data set's metadata.

Uploaded sets live in `<root>/<dataset_id>/` (`data.<format>` and `meta.json`); trainers read
them back and check the sha256 first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import IntegrityError, InvalidArgumentError, NotFoundError, ResourceExhaustedError

# A label column of integers with at most this many distinct values is a classification task.
MAX_CLASSES = 1000
MIN_EXAMPLES = 4
# What a trainer decompresses from one .npz, in all: a small archive must not expand without bound.
MAX_NPZ_BYTES = 2 * 1024**3
SNIFF_BYTES = 64 * 1024


def labels_or_targets(values: np.ndarray, field_name: str) -> tuple[np.ndarray, str, list[str]]:
    """Integer values are class labels (classification), floats are targets (regression)."""
    if values.ndim != 1:
        raise InvalidArgumentError(f"{field_name}: expected one value per example, got shape {list(values.shape)}")
    if not np.all(np.isfinite(values.astype(np.float64))):
        raise InvalidArgumentError(f"{field_name}: holds NaN or infinite values")
    if np.issubdtype(values.dtype, np.integer):
        if values.size and values.min() < 0:
            raise InvalidArgumentError(f"{field_name}: class labels must be 0 or more, got {values.min()}")
        classes = int(values.max()) + 1 if values.size else 0
        if classes > MAX_CLASSES:
            raise InvalidArgumentError(f"{field_name}: {classes} classes; at most {MAX_CLASSES}")
        return values.astype(np.int64), "classification", [str(i) for i in range(classes)]
    return values.astype(np.float32), "regression", []


def load_npz(data: bytes, max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """The arrays of an .npz, with no pickled objects and at most `max_bytes` once decompressed."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            expanded = sum(member.file_size for member in archive.infolist())
        if expanded > max_bytes:
            raise InvalidArgumentError(
                f"npz: its arrays take {expanded} bytes once decompressed; the limit is {max_bytes}"
            )
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidArgumentError(f"npz: not a readable .npz archive without pickled objects ({exc})") from None


def parse_with(parsers: dict[str, Callable[[bytes], Any]], family: str, fmt: str, data: bytes) -> Any:
    """A family's parser for `fmt`, run on the data; refuses formats the family has none for, and sets
    with too few examples to train and evaluate."""
    if fmt not in parsers:
        raise InvalidArgumentError(f"format: {fmt!r} is not a {family} format; use one of {sorted(parsers)}")
    parsed = parsers[fmt](data)
    if parsed.num_examples < MIN_EXAMPLES:
        raise InvalidArgumentError(f"{fmt}: at least {MIN_EXAMPLES} examples are needed to train and evaluate")
    return parsed


def sniff(head: bytes, fmt: str) -> None:
    """Checks the first bytes of a data set for its format's framing, without parsing it all."""
    if not head:
        raise InvalidArgumentError("the data set is empty")
    if fmt == "npz":
        if not head.startswith(b"PK\x03\x04"):
            raise InvalidArgumentError("npz: not a zip archive (an .npz starts with the bytes PK\\x03\\x04)")
        return
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise InvalidArgumentError(f"{fmt}: not UTF-8 text ({exc})") from None
        text = head[: exc.start].decode("utf-8")
    if fmt == "csv":
        header = text.splitlines()[0] if text else ""
        columns = [c.strip().lower() for c in header.split(",")]
        if len(columns) < 2 or columns[-1] not in ("label", "target"):
            raise InvalidArgumentError(
                "csv line 1: expected a header of feature columns and a last column named 'label' or 'target', "
                f"got {header[:200]!r}"
            )
    elif fmt == "jsonl":
        lines = [line for line in text.split("\n")[:-1] if line.strip()]  # whole lines only
        first = lines[0] if lines else ""
        if first:
            try:
                record = json.loads(first)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"jsonl line 1: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise InvalidArgumentError('jsonl line 1: expected {"text": ..., "label": ...}')
    elif fmt == "json":
        if not text.lstrip().startswith("{"):
            raise InvalidArgumentError("json: expected an object with node_features, edge_index and labels")


class DatasetWriter:
    """Streams one upload into the store: size cap and sha256 as the bytes arrive, nothing in memory."""

    def __init__(self, store: DatasetStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.size = 0
        self.digest = hashlib.sha256()
        self.head = b""
        store.root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=store.root))
        self._file = (self.staging / "data.upload").open("wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ResourceExhaustedError(
                f"data set larger than the limit of {self.max_bytes} bytes (max_dataset_bytes)"
            )
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[: SNIFF_BYTES - len(self.head)]
        self.digest.update(chunk)
        self._file.write(chunk)

    def commit(self, name: str, family: str, fmt: str, tenant: str = "") -> dict[str, Any]:
        """Checks the format's framing and records the data set; returns its metadata with the new id."""
        self._file.close()
        if self.size == 0:
            raise InvalidArgumentError("the upload carried no data: send the file in chunk messages")
        sniff(self.head, fmt)
        meta = {
            "dataset_id": f"ds-{uuid.uuid4().hex[:16]}",
            "name": name or "unnamed",
            "family": family,
            "format": fmt,
            "sha256": self.digest.hexdigest(),
            "size_bytes": self.size,
            # Filled in by the first trainer that parses it.
            "num_examples": 0,
            "feature_shape": [],
            "task": "",
            "class_names": [],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tenant": tenant,
        }
        os.rename(self.staging / "data.upload", self.staging / f"data.{fmt}")
        (self.staging / "meta.json").write_text(json.dumps(meta, indent=2))
        os.chmod(self.staging, 0o755)
        os.rename(self.staging, self.store.root / meta["dataset_id"])
        return meta

    def discard(self) -> None:
        self._file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


class DatasetStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def writer(self, max_bytes: int) -> DatasetWriter:
        return DatasetWriter(self, max_bytes)

    def meta(self, dataset_id: str, tenant: str | None = None) -> dict[str, Any]:
        """A data set's metadata; with a tenant, another tenant's data set is NOT_FOUND."""
        if not dataset_id.startswith("ds-") or "/" in dataset_id or dataset_id in ("ds-", "ds-.."):
            raise InvalidArgumentError(f"dataset_id: {dataset_id!r} is not a dataset id (ds-...)")
        path = self.root / dataset_id / "meta.json"
        meta = json.loads(path.read_text()) if path.is_file() else None
        if meta is None or (tenant is not None and meta.get("tenant", "") != tenant):
            raise NotFoundError(f"dataset {dataset_id!r} not found")
        return meta

    def check(self, dataset_id: str, tenant: str) -> dict[str, Any]:
        """The metadata of a data set a job may use: the tenant's own, with its format's framing intact."""
        meta = self.meta(dataset_id, tenant)
        with self.data_path(meta).open("rb") as data:
            sniff(data.read(SNIFF_BYTES), meta["format"])
        return meta

    def data_path(self, meta: dict[str, Any]) -> Path:
        return self.root / meta["dataset_id"] / f"data.{meta['format']}"

    def list(self, tenant: str, family: str = "") -> list[dict[str, Any]]:
        """A tenant's data sets (of one family, when given), newest first."""
        found = []
        for meta_path in self.root.glob("ds-*/meta.json") if self.root.is_dir() else ():
            meta = json.loads(meta_path.read_text())
            if meta.get("tenant", "") == tenant and (not family or meta["family"] == family):
                found.append(meta)
        return sorted(found, key=lambda meta: (meta["created_at"], meta["dataset_id"]), reverse=True)

    def read(self, dataset_id: str, max_bytes: int) -> tuple[dict[str, Any], bytes]:
        """(metadata, bytes) of a data set, refused unless the bytes still match the recorded sha256."""
        meta = self.meta(dataset_id)
        if meta["size_bytes"] > max_bytes:
            raise InvalidArgumentError(
                f"dataset {dataset_id}: {meta['size_bytes']} bytes; this trainer reads at most {max_bytes}"
            )
        data = self.data_path(meta).read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise IntegrityError(f"dataset {dataset_id}: the file no longer matches its sha256")
        return meta, data

    def describe(self, dataset_id: str, facts: dict[str, Any]) -> None:
        """Records what a parser found (examples, feature shape, task, classes) in the metadata."""
        path = self.root / dataset_id / "meta.json"
        meta = json.loads(path.read_text())
        meta.update(facts)
        staging = path.with_name(".meta.json.tmp")
        staging.write_text(json.dumps(meta, indent=2))
        os.replace(staging, path)
