"""Validation of SubmitJob requests and the defaults a job spec gets before it is queued.

A spec is a plain dict (the request in protobuf JSON form, snake_case), so the trainers
need no generated code to read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidArgumentError
from shared.families import BY_NAME
from shared.job_limits import JobLimits, check_job_size

ARCHITECTURES = {name: family.architectures for name, family in BY_NAME.items()}
BUILTIN = {name: family.builtin_datasets for name, family in BY_NAME.items()}
METRICS = {
    "classification": {"accuracy", "f1_macro"},
    "multilabel": {"f1_macro", "f1_micro", "exact_match"},
    "regression": {"mse", "rmse"},
    "ranking": {"recall@10", "ndcg@10"},
}
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULTS = {"optimizer": "adam", "learning_rate": 1e-3, "epochs": 20, "batch_size": 64, "validation_split": 0.1}
MAX_FILTERED_COLUMNS = 1024
MAX_COLUMN_NAME = 256


@dataclass(frozen=True)
class BuiltinData:
    """What the gateway knows of a built-in data set as its trainer sees it: task, the shape of one
    example (None where the trainer derives it, as nlp's embeddings), rows and classes (1: regression)."""

    task: str
    shape: list[int] | None
    rows: int
    classes: int


BUILTIN_DATA = {
    "digits": BuiltinData("classification", [64], 1797, 10),
    "digits-images": BuiltinData("classification", [1, 8, 8], 1797, 10),
    "iris": BuiltinData("classification", [4], 150, 3),
    "wine": BuiltinData("classification", [13], 178, 3),
    "breast_cancer": BuiltinData("classification", [30], 569, 2),
    "diabetes": BuiltinData("regression", [10], 442, 1),
    "sine": BuiltinData("regression", [24, 1], 2976, 1),
    "karate": BuiltinData("classification", [34], 34, 4),
    "sbm": BuiltinData("classification", [16], 2000, 4),
    "motifs": BuiltinData("classification", [10], 400, 2),  # 400 small graphs, one label each
    "interactions": BuiltinData("ranking", [900], 12_000, 1),  # 600 users x 20 interactions, 300 items: [nodes]
    "sentiment": BuiltinData("classification", None, 120, 2),
    "topics": BuiltinData("classification", None, 100, 5),
    "aspects": BuiltinData("multilabel", None, 60, 4),
}


def normalize(
    spec: dict[str, Any], family: str, dataset: dict[str, Any] | None, limits: JobLimits | None = None
) -> dict[str, Any]:
    """Checks a job spec against its family, its data set and the trainers' size limits; returns it
    with every default filled in.

    `dataset` is the uploaded data set's metadata, or None for a built-in one.
    """
    spec = dict(spec)
    spec["family"] = family
    architecture = spec.get("architecture", "")
    if architecture not in ARCHITECTURES[family]:
        raise InvalidArgumentError(
            f"architecture: {architecture!r} is not a {family} architecture; "
            f"choose from {sorted(ARCHITECTURES[family])}"
        )
    hidden = spec.get("hidden_sizes") or ARCHITECTURES[family][architecture]
    if any(size < 1 or size > 16384 for size in hidden):
        raise InvalidArgumentError(f"hidden_sizes: each size must be 1..16384, got {hidden}")
    spec["hidden_sizes"] = list(hidden)
    optimizer = spec.get("optimizer") or "OPTIMIZER_ADAM"
    if not isinstance(optimizer, str):  # an enum value this server does not know arrives as a number
        raise InvalidArgumentError(f"optimizer: must be SGD or ADAM, got {optimizer!r}")
    optimizer = optimizer.removeprefix("OPTIMIZER_").lower()
    if optimizer not in ("sgd", "adam"):
        raise InvalidArgumentError(f"optimizer: must be SGD or ADAM, got {spec.get('optimizer')!r}")
    spec["optimizer"] = optimizer
    lr = spec.get("learning_rate", DEFAULTS["learning_rate"])
    if not 0 < lr <= 10:
        raise InvalidArgumentError(f"learning_rate: must be > 0 and <= 10, got {lr}")
    spec["learning_rate"] = lr
    epochs = spec.get("epochs") or DEFAULTS["epochs"]
    if not 1 <= epochs <= 10_000:
        raise InvalidArgumentError(f"epochs: must be 1..10000, got {epochs}")
    spec["epochs"] = epochs
    batch = spec.get("batch_size") or DEFAULTS["batch_size"]
    if not 1 <= batch <= 65_536:
        raise InvalidArgumentError(f"batch_size: must be 1..65536, got {batch}")
    spec["batch_size"] = batch
    folds = spec.get("k_folds", 0)
    if folds and not 2 <= folds <= 20:
        raise InvalidArgumentError(f"k_folds: must be 0 (off) or 2..20, got {folds}")
    split = spec.get("validation_split", 0.0)
    if not 0 <= split < 0.9:
        raise InvalidArgumentError(f"validation_split: must be in [0, 0.9), got {split}")
    if folds and split:
        raise InvalidArgumentError("validation_split and k_folds: choose one way to validate, not both")
    spec["validation_split"] = 0.0 if folds else (split or DEFAULTS["validation_split"])
    spec["k_folds"] = folds
    spec["world_size"] = _world_size(spec, family, limits or JobLimits.defaults())
    if not MODEL_NAME.match(spec.get("output_model", "")):
        raise InvalidArgumentError(
            f"output_model: {spec.get('output_model', '')!r} must be 1-63 lower-case letters, digits, '.', '_' or '-'"
        )
    spec["seed"] = int(spec.get("seed", 0))
    task, shape = _data_task_and_shape(spec, family, dataset)
    _check_columns(spec, family, dataset)
    if task:  # an upload no trainer has parsed yet is checked by the trainer that parses it
        _check_fit(architecture, task, shape, family)
    spec["task"] = task
    _check_size(spec, family, dataset, limits or JobLimits.defaults())
    gate = spec.get("gate") or {}
    metric = gate.get("metric")
    known = METRICS[task] if task else set().union(*METRICS.values())
    if metric and metric not in known:
        raise InvalidArgumentError(
            f"gate.metric: {metric!r} is not a {task or 'known'} metric; choose from {sorted(known)}"
        )
    if gate.get("min_value") is not None and gate.get("max_value") is not None:
        raise InvalidArgumentError("gate: set min_value or max_value, not both")
    return spec


def _world_size(spec: dict[str, Any], family: str, limits: JobLimits) -> int:
    """Data-parallel workers: 0 (unset) is one; dense and nlp jobs may ask for up to the trainers' max_world_size."""
    size = spec.get("world_size") or 1
    if not 1 <= size <= limits.max_world_size:
        raise InvalidArgumentError(
            f"world_size: must be 1..{limits.max_world_size} (the trainers' max_world_size), got {size}"
        )
    if size > 1 and not BY_NAME[family].data_parallel:
        raise InvalidArgumentError(f"world_size: {family} jobs train the whole graph in one process; use world_size 1")
    if size > 1 and spec.get("k_folds"):
        raise InvalidArgumentError("world_size, k_folds: cross-validation runs in one process; use "
                                   "validation_split with world_size > 1")  # fmt: skip
    return size


def _data_task_and_shape(spec: dict[str, Any], family: str, dataset: dict[str, Any] | None):
    if dataset is not None:
        if dataset["family"] != family:
            raise InvalidArgumentError(
                f"dataset_id: {dataset['dataset_id']} is a {dataset['family']} data set, not {family}"
            )
        return dataset.get("task", ""), dataset.get("feature_shape", [])
    name = spec.get("builtin_dataset", "")
    if not name:
        raise InvalidArgumentError("data: set dataset_id (from UploadDataset) or builtin_dataset")
    if name not in BUILTIN[family]:
        raise InvalidArgumentError(
            f"builtin_dataset: {name!r} is not a built-in {family} data set; choose from {list(BUILTIN[family])}"
        )
    builtin = BUILTIN_DATA[name]
    return builtin.task, builtin.shape or [0]


def _check_columns(spec: dict[str, Any], family: str, dataset: dict[str, Any] | None) -> None:
    """drop_columns and mask_columns: CSV columns of a dense job's upload, checked against its header when the
    upload recorded one. The dense trainer applies them before it parses a cell (services/dense/datasets.py)."""
    drop, mask = list(spec.get("drop_columns") or []), list(spec.get("mask_columns") or [])
    if not drop and not mask:
        return
    where = "apply to dense jobs on an uploaded CSV data set"
    if family != "dense":
        raise InvalidArgumentError(f"drop_columns, mask_columns: {where}; this is a {family} job")
    if dataset is None:
        raise InvalidArgumentError(f"drop_columns, mask_columns: {where}, not a built-in one")
    if dataset["format"] != "csv":
        raise InvalidArgumentError(
            f"drop_columns, mask_columns: {where}; {dataset['dataset_id']} is {dataset['format']}"
        )
    if len(drop) + len(mask) > MAX_FILTERED_COLUMNS:
        raise InvalidArgumentError(f"drop_columns, mask_columns: at most {MAX_FILTERED_COLUMNS} columns in all")
    for field, names in (("drop_columns", drop), ("mask_columns", mask)):
        for i, name in enumerate(names):
            if not name.strip() or len(name) > MAX_COLUMN_NAME:
                raise InvalidArgumentError(f"{field}[{i}]: a column name of 1-{MAX_COLUMN_NAME} characters, got "
                                           f"{name[:40]!r}")  # fmt: skip
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"{field}: names a column twice")
    both = sorted(set(drop) & set(mask))
    if both:
        raise InvalidArgumentError(f"drop_columns, mask_columns: {both} are in both; a column is dropped or masked")
    spec["drop_columns"], spec["mask_columns"] = [n.strip() for n in drop], [n.strip() for n in mask]
    header = dataset.get("columns")
    if not header:  # uploaded before the header was recorded: the trainer checks
        return
    for field, names in (("drop_columns", spec["drop_columns"]), ("mask_columns", spec["mask_columns"])):
        missing = [name for name in names if name not in header]
        if missing:
            raise InvalidArgumentError(
                f"{field}: {missing} are not columns of {dataset['dataset_id']}; its header has {header[:50]}"
            )
        if header[-1] in names:
            raise InvalidArgumentError(f"{field}: {header[-1]!r} is the label or target column; it is kept")
    if len(set(spec["drop_columns"])) >= len(header) - 1:
        raise InvalidArgumentError("drop_columns: would drop every feature column; keep at least one")


