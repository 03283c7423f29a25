"""Text data sets for the nlp trainer: the parser of uploaded JSONL, and the built-in one."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from shared.datasets import parse_with
from shared.errors import InvalidArgumentError


@dataclass
class TextData:
    texts: list[str]
    labels: np.ndarray
    class_names: list[str]
    task: str = "classification"

    @property
    def num_examples(self) -> int:
        return len(self.labels)


def parse_jsonl(data: bytes) -> TextData:
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
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[name] for name in names], dtype=np.int64)
    return TextData(texts, labels, class_names)


def parse(fmt: str, data: bytes) -> TextData:
    return parse_with({"jsonl": parse_jsonl}, "nlp", fmt, data)


def describe(parsed: TextData) -> dict:
    return {"num_examples": parsed.num_examples, "feature_shape": [], "task": parsed.task,
            "class_names": parsed.class_names}  # fmt: skip


def load_builtin(name: str) -> TextData:
    if name != "sentiment":
        raise InvalidArgumentError(f"builtin_dataset: {name!r} is not a built-in nlp data set")
    from services.nlp.defaults import SENTIMENT_DATA

    return parse_jsonl(SENTIMENT_DATA.read_bytes())
