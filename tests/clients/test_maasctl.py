"""maasctl, the installed command, against the suite's cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.clients.scenario import DIGIT_LABELS, DIGITS, KARATE_NODES

pytestmark = pytest.mark.slow

MAASCTL = Path(sys.executable).parent / "maasctl"


@pytest.fixture(scope="module")
def maasctl(cluster):
    if not MAASCTL.exists():
        pytest.fail(f"{MAASCTL} is missing: `make venv` installs it (pip install -e . adds the console script)")
    env = {**os.environ, "MAAS_TARGET": cluster.specs["gateway"].target}
    env.pop("MAAS_API_KEY", None)

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
        done = subprocess.run([str(MAASCTL), *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == expect, (
            f"maasctl {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        return done

    return run


def one_error_line(done: subprocess.CompletedProcess, starts: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maasctl: error: {starts}"), done.stderr
    return lines[0]


def test_health(maasctl):
    out = maasctl("health").stdout
    assert [line.split() for line in out.splitlines()[2:]] == [
        ["gateway", "SERVING"],
        ["dense", "SERVING"],
        ["gnn", "SERVING"],
        ["nlp", "SERVING"],
    ]


def test_predict_from_a_file_and_from_a_flag(maasctl, tmp_path):
    path = tmp_path / "digits.npy"
    np.save(path, np.array(DIGITS, np.float32))
    from_file = json.loads(maasctl("predict", "digits-mlp", "--input", f"pixels={path}", "--json").stdout)
    assert from_file["label"] == DIGIT_LABELS
    from_flag = json.loads(maasctl("predict", "digits-mlp", "-i", json.dumps(DIGITS[:1]), "--json").stdout)
    assert from_flag["label"] == DIGIT_LABELS[:1]
    saved = tmp_path / "out.npz"
    maasctl("predict", "digits-mlp", "-i", str(path), "--save", str(saved))
    assert np.load(saved)["label"].tolist() == DIGIT_LABELS


def test_embed_classify_and_graph_predict(maasctl, tmp_path):
    embedded = json.loads(maasctl("embed", "A man is playing a guitar.", "Someone plays the guitar.", "--json").stdout)
    assert np.asarray(embedded["embedding"]).shape == (2, 384)
    texts = tmp_path / "reviews.txt"
    texts.write_text("I love this, it is wonderful!\nThis is awful, I hate it.\n")
    table = maasctl("classify", "--file", str(texts)).stdout.splitlines()
    assert [row.split()[0] for row in table[3:]] == ["positive", "negative"]
    nodes = ",".join(map(str, KARATE_NODES))
    graph = json.loads(
        maasctl("graph", "predict", "karate-gcn", "--stored-graph", "karate", "--nodes", nodes, "--json").stdout
    )
    assert graph["node_ids"] == KARATE_NODES and len(graph["label"]) == 3
    inline = tmp_path / "graph.json"
    inline.write_text(json.dumps({"node_features": np.eye(3, 34).tolist(), "edge_index": [[0, 1], [1, 2]]}))
    graph = json.loads(maasctl("graph", "predict", "karate-gcn", "--graph", str(inline), "--json").stdout)
    assert graph["node_ids"] == [0, 1, 2]


def test_models_list_and_show(maasctl):
    listed = {line.split()[0]: line.split()[1] for line in maasctl("models", "list").stdout.splitlines()[2:]}
    assert {"digits-mlp": "dense", "karate-gcn": "gnn", "sentiment": "nlp"}.items() <= listed.items()
    shown = maasctl("models", "show", "digits-mlp").stdout
    assert "inputs: pixels FP32[-1, 64]" in shown and "onnx" in shown


def test_upload_train_watch_plot_promote_rollback(maasctl, tmp_path):
    from sklearn.datasets import load_iris

    iris = load_iris()
    csv = tmp_path / "iris.csv"
    rows = [",".join(f"{v}" for v in x) + f",{y}" for x, y in zip(iris.data, iris.target, strict=True)]
    csv.write_text("a,b,c,d,label\n" + "\n".join(rows) + "\n")
    upload = maasctl("datasets", "upload", str(csv), "--family", "dense")
    assert "100%" in upload.stderr  # the progress bar reached the end
    dataset_id = upload.stdout.split()[1].rstrip(":")
    assert dataset_id.startswith("ds-")
    assert dataset_id in maasctl("datasets", "list", "--family", "dense").stdout
    assert "not parsed yet" in maasctl("datasets", "show", dataset_id).stdout

    plot = tmp_path / "curves.png"
    trained = maasctl("train", "submit", "--family", "dense", "--arch", "mlp", "--dataset-id", dataset_id,
                      "--epochs", "5", "--output-model", "ctl-iris", "--watch", "--plot", str(plot))  # fmt: skip
    job_id = trained.stdout.split()[1]
    assert "5/5" in trained.stderr and "loss=" in trained.stderr  # the live progress bar
    assert "succeeded: ctl-iris v1" in trained.stdout
    assert "classification" in maasctl("datasets", "show", dataset_id).stdout  # what the trainer found
    metrics = {line.split()[0] for line in trained.stdout.splitlines() if line[:1].isalpha()}
    assert {"accuracy", "f1_macro"} <= metrics
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Watching a finished job replays it; a second version, then back to the first.
    assert "succeeded" in maasctl("train", "watch", job_id).stdout
    maasctl("train", "submit", "--family", "dense", "--arch", "mlp", "--dataset", "iris", "--epochs", "2",
            "--output-model", "ctl-iris", "--watch")  # fmt: skip
    assert "default is now v2" in maasctl("models", "promote", "ctl-iris", "2").stdout
    assert "from v2 to v1" in maasctl("models", "rollback", "ctl-iris").stdout
    # A canary on the version rolled back from, shown in the list, and ended.
    assert "v2 takes 25% of the default traffic, v1 the rest" in maasctl("models", "canary", "ctl-iris", "2",
                                                                          "25").stdout  # fmt: skip
    assert "v1 + v2 at 25%" in maasctl("models", "list").stdout
    assert "no canary; v1 takes all" in maasctl("models", "canary", "ctl-iris", "2", "0").stdout
    refused = maasctl("models", "canary", "ctl-iris", "2", "120", expect=1)
    assert "percent: must be 1 to 99" in one_error_line(refused, "")
    # A shadow on it: copies of v1's calls.
    assert "v2 gets copies of 50% of the default traffic; v1 answers" in maasctl("models", "shadow", "ctl-iris", "2",
                                                                                "50").stdout  # fmt: skip
    assert "shadow v2 at 50%" in maasctl("models", "list").stdout
    assert "no shadow" in maasctl("models", "shadow", "ctl-iris", "2", "0").stdout
    assert job_id in maasctl("jobs", "list", "--family", "dense").stdout


def test_a_job_on_two_workers_from_the_command_line(maasctl):
    done = maasctl("train", "submit", "--family", "dense", "--arch", "mlp", "--dataset", "iris", "--epochs", "3",
                   "--workers", "2", "--output-model", "ctl-ddp-iris", "--watch")  # fmt: skip
    assert "succeeded: ctl-ddp-iris v1" in done.stdout
    refused = maasctl("train", "submit", "--family", "gnn", "--arch", "gcn", "--dataset", "karate", "--workers", "2",
                      "--output-model", "ctl-ddp-karate", expect=1)  # fmt: skip
    assert "world_size: gnn jobs train the whole graph in one process" in refused.stderr


def test_cancel_then_watch_a_cancelled_job(maasctl):
    submitted = maasctl("train", "submit", "--family", "dense", "--arch", "mlp", "--dataset", "digits",
                        "--epochs", "500", "--output-model", "ctl-cancelled")  # fmt: skip
    job_id = submitted.stdout.split()[1]
    maasctl("jobs", "cancel", job_id)
    watched = maasctl("train", "watch", job_id, expect=1)
    assert f"job {job_id} cancelled" in watched.stdout
    one_error_line(maasctl("jobs", "cancel", job_id, expect=1), "FAILED_PRECONDITION")


def test_errors_are_one_line_and_a_non_zero_exit(maasctl, tmp_path):
    line = one_error_line(maasctl("predict", "digits-mlp", "-i", "[[1, 2, 3]]", expect=1), "INVALID_ARGUMENT")
    assert "shape must be [-1, 64]" in line
    one_error_line(maasctl("models", "show", "no-such-model", expect=1), "NOT_FOUND")
    one_error_line(maasctl("predict", "digits-mlp", "-i", str(tmp_path / "missing.npy"), expect=2), "--input")
    one_error_line(maasctl("--target", "127.0.0.1:1", "--timeout", "2", "health", expect=1), "UNAVAILABLE")
    assert maasctl("train", "submit", "--family", "dense", expect=2).returncode == 2  # argparse: usage error


def test_bad_input_files_and_flags_give_one_line(maasctl, tmp_path):
    np.save(tmp_path / "u16.npy", np.zeros((1, 64), np.uint16))
    np.savez(tmp_path / "x.npz", other=np.zeros((1, 64), np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "five.json").write_text("5")
    (tmp_path / "cert.pem").write_text("not a certificate")
    cases = [
        (["predict", "digits-mlp", "-i", f"pixels={tmp_path / 'u16.npy'}"], "cannot send numpy dtype uint16"),
        (["predict", "digits-mlp", "-i", f"pixels={tmp_path / 'x.npz'}"], "has no array 'pixels'"),
        (["predict", "digits-mlp", "-i", str(tmp_path / "empty.npy")], "--input"),
        (["predict", "digits-mlp", "-i", str(tmp_path / "empty.csv")], "--input"),
        (["predict", "digits-mlp", "-i", "[[1, 2"], "not a JSON array"),
        (["graph", "predict", "karate-gcn", "--graph", str(tmp_path / "five.json")], "expected an object"),
        (["--cert", str(tmp_path / "cert.pem"), "health"], "both a client certificate and its private key"),
        (["embed", "hello", "--save", str(tmp_path / "v.npy"), "--model", "sentiment"], "save them to a .npz"),
    ]
    for args, message in cases:
        assert message in one_error_line(maasctl(*args, expect=2), ""), args
    for args in (["--timeout", "0", "health"], ["predict", "digits-mlp", "--dtype", "foo", "-i", "[[1]]"]):
        one_error_line(maasctl(*args, expect=2), "argument")


def test_a_tls_handshake_failure_is_one_line(maasctl):
    # The suite's gateway speaks plaintext; gRPC's own handshake logging must not add lines.
    one_error_line(maasctl("--tls", "--timeout", "3", "health", expect=1), "UNAVAILABLE")


def test_recommend_and_similar_items(maasctl, cluster):
    import asyncio

    from maas_client import AsyncClient, Client

    out = maasctl("recommend", "shop-lightgcn", "--users", "0,1", "--top", "3").stdout.splitlines()
    assert out[0].startswith("shop-lightgcn v") and "on graph v" in out[0]
    rows = [line.split(None, 1) for line in out[3:]]
    assert [row[0] for row in rows] == ["0", "1"]
    payload = json.loads(maasctl("recommend", "shop-lightgcn", "--users", "0,1", "--top", "3", "--json").stdout)
    assert np.array(payload["items"]).shape == (2, 3) and payload["user_ids"] == [0, 1]
    assert payload["popularity_fallback"] == [False, False]
    for row, items in zip(rows, payload["items"], strict=True):
        assert [int(part.split()[0]) for part in row[1].split(", ")] == items

    similar = json.loads(maasctl("similar", "shop-lightgcn", "--items", "600", "--top", "4", "--json").stdout)
    assert len(similar["items"][0]) == 4 and 600 not in similar["items"][0]
    assert "by content" in maasctl("similar", "shop-lightgcn", "--items", "600", "--top", "2").stdout

    # The SDK's answer is the command's.
    with Client(cluster.specs["gateway"].target) as client:
        answer = client.gnn.recommend("shop-lightgcn", [0, 1], top_k=3)
        alike = client.gnn.similar_items("shop-lightgcn", [600], top_k=4)
    assert answer.items.tolist() == payload["items"] and answer.popularity_fallback.tolist() == [False, False]
    assert alike.items.tolist() == similar["items"] and alike.by == "content"

    async def from_asyncio():
        async with AsyncClient(cluster.specs["gateway"].target) as client:
            return await client.gnn.recommend("shop-lightgcn", [0, 1], top_k=3)

    assert asyncio.run(from_asyncio()).items.tolist() == payload["items"]

    bad = maasctl("recommend", "shop-lightgcn", "--users", "0", "--top", "0", expect=1)
    assert "top_k" in one_error_line(bad, "")
    bad = maasctl("recommend", "shop-lightgcn", "--users", "x", expect=2)
    assert "--users" in bad.stderr
