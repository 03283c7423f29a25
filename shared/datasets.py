"""Training data sets: the store that keeps uploads, and what every family's parser shares.

The gateway streams an upload into the store (`DatasetWriter`), checking its size and its
sha256 as the bytes arrive, and records it: it never parses one. A cheap check of the
format's framing (`sniff`) runs at upload and when a job is submitted; the family's trainer
parses and validates the whole file, within byte, row, column and class caps, and a bad data
set fails its job with the parser's message. The trainer then records what it found (examples,
feature shape, task, classes) in the data set's metadata.

Uploaded sets live in `<root>/<dataset_id>/` (`data.<format>` and `meta.json`); trainers read
them back and check the sha256.

With a keyring (a KEK configured), each data set gets a fresh data key: the upload is sealed as
it streams in (AES-256-GCM chunks, `shared.envelope`), and `meta.json` is an envelope whose
header names the KEK and holds the wrapped data key (the tenant's own KEK when it has one).
Trainers decrypt chunk by chunk, in memory. Data sets written in plain before are still read.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.envelope import SealedWriter, is_envelope, make_envelope, new_data_key, open_stream, seal, split_envelope
from shared.errors import (
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from shared.keyring import KekPolicy, Keyring, KeyUnavailableError, KeyUsage, RewrapReport

log = logging.getLogger(__name__)

# A label column of integers with at most this many distinct values is a classification task.
MAX_CLASSES = 1000
MIN_EXAMPLES = 4
# What a trainer decompresses from one .npz, in all: a small archive must not expand without bound.
MAX_NPZ_BYTES = 2 * 1024**3
SNIFF_BYTES = 64 * 1024
META = "meta.json"
DATA_CONTEXT = b"dataset:data"
META_CONTEXT = b"dataset:meta"
KEYS_LOCK = ".keys.lock"


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


def csv_columns(head: bytes) -> list[str]:
    """The header row's column names, from the first bytes of a CSV."""
    line = head.decode("utf-8", errors="replace").splitlines()[0] if head else ""
    return [name.strip() for name in next(csv.reader([line]), [])]


class DatasetWriter:
    """Streams one upload into the store: size cap and sha256 as the bytes arrive, nothing in memory;
    sealed chunk by chunk under the data set's own data key when the store is encrypted."""

    def __init__(self, store: DatasetStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.size = 0
        self.digest = hashlib.sha256()
        self.head = b""
        store.root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=store.root))
        self._file = (self.staging / "data.upload").open("wb")
        self.data_key = new_data_key() if store.encrypted else None
        self._sink = SealedWriter(self._file, self.data_key, DATA_CONTEXT) if self.data_key else self._file

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ResourceExhaustedError(
                f"data set larger than the limit of {self.max_bytes} bytes (max_dataset_bytes)"
            )
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[: SNIFF_BYTES - len(self.head)]
        self.digest.update(chunk)
        self._sink.write(chunk)

    def commit(self, name: str, family: str, fmt: str, tenant: str = "") -> dict[str, Any]:
        """Checks the format's framing and records the data set; returns its metadata with the new id."""
        if isinstance(self._sink, SealedWriter):
            self._sink.close()  # the final chunk
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
        if fmt == "csv":
            meta["columns"] = csv_columns(self.head)  # so a job's drop and mask columns are checked at submit
        os.rename(self.staging / "data.upload", self.staging / f"data.{fmt}")
        os.chmod(self.staging, 0o755)
        # The KEK is read under the lock rotation takes to change it, so no upload escapes a rotation.
        with self.store.keys_lock(fcntl.LOCK_SH):
            (self.staging / META).write_bytes(self.store.encode_meta(meta, self.data_key))
            os.rename(self.staging, self.store.root / meta["dataset_id"])
        return meta

    def discard(self) -> None:
        self._file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


