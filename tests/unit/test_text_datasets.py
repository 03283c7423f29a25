"""The nlp JSONL parser: multi-class and multi-label files, and the errors that name the line."""

import numpy as np
import pytest

from services.nlp.datasets import MULTILABEL, load_builtin, parse_jsonl
from shared.errors import InvalidArgumentError
from shared.training import multilabel_metrics


def test_a_multi_label_file_becomes_a_label_matrix():
    lines = [b'{"text": "a", "labels": ["x", "y"]}', b'{"text": "b", "labels": []}', b'{"text": "c", "labels": ["z"]}']
    data = parse_jsonl(b"\n".join(lines))
    assert data.task == MULTILABEL and data.class_names == ["x", "y", "z"]
    np.testing.assert_array_equal(data.labels, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"text": "a", "label": "x"}\n{"text": "b", "labels": ["y"]}', "line 2: mixes"),
        (b'{"text": "a", "label": "x", "labels": ["y"]}', "line 1: set \"label\""),
        (b'{"text": "a", "labels": "x"}', "line 1: 'labels' must be a list"),
        (b'{"text": "a", "labels": ["x"]}\n{"text": "b", "labels": ["x"]}', "at least two distinct labels"),
    ],
)
def test_bad_files_name_the_line(data, fragment):
    with pytest.raises(InvalidArgumentError) as caught:
        parse_jsonl(data)
    assert fragment in caught.value.message


def test_the_built_in_text_sets():
    assert load_builtin("topics").class_names == ["finance", "food", "sports", "technology", "travel"]
    aspects = load_builtin("aspects")
    assert aspects.task == MULTILABEL and aspects.labels.shape == (60, 4)
    assert (aspects.labels.sum(axis=1) >= 1).all()


def test_macro_f1_weighs_every_label_alike():
    truth = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    guess = np.array([[1, 0], [1, 0], [1, 0], [0, 0]])
    metrics = multilabel_metrics(truth, guess)
    assert metrics["f1_macro"] == pytest.approx(0.5)  # label 0 perfect, label 1 never found
    assert metrics["exact_match"] == pytest.approx(0.75)
