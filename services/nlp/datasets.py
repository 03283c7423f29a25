"""Text data sets for the nlp trainer: the parser of uploaded JSONL, and the built-in ones.

A line is {"text": ..., "label": ...} (multi-class: one label per text) or {"text": ...,
"labels": [...]} (multi-label: any number of labels per text, none included); a file is one or
the other. Built in: "sentiment" (2 classes), "topics" (5 classes) and "aspects" (4 labels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.datasets import parse_with
from shared.errors import InvalidArgumentError

DATA_DIR = Path(__file__).parent / "data"
MULTILABEL = "multilabel"
BUILTIN = {"sentiment": "sentiment.jsonl", "topics": "topics.jsonl", "aspects": "aspects.jsonl"}


@dataclass
class TextData:
    texts: list[str]
    # Class indices (N,) for classification; a 0/1 matrix (N, classes), FP32, for multilabel.
    labels: np.ndarray
    class_names: list[str]
    task: str = "classification"

    @property
    def num_examples(self) -> int:
        return len(self.labels)


def parse_jsonl(data: bytes) -> TextData:
    texts, names, label_sets = [], [], []
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"jsonl line {line_no}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise InvalidArgumentError(f'jsonl line {line_no}: expected {{"text": non-empty string, "label": ...}}')
        if ("label" in record) == ("labels" in record):
            raise InvalidArgumentError(f'jsonl line {line_no}: set "label" (one class) or "labels" (a list), '
                                       "not both or neither")  # fmt: skip
        if (label_sets or names) and bool(label_sets) != ("labels" in record):
            raise InvalidArgumentError(f'jsonl line {line_no}: mixes "label" and "labels"; a file is multi-class '
                                       "or multi-label")  # fmt: skip
        if "labels" in record:
            labels = record["labels"]
            if not isinstance(labels, list) or not all(_is_label(label) for label in labels):
                raise InvalidArgumentError(f"jsonl line {line_no}: 'labels' must be a list of non-empty strings "
                                           "or integers")  # fmt: skip
            label_sets.append({str(label) for label in labels})
        else:
            if not _is_label(record["label"]):
                raise InvalidArgumentError(f"jsonl line {line_no}: 'label' must be a non-empty string or an integer")
            names.append(str(record["label"]))
        texts.append(record["text"])
    if not texts:
        raise InvalidArgumentError("jsonl: no examples")
    if label_sets:
        class_names = sorted(set().union(*label_sets))
        if len(class_names) < 2:
            raise InvalidArgumentError(f"jsonl: needs at least two distinct labels, got {class_names}")
        matrix = np.array([[name in labels for name in class_names] for labels in label_sets], dtype=np.float32)
        return TextData(texts, matrix, class_names, MULTILABEL)
    class_names = sorted(set(names))
    if len(class_names) < 2:
        raise InvalidArgumentError(f"jsonl: needs at least two distinct labels, got {class_names}")
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[name] for name in names], dtype=np.int64)
    return TextData(texts, labels, class_names)


def _is_label(value) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool) and str(value) != ""


def parse(fmt: str, data: bytes) -> TextData:
    return parse_with({"jsonl": parse_jsonl}, "nlp", fmt, data)


def describe(parsed: TextData) -> dict:
    return {"num_examples": parsed.num_examples, "feature_shape": [], "task": parsed.task,
            "class_names": parsed.class_names}  # fmt: skip


def load_builtin(name: str) -> TextData:
    if name not in BUILTIN:
        raise InvalidArgumentError(f"builtin_dataset: {name!r} is not a built-in nlp data set; choose from "
                                   f"{sorted(BUILTIN)}")  # fmt: skip
    return parse_jsonl((DATA_DIR / BUILTIN[name]).read_bytes())