def _check_size(spec: dict[str, Any], family: str, dataset: dict[str, Any] | None, limits: JobLimits) -> None:
    """The size limits, with what is known now: an upload no trainer has parsed yet has no width, classes or
    rows, so only the layers are checked (and their parameters as a lower bound) until its trainer parses it."""
    if dataset is None:
        builtin = BUILTIN_DATA[spec["builtin_dataset"]]
        in_shape, outputs, rows = builtin.shape, builtin.classes, builtin.rows
    elif dataset.get("task"):
        # An nlp model reads the encoder's embeddings, whose width the trainer knows, not the texts' shape.
        in_shape = list(dataset.get("feature_shape") or []) or None
        in_shape = None if family == "nlp" else in_shape
        if in_shape and spec.get("drop_columns"):  # a CSV's features are one row: dropped ones are not input
            in_shape = [max(in_shape[-1] - len(spec["drop_columns"]), 1)]
        outputs = len(dataset.get("class_names") or []) or 1
        rows = int(dataset.get("num_examples") or 0) or None
    else:
        in_shape, outputs, rows = None, 1, None
    check_job_size(spec, limits, in_shape, outputs, rows)


def _check_fit(architecture: str, task: str, shape: list[int], family: str) -> None:
    if family == "dense" and architecture == "cnn" and len(shape) != 3:
        raise InvalidArgumentError(f"architecture: cnn needs image-shaped examples [C, H, W], the data has {shape}")
    if family == "dense" and architecture == "gru" and len(shape) != 2:
        raise InvalidArgumentError(f"architecture: gru needs sequences [T, F], the data has {shape}")
    if family == "gnn" and architecture == "lightgcn" and task != "ranking":
        raise InvalidArgumentError(f"architecture: lightgcn trains recommenders on user-item interactions; the data "
                                   f"set is a {task} set")  # fmt: skip
    if family == "gnn" and architecture != "lightgcn" and task != "classification":
        hint = "; train a recommender with architecture lightgcn" if task == "ranking" else ""
        raise InvalidArgumentError(f"{family} jobs with {architecture} train classifiers; the data set is a {task} "
                                   f"set{hint}")  # fmt: skip
    if family == "nlp" and task not in ("classification", "multilabel"):
        raise InvalidArgumentError(f"{family} jobs train multi-class or multi-label classifiers; the data set is a "
                                   f"{task} set")  # fmt: skip
