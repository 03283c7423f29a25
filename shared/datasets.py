"""Training data sets: parsing and validation of uploads, storage with sha256, and the built-in sets.

Parsers raise InvalidArgumentError naming the line or field that is wrong. Uploaded sets live
in `<root>/<dataset_id>/` (the file and `meta.json`); trainers read them back and check the
sha256 first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import IntegrityError, InvalidArgumentError, NotFoundError

FORMATS_BY_FAMILY = {"dense": {"npz", "csv"}, "gnn": {"json", "npz"}, "nlp": {"jsonl"}}
# A label column of integers with at most this many distinct values is a classification task.
MAX_CLASSES = 1000


@dataclass
class TabularData:
    """dense: features (any shape per example) and integer labels or float targets."""

    x: np.ndarray
    y: np.ndarray
    task: str
    class_names: list[str] = field(default_factory=list)


@dataclass
class GraphData:
    node_features: np.ndarray
    edge_index: np.ndarray
    labels: np.ndarray
    train_mask: np.ndarray | None
    task: str = "classification"
    class_names: list[str] = field(default_factory=list)


@dataclass
class TextData:
    texts: list[str]
    labels: np.ndarray
    class_names: list[str]
    task: str = "classification"


def _labels_or_targets(values: np.ndarray, field_name: str) -> tuple[np.ndarray, str, list[str]]:
    if values.ndim != 1:
        raise InvalidArgumentError(f"{field_name}: expected one value per example, got shape {list(values.shape)}")
    if not np.all(np.isfinite(values.astype(np.float64))):
        raise InvalidArgumentError(f"{field_name}: holds NaN or infinite values")
    if np.issubdtype(values.dtype, np.integer):
        if values.min() < 0:
            raise InvalidArgumentError(f"{field_name}: class labels must be 0 or more, got {values.min()}")
        classes = int(values.max()) + 1
        if classes > MAX_CLASSES:
            raise InvalidArgumentError(f"{field_name}: {classes} classes; at most {MAX_CLASSES}")
        return values.astype(np.int64), "classification", [str(i) for i in range(classes)]
    return values.astype(np.float32), "regression", []


def parse_dense_npz(data: bytes) -> TabularData:
    arrays = _load_npz(data)
    if "x" not in arrays:
        raise InvalidArgumentError(f"npz: missing array 'x' (features); it has {sorted(arrays)}")
    label_key = "labels" if "labels" in arrays else "targets" if "targets" in arrays else None
    if label_key is None:
        raise InvalidArgumentError("npz: needs an array 'labels' (integers, classification) or 'targets' (floats)")
    x = arrays["x"]
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
        raise InvalidArgumentError(f"npz: 'x' must be numeric with shape [N, ...], got {x.dtype} {list(x.shape)}")
    values = arrays[label_key]
    if label_key == "labels" and not np.issubdtype(values.dtype, np.integer):
        raise InvalidArgumentError(f"npz: 'labels' must be integer class ids, got {values.dtype}; use 'targets'")
    if label_key == "targets":
        values = values.astype(np.float32)
    y, task, classes = _labels_or_targets(values, f"npz: '{label_key}'")
    if len(y) != len(x):
        raise InvalidArgumentError(f"npz: 'x' has {len(x)} examples but '{label_key}' has {len(y)}")
    if not np.all(np.isfinite(x)):
        raise InvalidArgumentError("npz: 'x' holds NaN or infinite values")
    return TabularData(x.astype(np.float32), y, task, classes)


def parse_dense_csv(data: bytes) -> TabularData:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"csv: not UTF-8 ({exc})") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header or len(header) < 2:
        raise InvalidArgumentError("csv line 1: expected a header with feature columns and a last column")
    last = header[-1].strip().lower()
    if last not in ("label", "target"):
        raise InvalidArgumentError(f"csv line 1: the last column must be named 'label' or 'target', got {header[-1]!r}")
    features, values = [], []
    for line_no, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InvalidArgumentError(f"csv line {line_no}: {len(row)} columns, the header has {len(header)}")
        try:
            numbers = [float(cell) for cell in row]
        except ValueError:
            bad = next(cell for cell in row if not _is_float(cell))
            raise InvalidArgumentError(f"csv line {line_no}: {bad!r} is not a number") from None
        if not all(math.isfinite(n) for n in numbers):
            raise InvalidArgumentError(f"csv line {line_no}: NaN or infinite value")
        features.append(numbers[:-1])
        values.append(numbers[-1])
    if not features:
        raise InvalidArgumentError("csv: no data rows after the header")
    x = np.array(features, dtype=np.float32)
    raw = np.array(values, dtype=np.float64)
    if last == "label":
        if not np.all(raw == np.round(raw)):
            raise InvalidArgumentError("csv: a 'label' column must hold whole numbers; use 'target' for regression")
        y, task, classes = _labels_or_targets(raw.astype(np.int64), "csv column 'label'")
    else:
        y, task, classes = raw.astype(np.float32), "regression", []
    return TabularData(x, y, task, classes)


def _is_float(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidArgumentError(f"npz: not a readable .npz archive without pickled objects ({exc})") from None


def _graph(node_features: Any, edge_index: Any, labels: Any, train_mask: Any, where: str) -> GraphData:
    try:
        x = np.asarray(node_features, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{where}: 'node_features' must be an N x F list of numbers") from None
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidArgumentError(f"{where}: 'node_features' must be N x F with N > 0, got shape {list(x.shape)}")
    try:
        edges = np.asarray(edge_index, dtype=np.int64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{where}: 'edge_index' must be two lists of node ids") from None
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise InvalidArgumentError(f"{where}: 'edge_index' must be 2 x E, got shape {list(edges.shape)}")
    if edges.size and (edges.min() < 0 or edges.max() >= len(x)):
        bad = int(edges.min() if edges.min() < 0 else edges.max())
        raise InvalidArgumentError(f"{where}: 'edge_index' names node {bad}, but there are {len(x)} nodes")
    y = np.asarray(labels)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgumentError(f"{where}: 'labels' must be {len(x)} integers, one per node")
    y, _, classes = _labels_or_targets(y, f"{where}: 'labels'")
    mask = None
    if train_mask is not None:
        mask = np.asarray(train_mask, dtype=bool)
        if mask.shape != (len(x),) or not mask.any() or mask.all():
            raise InvalidArgumentError(f"{where}: 'train_mask' must be {len(x)} booleans with both true and false")
    return GraphData(x, edges, y, mask, class_names=classes)


def parse_gnn_json(data: bytes) -> GraphData:
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"json: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise InvalidArgumentError("json: expected an object with node_features, edge_index and labels")
    for key in ("node_features", "edge_index", "labels"):
        if key not in record:
            raise InvalidArgumentError(f"json: missing field {key!r}")
    return _graph(record["node_features"], record["edge_index"], record["labels"], record.get("train_mask"), "json")


def parse_gnn_npz(data: bytes) -> GraphData:
    arrays = _load_npz(data)
    for key in ("node_features", "edge_index", "labels"):
        if key not in arrays:
            raise InvalidArgumentError(f"npz: missing array {key!r}; it has {sorted(arrays)}")
    return _graph(arrays["node_features"], arrays["edge_index"], arrays["labels"], arrays.get("train_mask"), "npz")


def parse_nlp_jsonl(data: bytes) -> TextData:
    texts, names = [], []
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"jsonl line {line_no}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise InvalidArgumentError(f'jsonl line {line_no}: expected {{"text": non-empty string, "label": ...}}')
        label = record.get("label")
        if not isinstance(label, str | int) or isinstance(label, bool) or str(label) == "":
            raise InvalidArgumentError(f"jsonl line {line_no}: 'label' must be a non-empty string or an integer")
        texts.append(record["text"])
        names.append(str(label))
    if not texts:
        raise InvalidArgumentError("jsonl: no examples")
    class_names = sorted(set(names))
    if len(class_names) < 2:
        raise InvalidArgumentError(f"jsonl: needs at least two distinct labels, got {class_names}")
    labels = np.array([class_names.index(name) for name in names], dtype=np.int64)
    return TextData(texts, labels, class_names)


PARSERS = {
    ("dense", "npz"): parse_dense_npz,
    ("dense", "csv"): parse_dense_csv,
    ("gnn", "json"): parse_gnn_json,
    ("gnn", "npz"): parse_gnn_npz,
    ("nlp", "jsonl"): parse_nlp_jsonl,
}


def parse(family: str, fmt: str, data: bytes) -> TabularData | GraphData | TextData:
    parser = PARSERS.get((family, fmt))
    if parser is None:
        allowed = ", ".join(sorted(FORMATS_BY_FAMILY.get(family, ())))
        raise InvalidArgumentError(f"info.format: {fmt!r} is not a {family} format; use one of: {allowed}")
    parsed = parser(data)
    if len(_examples(parsed)) < 4:
        raise InvalidArgumentError(f"{fmt}: at least 4 examples are needed to train and evaluate")
    return parsed


def _examples(parsed: TabularData | GraphData | TextData) -> Any:
    return parsed.labels if isinstance(parsed, GraphData | TextData) else parsed.y


def describe(parsed: TabularData | GraphData | TextData) -> dict[str, Any]:
    if isinstance(parsed, TabularData):
        shape = list(parsed.x.shape[1:])
    elif isinstance(parsed, GraphData):
        shape = [parsed.node_features.shape[1]]
    else:
        shape = []
    return {
        "num_examples": len(_examples(parsed)),
        "feature_shape": shape,
        "task": parsed.task,
        "class_names": parsed.class_names,
    }


class DatasetStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def save(self, name: str, family: str, fmt: str, source: Path, tenant: str = "") -> dict[str, Any]:
        """Validates an uploaded file and stores it; returns its metadata, with the new dataset_id."""
        source = Path(source)
        data = source.read_bytes()
        meta = {
            "dataset_id": f"ds-{uuid.uuid4().hex[:16]}",
            "name": name or "unnamed",
            "family": family,
            "format": fmt,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
            **describe(parse(family, fmt, data)),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tenant": tenant,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            shutil.copyfile(source, staging / f"data.{fmt}")
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            os.chmod(staging, 0o755)
            os.rename(staging, self.root / meta["dataset_id"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return meta

    def meta(self, dataset_id: str, tenant: str | None = None) -> dict[str, Any]:
        """A data set's metadata; with a tenant, another tenant's data set is NOT_FOUND."""
        if not dataset_id.startswith("ds-") or "/" in dataset_id:
            raise InvalidArgumentError(f"dataset_id: {dataset_id!r} is not a dataset id (ds-...)")
        path = self.root / dataset_id / "meta.json"
        meta = json.loads(path.read_text()) if path.is_file() else None
        if meta is None or (tenant is not None and meta.get("tenant", "") != tenant):
            raise NotFoundError(f"dataset {dataset_id!r} not found")
        return meta

    def list(self, tenant: str, family: str = "") -> list[dict[str, Any]]:
        """A tenant's data sets (of one family, when given), newest first."""
        found = []
        for meta_path in self.root.glob("ds-*/meta.json") if self.root.is_dir() else ():
            meta = json.loads(meta_path.read_text())
            if meta.get("tenant", "") == tenant and (not family or meta["family"] == family):
                found.append(meta)
        return sorted(found, key=lambda meta: (meta["created_at"], meta["dataset_id"]), reverse=True)

    def load(self, dataset_id: str) -> TabularData | GraphData | TextData:
        meta = self.meta(dataset_id)
        data = (self.root / dataset_id / f"data.{meta['format']}").read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise IntegrityError(f"dataset {dataset_id}: the file no longer matches its sha256")
        return parse(meta["family"], meta["format"], data)


