"""Dense data sets: the offline ones the default models train on, and the parsers of uploaded ones."""

from __future__ import annotations

import csv
import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from shared.datasets import labels_or_targets, load_npz, parse_with
from shared.errors import InvalidArgumentError

# Digits pixels run 0..16; exported graphs divide by this, so clients send raw pixels.
PIXEL_MAX = 16.0
SINE_WINDOW = 24


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed 80/20 stratified split of scikit-learn's 8x8 digits: x_train, x_test, y_train, y_test."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def sine_series(length: int = 3000, seed: int = 0) -> np.ndarray:
    """Two seasonal sine waves (periods 24 and 7) plus noise: a series with learnable structure."""
    t = np.arange(length, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, 0.05, length).astype(np.float32)
    return np.sin(2 * np.pi * t / 24) + 0.5 * np.sin(2 * np.pi * t / 7) + noise


def sine_windows(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows of 24 steps and the next value, split in time: the last 20% is held out."""
    series = sine_series(seed=seed)
    windows = np.lib.stride_tricks.sliding_window_view(series[:-1], SINE_WINDOW)
    x = windows[..., None].astype(np.float32)  # [N, 24, 1]
    y = series[SINE_WINDOW:, None].astype(np.float32)  # [N, 1]
    cut = int(len(x) * 0.8)
    return x[:cut], x[cut:], y[:cut], y[cut:]


def held_out(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) of a named data set's held-out split."""
    if dataset == "sklearn.digits":
        _, x_test, _, y_test = digits_split()
        return x_test, y_test
    if dataset == "sklearn.digits.images":
        _, x_test, _, y_test = digits_split()
        return x_test.reshape(-1, 1, 8, 8), y_test
    if dataset == "generated.sine":
        _, x_test, _, y_test = sine_windows()
        return x_test, y_test
    raise ValueError(f"unknown data set {dataset!r}")


# Parsing uploaded data sets, in the dense trainer (never in the gateway).


@dataclass
class TabularData:
    """dense: features (any shape per example) and integer labels or float targets."""

    x: np.ndarray
    y: np.ndarray
    task: str
    class_names: list[str] = field(default_factory=list)
    # Feature positions a job masked (ColumnFilter): all 0 here, and multiplied by 0 in the exported model.
    masked_features: list[int] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ColumnFilter:
    """A job's CSV columns to drop or mask before anything parses them (SubmitJobRequest.drop_columns and
    mask_columns), e.g. free text or identifiers. A dropped column is removed: the model's input has one
    feature fewer. A masked column keeps its place, every value (text included) becomes 0, and the exported
    model multiplies it by 0, so whatever a caller sends there at prediction is ignored. Names match the
    header exactly (spaces around them aside)."""

    drop: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ColumnFilter:
        return cls(tuple(spec.get("drop_columns") or ()), tuple(spec.get("mask_columns") or ()))

    def __bool__(self) -> bool:
        return bool(self.drop or self.mask)

    def check(self, names: list[str]) -> None:
        """Every named column exists and is a feature column (not the last, label or target)."""
        for field_name, wanted in (("drop_columns", self.drop), ("mask_columns", self.mask)):
            missing = [name for name in wanted if name not in names]
            if missing:
                shown = ", ".join(repr(n) for n in names[:50])
                raise InvalidArgumentError(f"{field_name}: {missing} are not columns of the data set; its header has "
                                           f"{shown}")  # fmt: skip
            if names and names[-1] in wanted:
                raise InvalidArgumentError(f"{field_name}: {names[-1]!r} is the label or target column; it is kept")


def parse_npz(data: bytes) -> TabularData:
    arrays = load_npz(data)
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
    y, task, classes = labels_or_targets(values, f"npz: '{label_key}'")
    if len(y) != len(x):
        raise InvalidArgumentError(f"npz: 'x' has {len(x)} examples but '{label_key}' has {len(y)}")
    if not np.all(np.isfinite(x)):
        raise InvalidArgumentError("npz: 'x' holds NaN or infinite values")
    return TabularData(x.astype(np.float32), y, task, classes)


def parse_csv(data: bytes, columns: ColumnFilter | None = None) -> TabularData:
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
    columns = columns or ColumnFilter()
    names = [name.strip() for name in header]
    columns.check(names)
    # Dropped and masked cells are never parsed, so a text in them is never read into a number or an error.
    kept = [i for i, name in enumerate(names) if name not in columns.drop]
    masked = {i for i, name in enumerate(names) if name in columns.mask}
    features, values = [], []
    for line_no, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InvalidArgumentError(f"csv line {line_no}: {len(row)} columns, the header has {len(header)}")
        if columns:
            row = ["0" if i in masked else row[i] for i in kept]
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
        y, task, classes = labels_or_targets(raw.astype(np.int64), "csv column 'label'")
    else:
        y, task, classes = raw.astype(np.float32), "regression", []
    masked_features = [position for position, i in enumerate(kept[:-1]) if i in masked]
    return TabularData(x, y, task, classes, masked_features)


def _is_float(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


PARSERS = {"npz": parse_npz, "csv": parse_csv}


def parse(fmt: str, data: bytes, columns: ColumnFilter | None = None) -> TabularData:
    """An uploaded dense data set, checked field by field; the message names what is wrong. A job's columns
    to drop or mask apply to CSV only."""
    if not columns:
        return parse_with(PARSERS, "dense", fmt, data)
    if fmt != "csv":
        raise InvalidArgumentError(f"drop_columns, mask_columns: apply to CSV data sets; this one is {fmt}")
    return parse_with({"csv": functools.partial(parse_csv, columns=columns)}, "dense", fmt, data)


def describe(parsed: TabularData) -> dict:
    return {"num_examples": parsed.num_examples, "feature_shape": list(parsed.x.shape[1:]), "task": parsed.task,
            "class_names": parsed.class_names}  # fmt: skip


def load_builtin(name: str) -> TabularData:
    """A built-in dense data set, by the name the training API knows it by."""
    if name == "sine":
        series = sine_series()
        windows = np.lib.stride_tricks.sliding_window_view(series[:-1], SINE_WINDOW)[..., None]
        return TabularData(windows.astype(np.float32), series[SINE_WINDOW:].astype(np.float32), "regression")
    import sklearn.datasets

    loader = {"digits": "load_digits", "digits-images": "load_digits"}.get(name, f"load_{name}")
    if not hasattr(sklearn.datasets, loader):
        raise InvalidArgumentError(f"builtin_dataset: {name!r} is not a built-in dense data set")
    bunch = getattr(sklearn.datasets, loader)()
    x = bunch.data.astype(np.float32)
    if name == "digits-images":
        x = x.reshape(-1, 1, 8, 8)
    if name == "diabetes":
        return TabularData(x, bunch.target.astype(np.float32), "regression")
    names = [str(n) for n in getattr(bunch, "target_names", range(int(bunch.target.max()) + 1))]
    return TabularData(x, bunch.target.astype(np.int64), "classification", names)
