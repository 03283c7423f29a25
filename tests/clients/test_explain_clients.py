"""Explanations from the Python SDK (numpy in, numpy out) and from `maasctl explain` (text and PNG)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from maas.nlp.v1 import nlp_pb2
from maas_client import AsyncClient, Client
from tests.clients.scenario import DIGITS
from tests.clients.test_maasctl import maasctl  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def maas(cluster):
    with Client(cluster.specs["gateway"].target) as client:
        yield client


def test_the_sdk_returns_numpy_for_every_family(maas):
    pixels = np.array(DIGITS, np.float32)
    dense = maas.dense.explain("digits-mlp", pixels)
    assert dense.method == "integrated_gradients" and dense["pixels"].shape == (3, 64)
    assert isinstance(dense.scores, np.ndarray) and dense.targets.tolist() == [0, 1, 2]
    np.testing.assert_allclose(dense["pixels"].sum(axis=1), dense.scores - dense.baseline_scores, rtol=0.02, atol=1e-3)

    text = maas.nlp.explain("sentiment", "Terrible, slow and rude service.")
    assert text.label == "negative" and text.attributions.dtype == np.float32
    assert text.spans.shape == (len(text.tokens), 2) and text.top(1)[0][0] in {"terrible", "rude", "slow"}

    graph = maas.gnn.explain("karate-gcn", [0], stored_graph="karate", epochs=50)
    assert graph.edge_mask.shape == (156,) and graph.node_feature_mask.shape == (34, 34)
    assert graph.subgraph_edge_index.shape == (2, len(graph.subgraph_edge_ids))

    ranked = maas.nlp.similarity("a dog runs in the park", ["stock prices fell", "a puppy plays outside"])
    assert ranked.ranking.tolist() == [1, 0] and not ranked.truncated.any() and ranked.reranking is None
    reviews = ["Rude staff and a dirty room.", "A lovely, kind host."]
    reranked = maas.nlp.similarity("the hotel", reviews, model="sentiment", rerank_label="positive")
    assert reranked.reranking.tolist() == [1, 0] and reranked.label_probabilities.dtype == np.float32

    job = maas.explanations.submit(nlp_pb2.ExplainRequest(model_name="sentiment", text="Lovely staff."))
    done = maas.explanations.wait(job.job.job_id, text="Lovely staff.", timeout=240)
    assert done.state == "succeeded" and done.explanation.label == "positive"


def test_the_async_sdk_explains_too(cluster):
    async def explain():
        async with AsyncClient(cluster.specs["gateway"].target) as client:
            return await asyncio.gather(
                client.dense.explain("digits-cnn", np.array(DIGITS, np.float32).reshape(3, 1, 8, 8)),
                client.nlp.similarity("hello there", ["hi", "goodbye forever"]),
            )

    dense, similarity = asyncio.run(explain())
    assert dense["image"].shape == (3, 1, 8, 8) and similarity.scores.shape == (2,)


def test_maasctl_explain_prints_top_attributions_and_saves_pictures(maasctl, tmp_path):  # noqa: F811
    digit = tmp_path / "digit.npy"
    np.save(digit, np.array(DIGITS[:1], np.float32))
    out = maasctl("explain", "dense", "digits-mlp", "--input", str(digit), "--top", "3",
                  "--png", str(tmp_path / "digit.png")).stdout  # fmt: skip
    assert "integrated_gradients" in out and out.count("pixels[") == 3
    out = maasctl("explain", "text", "sentiment", "The food was wonderful", "--png", str(tmp_path / "text.png")).stdout
    assert "label 'positive'" in out and "wonderful" in out
    out = maasctl("explain", "graph", "karate-gcn", "--stored-graph", "karate", "--nodes", "33", "--job",
                  "--epochs", "30", "--png", str(tmp_path / "graph.png")).stdout  # fmt: skip
    assert "queued" in out and "top edges:" in out and "->" in out
    for name in ("digit.png", "text.png", "graph.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 200
    bad = maasctl("explain", "dense", "digits-mlp", "--input", str(digit), "--method", "lime", expect=1)
    assert "unknown method 'lime'" in bad.stderr