BUILTIN = {
    "dense": ("digits", "digits-images", "iris", "wine", "breast_cancer", "diabetes", "sine"),
    "gnn": ("karate",),
    "nlp": ("sentiment",),
}


def load_builtin(family: str, name: str) -> TabularData | GraphData | TextData:
    if name not in BUILTIN.get(family, ()):
        raise InvalidArgumentError(
            f"builtin_dataset: {name!r} is not a built-in {family} data set; "
            f"choose from {list(BUILTIN.get(family, ()))}"
        )
    if family == "dense":
        if name == "sine":
            from services.dense.datasets import SINE_WINDOW, sine_series

            series = sine_series()
            windows = np.lib.stride_tricks.sliding_window_view(series[:-1], SINE_WINDOW)[..., None]
            return TabularData(windows.astype(np.float32), series[SINE_WINDOW:].astype(np.float32), "regression")
        import sklearn.datasets

        loader = {"digits": "load_digits", "digits-images": "load_digits"}.get(name, f"load_{name}")
        bunch = getattr(sklearn.datasets, loader)()
        x = bunch.data.astype(np.float32)
        if name == "digits-images":
            x = x.reshape(-1, 1, 8, 8)
        if name == "diabetes":
            return TabularData(x, bunch.target.astype(np.float32), "regression")
        names = [str(n) for n in getattr(bunch, "target_names", range(int(bunch.target.max()) + 1))]
        return TabularData(x, bunch.target.astype(np.int64), "classification", names)
    if family == "gnn":
        from torch_geometric.datasets import KarateClub

        data = KarateClub()[0]
        return _graph(data.x.numpy(), data.edge_index.numpy(), data.y.numpy(), None, "karate")
    from services.nlp.defaults import SENTIMENT_DATA

    return parse_nlp_jsonl(SENTIMENT_DATA.read_bytes())
