"""Data set parsing, job spec validation and promotion gates: pure logic, no servers."""

import io
import json

import numpy as np
import pytest

from gateway.job_spec import normalize
from services.dense import datasets as dense_data
from services.dense.datasets import parse_csv as parse_dense_csv
from services.gnn.datasets import parse_json as parse_gnn_json
from services.nlp.datasets import parse_jsonl as parse_nlp_jsonl
from shared.datasets import sniff
from shared.errors import InvalidArgumentError
from shared.job_limits import JobLimits
from shared.model_store import Manifest
from shared.training_worker import evaluate_gate


def npz(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_csv_with_labels_is_classification_and_with_targets_is_regression():
    data = parse_dense_csv(b"a,b,label\n1,2,0\n3,4,1\n5,6,1\n")
    assert data.task == "classification" and data.x.shape == (3, 2) and data.class_names == ["0", "1"]
    data = parse_dense_csv(b"a,target\n1,0.5\n2,1.5\n")
    assert data.task == "regression" and data.y.dtype == np.float32


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"a,b\n1,2\n", "last column must be named 'label' or 'target'"),
        (b"a,label\n1,0\n2\n", "csv line 3: 1 columns, the header has 2"),
        (b"a,label\n1,0.5\n", "whole numbers"),
        (b"a,label\nnan,1\n", "csv line 2: NaN"),
        (b"a,label\n", "no data rows"),
    ],
)
def test_bad_csv_names_the_line(body, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        parse_dense_csv(body)


def test_npz_needs_x_and_labels_or_targets_of_matching_length():
    assert dense_data.parse("npz", npz(x=np.zeros((5, 3)), labels=np.arange(5) % 2)).task == "classification"
    assert dense_data.parse("npz", npz(x=np.zeros((5, 3)), targets=np.ones(5))).task == "regression"
    with pytest.raises(InvalidArgumentError, match="'x' has 5 examples but 'labels' has 4"):
        dense_data.parse("npz", npz(x=np.zeros((5, 3)), labels=np.arange(4)))
    with pytest.raises(InvalidArgumentError, match="'labels' must be integer"):
        dense_data.parse("npz", npz(x=np.zeros((5, 3)), labels=np.ones(5) * 0.5))
    with pytest.raises(InvalidArgumentError, match="at least 4 examples"):
        dense_data.parse("npz", npz(x=np.zeros((2, 3)), labels=np.arange(2)))


def test_pickled_npz_is_refused():
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([object()], dtype=object), labels=np.arange(1))
    with pytest.raises(InvalidArgumentError, match="pickled"):
        dense_data.parse("npz", buffer.getvalue())


def test_graph_json_is_checked_field_by_field():
    graph = {"node_features": [[0.0], [1.0], [2.0], [3.0]], "edge_index": [[0, 1], [1, 2]], "labels": [0, 1, 0, 1]}
    parsed = parse_gnn_json(json.dumps(graph).encode())
    assert parsed.node_features.shape == (4, 1) and parsed.train_mask is None
    with pytest.raises(InvalidArgumentError, match="missing field 'labels'"):
        parse_gnn_json(json.dumps({k: v for k, v in graph.items() if k != "labels"}).encode())
    with pytest.raises(InvalidArgumentError, match="'train_mask' must be 4 booleans"):
        parse_gnn_json(json.dumps({**graph, "train_mask": [True] * 4}).encode())


def test_jsonl_labels_become_sorted_class_names():
    parsed = parse_nlp_jsonl(b'{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n')
    assert parsed.class_names == ["neg", "pos"] and parsed.labels.tolist() == [1, 0]
    with pytest.raises(InvalidArgumentError, match="two distinct labels"):
        parse_nlp_jsonl(b'{"text": "good", "label": "pos"}\n')


def test_spec_defaults_are_filled_in():
    spec = normalize({"architecture": "mlp", "builtin_dataset": "iris", "output_model": "m"}, "dense", None)
    assert spec["optimizer"] == "adam" and spec["learning_rate"] == 1e-3 and spec["epochs"] == 20
    assert spec["hidden_sizes"] == [128, 64] and spec["validation_split"] == 0.1 and spec["task"] == "classification"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"batch_size": 100_000}, "batch_size"),
        ({"k_folds": 1}, "k_folds"),
        ({"k_folds": 3, "validation_split": 0.2}, "choose one way"),
        ({"validation_split": 0.95}, "validation_split"),
        ({"hidden_sizes": [0]}, "hidden_sizes"),
        ({"gate": {"metric": "mse"}}, "not a classification metric"),
        ({"builtin_dataset": "mnist"}, "not a built-in dense data set"),
        ({"architecture": "gru"}, "gru needs sequences"),
        ({"world_size": -1}, r"world_size: must be 1\.\.4 \(the trainers' max_world_size\), got -1"),
        ({"world_size": 5}, r"world_size: must be 1\.\.4"),
        ({"world_size": 2, "k_folds": 3, "validation_split": 0.0}, "world_size, k_folds: cross-validation"),
    ],
)
def test_bad_specs_name_the_field(changes, fragment):
    spec = {"architecture": "mlp", "builtin_dataset": "iris", "output_model": "m", **changes}
    with pytest.raises(InvalidArgumentError, match=fragment):
        normalize(spec, "dense", None)