class DatasetStore:
    def __init__(self, root: Path | str, keyring: Keyring | None = None) -> None:
        self.root = Path(root)
        self.keyring = keyring or Keyring()
        self.policy = KekPolicy(self.root, self.keyring)

    @property
    def encrypted(self) -> bool:
        """Whether new uploads are sealed."""
        return self.keyring.enabled

    def writer(self, max_bytes: int) -> DatasetWriter:
        return DatasetWriter(self, max_bytes)

    @contextlib.contextmanager
    def keys_lock(self, mode: int):
        """Shared by writers while they choose a KEK and publish; exclusive while rotation changes the KEK."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / KEYS_LOCK).open("a") as lock:
            fcntl.flock(lock, mode)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _dataset_lock(self, dataset_id: str):
        """One read-modify-write of a data set's metadata at a time (describe, rotation); readers need none."""
        fd = os.open(self.root / dataset_id, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def encode_meta(self, meta: dict[str, Any], data_key: bytes | None) -> bytes:
        """meta.json as stored: an envelope under the data set's data key, wrapped by the owner's KEK; or JSON."""
        text = json.dumps(meta, indent=2).encode()
        if data_key is None:
            return text
        return self.keyring.seal(text, self.policy.for_owner(meta.get("tenant", "")), data_key, META_CONTEXT)

    def _read_meta(self, dataset_id: str) -> tuple[dict[str, Any], bytes | None, bytes]:
        """(metadata, data key or None for a plain data set, the file as stored)."""
        raw = (self.root / dataset_id / META).read_bytes()
        if not is_envelope(raw):
            return json.loads(raw), None, raw
        plaintext, data_key, _ = self.keyring.open(raw, META_CONTEXT, f"dataset {dataset_id}: {META}")
        return json.loads(plaintext), data_key, raw

    def _check_id(self, dataset_id: str) -> None:
        if not dataset_id.startswith("ds-") or "/" in dataset_id or dataset_id in ("ds-", "ds-.."):
            raise InvalidArgumentError(f"dataset_id: {dataset_id!r} is not a dataset id (ds-...)")

    def meta(self, dataset_id: str, tenant: str | None = None) -> dict[str, Any]:
        """A data set's metadata; with a tenant, another tenant's data set is NOT_FOUND."""
        return self._open(dataset_id, tenant)[0]

    def _open(self, dataset_id: str, tenant: str | None = None) -> tuple[dict[str, Any], bytes | None]:
        self._check_id(dataset_id)
        if not (self.root / dataset_id / META).is_file():
            raise NotFoundError(f"dataset {dataset_id!r} not found")
        meta, data_key, _ = self._read_meta(dataset_id)
        if tenant is not None and meta.get("tenant", "") != tenant:
            raise NotFoundError(f"dataset {dataset_id!r} not found")
        return meta, data_key

    def check(self, dataset_id: str, tenant: str) -> dict[str, Any]:
        """The metadata of a data set a job may use: the tenant's own, with its format's framing intact."""
        meta, data_key = self._open(dataset_id, tenant)
        with self.data_path(meta).open("rb") as data:
            head = next(self._chunks(data, data_key, dataset_id), b"") if data_key else data.read(SNIFF_BYTES)
        sniff(head[:SNIFF_BYTES], meta["format"])
        return meta

    def data_path(self, meta: dict[str, Any]) -> Path:
        return self.root / meta["dataset_id"] / f"data.{meta['format']}"

    def list(self, tenant: str, family: str = "") -> list[dict[str, Any]]:
        """A tenant's data sets (of one family, when given), newest first."""
        found = []
        for meta_path in self.root.glob(f"ds-*/{META}") if self.root.is_dir() else ():
            try:
                meta = self._read_meta(meta_path.parent.name)[0]
            except (KeyUnavailableError, IntegrityError) as exc:
                log.warning("data set %s cannot be read: %s", meta_path.parent.name, exc)
                continue
            if meta.get("tenant", "") == tenant and (not family or meta["family"] == family):
                found.append(meta)
        return sorted(found, key=lambda meta: (meta["created_at"], meta["dataset_id"]), reverse=True)

    def _chunks(self, data, data_key: bytes, dataset_id: str) -> Iterator[bytes]:
        return open_stream(data, data_key, DATA_CONTEXT, f"dataset {dataset_id}: data")

    def read(self, dataset_id: str, max_bytes: int) -> tuple[dict[str, Any], bytes]:
        """(metadata, bytes) of a data set, refused unless the bytes still match the recorded sha256.
        A sealed one is decrypted chunk by chunk, in memory: each chunk authenticated before it is used."""
        meta, data_key = self._open(dataset_id)
        if meta["size_bytes"] > max_bytes:
            raise InvalidArgumentError(
                f"dataset {dataset_id}: {meta['size_bytes']} bytes; this trainer reads at most {max_bytes}"
            )
        if data_key is None:
            data = self.data_path(meta).read_bytes()
        else:
            with self.data_path(meta).open("rb") as sealed:
                data = b"".join(self._chunks(sealed, data_key, dataset_id))
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise IntegrityError(f"dataset {dataset_id}: the file no longer matches its sha256")
        return meta, data

    def describe(self, dataset_id: str, facts: dict[str, Any]) -> None:
        """Records what a parser found (examples, feature shape, task, classes) in the metadata."""
        self._check_id(dataset_id)
        path = self.root / dataset_id / META
        with self._dataset_lock(dataset_id):
            meta, data_key, raw = self._read_meta(dataset_id)
            meta.update(facts)
            text = json.dumps(meta, indent=2).encode()
            # Same data key and header: a rotation running now, under the same lock, is not undone.
            if data_key is not None:
                text = make_envelope(split_envelope(raw)[0], seal(text, data_key, META_CONTEXT))
            staging = path.with_name(f".{META}.tmp")
            staging.write_bytes(text)
            os.replace(staging, path)

    # Keys

    def _dataset_ids(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob(f"ds-*/{META}")) if self.root.is_dir() else []

    def rewrap(self, kek_id: str, tenant: str | None = None) -> RewrapReport:
        """Rotation: new data keys are wrapped by `kek_id` from now on (the store's, or one tenant's), and
        every data set's that should be is re-wrapped by it: a new meta.json header renamed into place. The
        data files are not touched."""
        if not self.encrypted:
            raise FailedPreconditionError(
                "the data-set store is not encrypted here: set this process's KEYS_DIR and KEK_ID settings"
            )
        if not self.keyring.has(kek_id):
            raise KeyUnavailableError(
                f"KEK {kek_id!r} is not in the keys directory {self.keyring.keys_dir} "
                f"(it holds {self.keyring.ids() or 'no KEK'}): add it there (to the Secret) first"
            )
        with self.keys_lock(fcntl.LOCK_EX):
            self.policy.record(kek_id, tenant)
        report = RewrapReport()
        for dataset_id in self._dataset_ids():
            try:
                with self._dataset_lock(dataset_id):
                    self._rewrap_one(dataset_id, tenant, report)
            except (KeyUnavailableError, IntegrityError, OSError, ValueError) as exc:
                report.errors.append(f"dataset {dataset_id}: {exc}")
        return report

    def _rewrap_one(self, dataset_id: str, tenant: str | None, report: RewrapReport) -> None:
        path = self.root / dataset_id / META
        meta, data_key, raw = self._read_meta(dataset_id)
        if tenant is not None and meta.get("tenant", "") != tenant:
            return
        if data_key is None:
            report.plain += 1
            return
        target = self.policy.for_owner(meta.get("tenant", ""))
        header, body = split_envelope(raw)
        if header.kek_id == target:
            report.unchanged += 1
            return
        staging = path.with_name(f".{META}.tmp")
        staging.write_bytes(make_envelope(self.keyring.wrap(target, data_key), body))
        os.replace(staging, path)
        report.rewrapped += 1

    def key_usage(self) -> KeyUsage:
        """How many data sets' data keys each KEK wraps, and how many data sets are plain."""
        usage = KeyUsage(self.policy.active(), self.policy.tenants(), Counter(), 0, [])
        for dataset_id in self._dataset_ids():
            try:
                with (self.root / dataset_id / META).open("rb") as handle:
                    head = handle.read(512)
            except OSError as exc:
                usage.errors.append(f"dataset {dataset_id}: {exc}")
                continue
            if is_envelope(head):
                usage.by_kek[split_envelope(head)[0].kek_id] += 1
            else:
                usage.plain += 1
        return usage
