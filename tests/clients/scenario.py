"""The scenario every non-Python client runs against a suite-started gateway, and its check.

A client is started as `<client> <gateway host:port> <run id>` and prints one JSON object per line:

    {"step": "dense", "model": "digits-mlp", "version": 1, "labels": [0, 1, 2]}
    {"step": "gnn", "model": "karate-gcn", "version": 1, "node_ids": [0, 16, 33], "labels": [...]}
    {"step": "embed", "model": "minilm-l6-v2", "version": 1, "shape": [2, 384], "cosine": 0.8}
    {"step": "classify", "model": "sentiment", "version": 1, "labels": ["positive", "negative"]}
    {"step": "submitted", "job_id": "...", "state": "JOB_STATE_QUEUED"}
    {"step": "event", "state": "JOB_STATE_RUNNING", "epoch": 1, "epochs": 3, "train_loss": 0.9}
    {"step": "job", "state": "JOB_STATE_SUCCEEDED", "model_version": 1, "metrics": {"accuracy": 0.9}}
    {"step": "bad_input", "code": 3, "code_name": "INVALID_ARGUMENT", "details": "..."}

and exits 0 once every step worked. The inputs are fixed: the first three scikit-learn digits
(`DIGITS`, labels 0, 1, 2), karate-club nodes 0, 16 and 33, the two `EMBED_TEXTS`, the two
`SENTIMENT_TEXTS`, and an iris MLP trained for 3 epochs into the model `<language>-client-iris`.
The bad input is a digits-mlp call whose "pixels" tensor has 63 columns instead of 64.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

DIGITS = [
    [
        0,
        0,
        5,
        13,
        9,
        1,
        0,
        0,
        0,
        0,
        13,
        15,
        10,
        15,
        5,
        0,
        0,
        3,
        15,
        2,
        0,
        11,
        8,
        0,
        0,
        4,
        12,
        0,
        0,
        8,
        8,
        0,
        0,
        5,
        8,
        0,
        0,
        9,
        8,
        0,
        0,
        4,
        11,
        0,
        1,
        12,
        7,
        0,
        0,
        2,
        14,
        5,
        10,
        12,
        0,
        0,
        0,
        0,
        6,
        13,
        10,
        0,
        0,
        0,
    ],
    [
        0,
        0,
        0,
        12,
        13,
        5,
        0,
        0,
        0,
        0,
        0,
        11,
        16,
        9,
        0,
        0,
        0,
        0,
        3,
        15,
        16,
        6,
        0,
        0,
        0,
        7,
        15,
        16,
        16,
        2,
        0,
        0,
        0,
        0,
        1,
        16,
        16,
        3,
        0,
        0,
        0,
        0,
        1,
        16,
        16,
        6,
        0,
        0,
        0,
        0,
        1,
        16,
        16,
        6,
        0,
        0,
        0,
        0,
        0,
        11,
        16,
        10,
        0,
        0,
    ],
    [
        0,
        0,
        0,
        4,
        15,
        12,
        0,
        0,
        0,
        0,
        3,
        16,
        15,
        14,
        0,
        0,
        0,
        0,
        8,
        13,
        8,
        16,
        0,
        0,
        0,
        0,
        1,
        6,
        15,
        11,
        0,
        0,
        0,
        1,
        8,
        13,
        15,
        1,
        0,
        0,
        0,
        9,
        16,
        16,
        5,
        0,
        0,
        0,
        0,
        3,
        13,
        16,
        16,
        11,
        5,
        0,
        0,
        0,
        0,
        3,
        11,
        16,
        9,
        0,
    ],
]
DIGIT_LABELS = [0, 1, 2]
KARATE_NODES = [0, 16, 33]
EMBED_TEXTS = ["A man is playing a guitar.", "Someone plays the guitar."]
SENTIMENT_TEXTS = ["I love this, it is wonderful!", "This is awful, I hate it."]


def parse(stdout: str) -> dict[str, list[dict]]:
    """Groups the client's JSON lines by step; any other line is a failure of the contract."""
    steps: dict[str, list[dict]] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        steps.setdefault(record["step"], []).append(record)
    return steps


def check(stdout: str, karate_labels: list[int]) -> dict[str, list[dict]]:
    """Asserts every step of the scenario against what the Python stubs get for the same inputs."""
    steps = parse(stdout)
    (dense,) = steps["dense"]
    assert dense["model"] == "digits-mlp" and dense["version"] >= 1
    assert dense["labels"] == DIGIT_LABELS

    (gnn,) = steps["gnn"]
    assert gnn["node_ids"] == KARATE_NODES
    assert gnn["labels"] == karate_labels

    (embed,) = steps["embed"]
    assert embed["shape"] == [2, 384]
    # Paraphrases: MiniLM puts them close together.
    assert 0.5 < embed["cosine"] <= 1.0 + 1e-6

    (classify,) = steps["classify"]
    assert classify["labels"] == ["positive", "negative"]

    (submitted,) = steps["submitted"]
    assert submitted["job_id"]
    events = steps.get("event", [])
    assert any(event["epoch"] >= 1 for event in events), f"no epoch event was streamed: {events}"
    assert all(math.isfinite(event["train_loss"]) for event in events)
    (job,) = steps["job"]
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    assert job["model_version"] >= 1
    assert 0.0 <= job["metrics"]["accuracy"] <= 1.0

    (bad,) = steps["bad_input"]
    assert bad["code"] == 3 and bad["code_name"] == "INVALID_ARGUMENT", bad
    assert "64" in bad["details"], f"the message should say what was expected: {bad['details']}"
    return steps


def run_client(command: list[str], timeout_s: float = 360) -> str:
    """Runs a client's scenario; fails the test with its output unless it exits 0. Returns stdout."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"{command[0]} ran over {timeout_s} s\n{_output(error)}") from None
    assert done.returncode == 0, f"{command[0]} exited {done.returncode}\n{_output(done)}"
    return done.stdout


def build(command: list[str], cwd: Path, timeout_s: float = 900) -> None:
    """Runs a build step; fails the test with its output unless it exits 0."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"`{' '.join(command)}` took over {timeout_s} s\n{_output(error)}") from None
    assert done.returncode == 0, f"`{' '.join(command)}` in {cwd} exited {done.returncode}\n{_output(done)}"


def _output(result: subprocess.CompletedProcess | subprocess.TimeoutExpired) -> str:
    # TimeoutExpired carries bytes (or None) even when the process ran with text=True.
    def text(stream: str | bytes | None) -> str:
        return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""

    return f"--- stdout\n{text(result.stdout)[-4000:]}\n--- stderr\n{text(result.stderr)[-4000:]}"