def test_world_size_is_one_by_default_and_bounded_by_the_trainers_limit():
    spec = {"architecture": "mlp", "builtin_dataset": "iris", "output_model": "m"}
    assert normalize(spec, "dense", None)["world_size"] == 1
    assert normalize({**spec, "world_size": 3}, "dense", None)["world_size"] == 3
    many = JobLimits(max_parameters=10**8, max_hidden_layers=8, max_epoch_rows=10**9, max_world_size=16)
    assert normalize({**spec, "world_size": 16}, "dense", None, many)["world_size"] == 16
    text = {"architecture": "linear", "builtin_dataset": "sentiment", "output_model": "m", "world_size": 2}
    assert normalize(text, "nlp", None)["world_size"] == 2
    with pytest.raises(InvalidArgumentError, match="world_size: gnn jobs train the whole graph in one process"):
        normalize({"architecture": "gcn", "builtin_dataset": "karate", "output_model": "m", "world_size": 2}, "gnn",
                  None)  # fmt: skip


def manifest(metrics):
    return Manifest(name="m", version=3, family="dense", framework="onnx", files={}, inputs=[], outputs=[],
                    metrics=metrics)  # fmt: skip


def test_gates():
    metrics = {"accuracy": 0.91, "f1_macro": 0.9}
    assert evaluate_gate({}, metrics, "classification", None) == (True, "no gate: promoted")
    assert evaluate_gate({"min_value": 0.9}, metrics, "classification", None)[0]
    passed, why = evaluate_gate({"min_value": 0.95}, metrics, "classification", None)
    assert not passed and "not accuracy 0.9100 >= 0.95" in why
    assert evaluate_gate({"better_than_default": True}, metrics, "classification", manifest({"accuracy": 0.8}))[0]
    assert not evaluate_gate({"better_than_default": True}, metrics, "classification", manifest({"accuracy": 0.95}))[0]
    # Lower is better for errors.
    assert evaluate_gate({"better_than_default": True}, {"mse": 0.1}, "regression", manifest({"mse": 0.2}))[0]
    assert not evaluate_gate({"max_value": 0.05}, {"mse": 0.1}, "regression", None)[0]
    assert evaluate_gate({"better_than_default": True}, metrics, "classification", None) == (
        True,
        "gate passed: no current default to beat",
    )


def test_a_deflated_npz_that_would_expand_past_the_cap_is_refused_before_it_is_read():
    from shared.datasets import load_npz

    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((1000, 1000)), labels=np.zeros(1000, np.int64))  # 8 MB of zeros
    data = buffer.getvalue()
    assert len(data) < 100_000
    with pytest.raises(InvalidArgumentError, match="decompressed; the limit is 1000000"):
        load_npz(data, max_bytes=1_000_000)


@pytest.mark.parametrize(
    ("fmt", "head", "fragment"),
    [
        ("npz", b"not a zip", "not a zip archive"),
        ("csv", b"a,b,c\n1,2,3\n", "last column named 'label' or 'target'"),
        ("csv", b"\xff\xfe\x00garbage" * 10, "not UTF-8"),
        ("jsonl", b"{not json}\n", "jsonl line 1: not valid JSON"),
        ("jsonl", b'{"text": "no label"}\n', "jsonl line 1: expected"),
        ("json", b"[1, 2, 3]", "json: expected an object"),
        ("csv", b"", "empty"),
    ],
)
def test_the_framing_check_at_upload_names_what_is_wrong(fmt, head, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        sniff(head, fmt)


def test_a_well_framed_head_passes_the_framing_check():
    sniff(b"PK\x03\x04rest", "npz")
    sniff(b"a,b,label\n1,2,0\n", "csv")
    sniff(b'{"text": "ok", "label": "pos"}\n{"te', "jsonl")  # a line cut at the end of the sample is fine
    sniff(b'  {"node_features": [[1]]', "json")
