"""Explanations from the Python SDK (numpy in, numpy out) and from `maasctl explain` (text and PNG)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from maas.nlp.v1 import nlp_pb2
from maas_client import AsyncClient, Client
from services.gnn.datasets import motif_graphs
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
    links = maas.gnn.explain("lesmis-links", stored_graph="les-miserables", pairs=np.array([[11], [48]]))
    assert links.graph_version >= 1 and links.method == "saliency" and links.outputs["scores"].shape == (1,)
    assert links.edge_mask.shape == (links.subgraph_edge_index.shape[1],)  # over the sampled subgraph only

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


def test_maasctl_explains_links_graphs_and_graph_store_neighbourhoods(maasctl, tmp_path):  # noqa: F811
    out = maasctl("explain", "graph", "lesmis-links", "--stored-graph", "les-miserables", "--pairs", "11:48,0:1",
                  "--epochs", "30", "--png", str(tmp_path / "links.png")).stdout  # fmt: skip
    assert "links 11-48 (" in out and ", 0-1 (" in out and "masks over the sampled subgraph" in out
    x, edges, _ = motif_graphs(1, seed=4)[0]
    graph = tmp_path / "motif.json"
    graph.write_text(json.dumps({"node_features": x.tolist(), "edge_index": edges.tolist()}))
    out = maasctl("explain", "graph", "motif-gin", "--graph", str(graph), "--png", str(tmp_path / "motif.png")).stdout
    assert "saliency: the graph, labelled 0" in out and "top edges:" in out
    out = maasctl("explain", "graph", "sbm-sage", "--stored-graph", "sbm-100k", "--graph-version", "1", "--nodes",
                  "7", "--fan-outs", "3,3", "--method", "saliency").stdout  # fmt: skip
    assert "nodes [7] labelled" in out and "(graph v1, masks over the sampled subgraph)" in out
    for name in ("links.png", "motif.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 200
    bad = maasctl("explain", "graph", "motif-gin", "--graph", str(graph), "--nodes", "1", expect=1)
    assert "node_ids: 'motif-gin' is a graph classifier" in bad.stderr
    bad = maasctl("explain", "graph", "lesmis-links", "--stored-graph", "les-miserables", "--pairs", "11-48", expect=2)
    assert "--pairs '11-48': expected comma-separated u:v" in bad.stderr
