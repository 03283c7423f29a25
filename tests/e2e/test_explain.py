"""Explain, through the gateway, for every family: shapes, completeness, faithfulness and bad input.

Faithfulness is measured, not assumed: Integrated Gradients' attributions sum to the change of the
explained output (completeness); removing the most attributed pixels or tokens moves a prediction
more than removing as many random ones (deletion test, both curves printed); and GNNExplainer's
edge masks on BA-Shapes find the houses' edges (ROC-AUC against the generator's ground truth).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from safetensors.numpy import load
from sklearn.metrics import roc_auc_score

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from services.dense.datasets import digits_split
from services.gnn.datasets import motif_graphs, motif_graphs_with_truth
from services.gnn.defaults import lesmis_split
from services.nlp.defaults import SENTIMENT_DATA, load_labelled_texts
from shared.tensors import from_numpy, to_numpy

NO_CACHE = (("cache-control", "no-store"),)
DELETION_KS = (1, 2, 4, 8, 16)
MOTIF_AUC = 0.85
LINK_KS = (1, 2, 4, 8)
_MOTIF = motif_graphs(1, seed=2)[0]
MOTIF_GRAPH = gnn_pb2.Graph(node_features=from_numpy(_MOTIF[0]), edge_index=from_numpy(_MOTIF[1]))


def dense_stub(channel):
    return dense_pb2_grpc.DenseServiceStub(channel)


def nlp_stub(channel):
    return nlp_pb2_grpc.NlpServiceStub(channel)


def gnn_stub(channel):
    return gnn_pb2_grpc.GnnServiceStub(channel)


def digits(rows: int) -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = digits_split()
    return x_test[:rows], y_test[:rows]


@pytest.mark.parametrize(
    ("model", "input_name", "shape", "method"),
    [
        ("digits-mlp", "pixels", (4, 64), "integrated_gradients"),
        ("digits-cnn", "image", (4, 1, 8, 8), "integrated_gradients"),
        ("digits-mlp", "pixels", (4, 64), "feature_ablation"),
        ("digits-cnn", "image", (2, 1, 8, 8), "kernel_shap"),
    ],
)
def test_dense_attributions_have_the_input_shape(gateway_channel, model, input_name, shape, method):
    x = digits(shape[0])[0].reshape(shape)
    reply = dense_stub(gateway_channel).Explain(
        dense_pb2.ExplainRequest(model_name=model, inputs={input_name: from_numpy(x)}, method=method), timeout=60
    )
    attributions = to_numpy(reply.attributions[input_name], "attributions")
    assert reply.method == method
    assert attributions.shape == shape and attributions.dtype == np.float32
    assert np.abs(attributions).sum() > 0
    predicted = to_numpy(reply.outputs["label"], "label")
    assert list(reply.targets) == predicted.tolist()  # each row's own prediction is what is explained
    assert len(reply.scores) == shape[0]


def test_integrated_gradients_is_complete_within_one_percent(gateway_channel):
    """Attributions sum to f(x) - f(baseline) for the explained class, within 1%, for zeros and a given baseline."""
    x, _ = digits(16)
    baseline = np.full((64,), 4.0, np.float32)  # one row's shape, broadcast over the batch
    for baselines in ({}, {"pixels": from_numpy(baseline)}):
        reply = dense_stub(gateway_channel).Explain(
            dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(x)}, baselines=baselines,
                                     steps=128),  # fmt: skip
            timeout=60,
        )
        assert reply.method == "integrated_gradients"  # the default for a version with a torch form
        sums = to_numpy(reply.attributions["pixels"], "attributions").sum(axis=1)
        change = np.array(reply.scores) - np.array(reply.baseline_scores)
        print(f"\nIG completeness, digits-mlp, 128 steps, {'given' if baselines else 'zeros'} baseline: largest "
              f"|sum - change| / |change| = {np.max(np.abs(sums - change) / np.abs(change)):.5f}")  # fmt: skip
        np.testing.assert_allclose(sums, change, rtol=0.01, atol=1e-4)
        # The score explained is the served prediction's probability of the explained class.
        probabilities = to_numpy(reply.outputs["probabilities"], "probabilities")
        np.testing.assert_allclose(probabilities[np.arange(16), reply.targets], reply.scores, rtol=1e-3, atol=1e-4)


def _probabilities(channel, x: np.ndarray) -> np.ndarray:
    reply = dense_stub(channel).Predict(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(x)}), timeout=30,
        metadata=NO_CACHE,
    )  # fmt: skip
    return to_numpy(reply.outputs["probabilities"], "probabilities")


def test_dense_deletion_top_attributed_pixels_move_the_prediction_more_than_random_ones(gateway_channel):
    x, _ = digits(48)
    reply = dense_stub(gateway_channel).Explain(
        dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(x)}), timeout=60
    )
    attributions = to_numpy(reply.attributions["pixels"], "attributions")
    targets = np.array(reply.targets)
    rows = np.arange(len(x))
    before = np.array(reply.scores)
    rng = np.random.default_rng(0)
    top_curve, random_curve = [], []
    for k in DELETION_KS:
        top = np.argsort(-attributions, axis=1)[:, :k]
        randoms = np.stack([rng.choice(64, k, replace=False) for _ in rows])
        x_top, x_random = x.copy(), x.copy()
        np.put_along_axis(x_top, top, 0.0, axis=1)  # removed: set to the zeros baseline
        np.put_along_axis(x_random, randoms, 0.0, axis=1)
        top_curve.append(float(np.mean(before - _probabilities(gateway_channel, x_top)[rows, targets])))
        random_curve.append(float(np.mean(before - _probabilities(gateway_channel, x_random)[rows, targets])))
    print(f"\ndense deletion (digits-mlp, IG, {len(x)} digits), mean drop of the explained probability")
    print("k        ", list(DELETION_KS))
    print("top-k    ", [round(v, 3) for v in top_curve])
    print("random-k ", [round(v, 3) for v in random_curve])
    assert all(t > r for t, r in zip(top_curve, random_curve, strict=True))
    assert np.mean(top_curve) > 2 * np.mean(random_curve)


def test_nlp_classifier_tokens_with_character_spans(gateway_channel):
    text = "The food was wonderful, and the staff were lovely."
    reply = nlp_stub(gateway_channel).Explain(nlp_pb2.ExplainRequest(model_name="sentiment", text=text), timeout=60)
    assert reply.method == "occlusion" and reply.label == "positive"
    assert [token.token for token in reply.tokens] == [text[t.start : t.end].lower() for t in reply.tokens]
    attributions = to_numpy(reply.attributions, "attributions")
    assert attributions.shape == (len(reply.tokens),)  # one per token of the input
    top = reply.tokens[int(np.argmax(attributions))].token
    assert top in {"wonderful", "lovely"}
    probabilities = to_numpy(reply.probabilities, "probabilities")
    assert probabilities[reply.target] == pytest.approx(reply.score, rel=1e-4)


def test_nlp_similarity_of_two_texts_is_explained(gateway_channel):
    reply = nlp_stub(gateway_channel).Explain(
        nlp_pb2.ExplainRequest(model_name="minilm-l6-v2", text="A cat sits on the mat.",
                               compare_text="The kitten is sitting on a rug."),  # fmt: skip
        timeout=60,
    )
    assert reply.score > 0.4 and reply.baseline_score < reply.score
    best = max(reply.tokens, key=lambda token: token.attribution)
    assert best.token == "cat" and (best.start, best.end) == (2, 5)


def _sentiment_test_texts(count: int) -> list[str]:
    texts, _ = load_labelled_texts(SENTIMENT_DATA)
    return [text for text in texts if len(text.split()) >= 6][:count]


def _without(text: str, spans: list[tuple[int, int]]) -> str:
    kept, last = [], 0
    for start, end in sorted(spans):
        kept.append(text[last:start])
        last = end
    kept.append(text[last:])
    return " ".join("".join(kept).split()) or "."


def test_nlp_deletion_top_attributed_tokens_move_the_prediction_more_than_random_ones(gateway_channel):
    texts = _sentiment_test_texts(16)
    rng = np.random.default_rng(0)
    ks = (1, 2, 3)
    drops_top: dict[int, list[float]] = {k: [] for k in ks}
    drops_random: dict[int, list[float]] = {k: [] for k in ks}
    for text in texts:
        reply = nlp_stub(gateway_channel).Explain(nlp_pb2.ExplainRequest(model_name="sentiment", text=text),
                                                  timeout=60)  # fmt: skip
        spans = [(token.start, token.end) for token in reply.tokens]
        order = np.argsort(-to_numpy(reply.attributions, "attributions"))
        variants = []
        for k in ks:
            variants.append(_without(text, [spans[i] for i in order[:k]]))
            variants.append(_without(text, [spans[i] for i in rng.choice(len(spans), k, replace=False)]))
        predicted = nlp_stub(gateway_channel).Predict(
            nlp_pb2.PredictRequest(model_name="sentiment", texts=variants), timeout=30
        )
        after = to_numpy(predicted.outputs["probabilities"], "probabilities")[:, reply.target]
        for i, k in enumerate(ks):
            drops_top[k].append(reply.score - after[2 * i])
            drops_random[k].append(reply.score - after[2 * i + 1])
    top_curve = [float(np.mean(drops_top[k])) for k in ks]
    random_curve = [float(np.mean(drops_random[k])) for k in ks]
    print(f"\nnlp deletion (sentiment, occlusion, {len(texts)} texts), mean drop of the label's probability")
    print("k        ", list(ks))
    print("top-k    ", [round(v, 3) for v in top_curve])
    print("random-k ", [round(v, 3) for v in random_curve])
    assert all(t > r for t, r in zip(top_curve, random_curve, strict=True))


def test_gnn_explanation_finds_the_house_motifs_of_ba_shapes(gateway_channel, model_store):
    """GNNExplainer's edge mask against BA-Shapes' ground truth: mean ROC-AUC over house nodes >= 0.85.

    A house node's ground truth is its own house's edges (Ying et al., 2019). The generator's
    mask marks every house's edges; other houses inside the node's subgraph do not explain its
    prediction, so the AUC against that mask is printed too, for reference, and not asserted.
    """
    store = model_store  # the cluster serves a copy of it
    version = store.default_version("ba-shapes-gcn")
    manifest = store.manifest("ba-shapes-gcn", version)
    # Read as the service reads it: checked, and unsealed when the store is encrypted.
    graph = load(store.artifacts(manifest).read(manifest.config["graphs"]["ba-shapes"]))
    every_house, labels, edges = graph["motif_edge_mask"], graph["labels"], graph["edge_index"]
    first = int(np.flatnonzero(labels > 0)[0])  # houses are five consecutive nodes after the BA graph
    # Eight nodes, from houses spread over the graph, at every place in a house.
    nodes = [first + 5 * house + place for house, place in zip(range(0, 80, 10), [0, 1, 2, 3, 4, 0, 2, 4], strict=True)]
    aucs, aucs_every_house = [], []
    for node in nodes:
        reply = gnn_stub(gateway_channel).Explain(
            gnn_pb2.ExplainRequest(model_name="ba-shapes-gcn", stored_graph="ba-shapes", node_ids=[node], seed=0),
            timeout=120,
        )
        assert reply.method == "gnn_explainer"
        edge_mask = to_numpy(reply.edge_mask, "edge_mask")
        assert edge_mask.shape == (edges.shape[1],)  # one per edge of the input
        assert to_numpy(reply.node_feature_mask, "node_feature_mask").shape == graph["node_features"].shape
        used = np.array(reply.subgraph_edge_ids)
        assert np.all(edge_mask[np.setdiff1d(np.arange(len(edge_mask)), used)] == 0)
        start = first + (node - first) // 5 * 5
        own_house = np.all((edges >= start) & (edges < start + 5), axis=0)
        aucs.append(roc_auc_score(own_house[used], edge_mask[used]))
        aucs_every_house.append(roc_auc_score(every_house[used], edge_mask[used]))
    print(f"\nBA-Shapes GNNExplainer ROC-AUC over {len(aucs)} house nodes: {np.mean(aucs):.3f} "
          f"(min {np.min(aucs):.3f}); against every house's edges: {np.mean(aucs_every_house):.3f}")  # fmt: skip
    assert np.mean(aucs) >= 0.85


def test_gnn_captum_methods_on_the_karate_graph(gateway_channel):
    for method in ("integrated_gradients", "saliency"):
        reply = gnn_stub(gateway_channel).Explain(
            gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0, 33], method=method),
            timeout=60,
        )
        assert reply.method == method and list(reply.node_ids) == [0, 33]
        assert to_numpy(reply.node_feature_mask, "node_feature_mask").shape == (34, 34)
        assert to_numpy(reply.outputs["probabilities"], "probabilities").shape == (2, 4)
        assert to_numpy(reply.edge_mask, "edge_mask").max() > 0


def _motif_aucs(gateway_channel, graphs, method: str) -> list[float]:
    aucs = []
    for x, edges, label, motif_edges in graphs:
        graph = gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(edges))
        reply = gnn_stub(gateway_channel).Explain(
            gnn_pb2.ExplainRequest(model_name="motif-gin", graph=graph, method=method, seed=0), timeout=60
        )
        assert reply.method == (method or "saliency")
        edge_mask = to_numpy(reply.edge_mask, "edge_mask")
        assert edge_mask.shape == (edges.shape[1],) and list(reply.node_ids) == []
        assert to_numpy(reply.node_feature_mask, "node_feature_mask").shape == x.shape
        assert list(reply.subgraph_edge_ids) == list(range(edges.shape[1]))  # the whole graph is the subgraph
        assert to_numpy(reply.outputs["probabilities"], "probabilities").shape == (1, 2)
        assert to_numpy(reply.outputs["label"], "label")[0] == label
        aucs.append(roc_auc_score(motif_edges, edge_mask))
    return aucs


def _cycle_probability(gateway_channel, graphs, keep) -> np.ndarray:
    request = gnn_pb2.ClassifyGraphsRequest(model_name="motif-gin", graphs=[
        gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(edges[:, keep(motif)]))
        for x, edges, _, motif in graphs])  # fmt: skip
    reply = gnn_stub(gateway_channel).ClassifyGraphs(request, timeout=30, metadata=NO_CACHE)
    return to_numpy(reply.outputs["probabilities"], "probabilities")[:, 1]


def test_gnn_graph_explanation_finds_the_house_motif_of_held_out_graphs(gateway_channel):
    """motif-gin's label of graphs it never saw (seed 1; it trained on seed 0), explained: the ROC-AUC of the
    edge mask against the generator's motif edges, over house graphs, is at least 0.85 for Saliency (the
    default for graph classifiers). GNNExplainer's is printed beside it (0.66 to 0.91 in runs so far, changing
    with the thread count its optimisation runs on): the reason it is not the default here.

    Cycle graphs are not held to it, and the test shows why: the model labels a graph "cycle" when it finds
    no house (a message-passing GNN cannot count 5-cycles), so removing the cycle's edges does not move its
    prediction, and no faithful explanation can point at them. Their AUC is printed for reference.
    """
    graphs = motif_graphs_with_truth(12, seed=1)
    houses, cycles = graphs[0::2], graphs[1::2]
    default_aucs = _motif_aucs(gateway_channel, houses, "")
    explainer_aucs = _motif_aucs(gateway_channel, houses, "gnn_explainer")
    cycle_aucs = _motif_aucs(gateway_channel, cycles, "")
    before = _cycle_probability(gateway_channel, cycles, lambda motif: slice(None))
    without_cycle = _cycle_probability(gateway_channel, cycles, lambda motif: ~motif)
    print(f"\nmotif-gin ROC-AUC against the motif's edges, {len(houses)} held-out house graphs: Saliency "
          f"{np.mean(default_aucs):.3f} (min {np.min(default_aucs):.3f}), GNNExplainer {np.mean(explainer_aucs):.3f} "
          f"(min {np.min(explainer_aucs):.3f}); {len(cycles)} cycle graphs, Saliency {np.mean(cycle_aucs):.3f}, "
          f"P(cycle) {np.mean(before):.3f} -> {np.mean(without_cycle):.3f} with the cycle's edges removed")  # fmt: skip
    assert np.mean(default_aucs) >= MOTIF_AUC
    np.testing.assert_allclose(without_cycle, before, atol=0.05)  # the cycle's edges are not the evidence


def test_gnn_link_explanation_of_pairs_on_an_inline_graph(gateway_channel):
    """lesmis-links' scores of two pairs, explained on the endpoints' computation subgraph of an inline graph:
    the mask covers the input's edges, zero outside that subgraph, and the scores are PredictLinks'."""
    train, _ = lesmis_split(0)
    graph = gnn_pb2.Graph(node_features=from_numpy(train.x.numpy()), edge_index=from_numpy(train.edge_index.numpy()))
    pairs = np.array([[11, 0], [48, 1]], np.int64)
    stub = gnn_stub(gateway_channel)
    reply = stub.Explain(gnn_pb2.ExplainRequest(model_name="lesmis-links", graph=graph, pairs=from_numpy(pairs)),
                         timeout=60)  # fmt: skip
    edge_mask = to_numpy(reply.edge_mask, "edge_mask")
    assert edge_mask.shape == (train.edge_index.shape[1],)
    used = np.array(reply.subgraph_edge_ids)
    assert 0 < len(used) < len(edge_mask) and edge_mask[used].max() > 0
    assert np.all(edge_mask[np.setdiff1d(np.arange(len(edge_mask)), used)] == 0)
    assert set(pairs.reshape(-1)) <= set(reply.subgraph_node_ids)
    predicted = stub.PredictLinks(gnn_pb2.PredictLinksRequest(model_name="lesmis-links", graph=graph,
                                                              pairs=from_numpy(pairs)), timeout=30)  # fmt: skip
    np.testing.assert_allclose(to_numpy(reply.outputs["scores"], "scores"),
                               to_numpy(predicted.outputs["scores"], "scores"), rtol=1e-4, atol=1e-5)  # fmt: skip


def _link_scores(stub, graph_x, edges, pairs) -> np.ndarray:
    request = gnn_pb2.PredictLinksRequest(model_name="lesmis-links", pairs=from_numpy(pairs), graph=gnn_pb2.Graph(
        node_features=from_numpy(graph_x), edge_index=from_numpy(edges)))  # fmt: skip
    return to_numpy(stub.PredictLinks(request, timeout=30, metadata=NO_CACHE).outputs["scores"], "scores")


def test_gnn_link_deletion_top_masked_edges_move_the_explained_outcome_more_than_random_ones(gateway_channel):
    """For held-out Les Misérables pairs (links and non-links), deleting the edges the explanation ranks first
    moves the probability of the explained outcome (link if the score is over 0.5, else none) more than
    deleting as many random edges of the same computation subgraph. Both curves are printed, for the default
    (Saliency) and GNNExplainer, which is only printed: it did barely better than random."""
    _, test = lesmis_split(0)
    x, edges = test.x.numpy(), test.edge_index.numpy()  # the training edges, as the stored graph holds them
    pairs = test.edge_label_index.numpy().astype(np.int64)[:, ::4][:, :16]
    stub = gnn_stub(gateway_channel)
    graph = gnn_pb2.Graph(node_features=from_numpy(x), edge_index=from_numpy(edges))
    rng = np.random.default_rng(0)
    top = {"saliency": np.zeros(len(LINK_KS)), "gnn_explainer": np.zeros(len(LINK_KS))}
    random = np.zeros(len(LINK_KS))

    def drop(pair, before, removed) -> float:
        after = _link_scores(stub, x, np.delete(edges, removed, axis=1), pair)[0]
        return (1.0 if before > 0.5 else -1.0) * (before - after) / pairs.shape[1]

    for u, v in pairs.T:
        pair = np.array([[u], [v]], np.int64)
        for method in top:
            reply = stub.Explain(gnn_pb2.ExplainRequest(model_name="lesmis-links", graph=graph, pairs=from_numpy(pair),
                                                        method="" if method == "saliency" else method),
                                 timeout=60)  # fmt: skip
            assert reply.method == method
            before = float(to_numpy(reply.outputs["scores"], "scores")[0])
            used = np.array(reply.subgraph_edge_ids)
            ranked = used[np.argsort(-to_numpy(reply.edge_mask, "edge_mask")[used], kind="stable")]
            for i, k in enumerate(LINK_KS):
                top[method][i] += drop(pair, before, ranked[:k])
                if method == "saliency":  # random edges of the same subgraph, once
                    random[i] += drop(pair, before, rng.choice(used, k, replace=False))
    print(f"\nlink deletion (lesmis-links, {pairs.shape[1]} held-out pairs), mean drop of the explained outcome")
    print("k                  ", list(LINK_KS))
    for method, curve in top.items():
        print(f"{method + ' top-k':<19}", np.round(curve, 3).tolist())
    print(f"{'random-k':<19}", np.round(random, 3).tolist())
    top = top["saliency"]
    assert np.all(top > random) and np.mean(top) > 0.05


def test_gnn_explanations_on_graph_store_graphs_cover_the_sampled_neighbourhood_only(gateway_channel):
    """On a graph-store graph, Explain runs on the neighbourhood Predict samples for the same query (same
    nodes, edges and answer), and its masks are over that subgraph alone, named by global node ids."""
    stub = gnn_stub(gateway_channel)
    query = {"stored_graph": "sbm-100k", "graph_version": 1, "node_ids": [7, 4242], "fan_outs": [5, 5]}
    request = gnn_pb2.ExplainRequest(model_name="sbm-sage", method="saliency", **query)
    reply = stub.Explain(request, timeout=60)
    again, call = stub.Explain.with_call(request, timeout=60)
    assert dict(call.trailing_metadata())["maas-cache"] == "hit" and again == reply  # a named graph version: cached
    predicted = stub.Predict(gnn_pb2.PredictRequest(model_name="sbm-sage", **query), timeout=30)
    edges = to_numpy(reply.subgraph_edge_index, "subgraph_edge_index")
    assert reply.graph_version == 1 and list(reply.node_ids) == [7, 4242]
    assert len(reply.subgraph_node_ids) == predicted.nodes_used < 100_000
    assert edges.shape == (2, predicted.edges_used) and list(reply.subgraph_edge_ids) == list(range(edges.shape[1]))
    assert to_numpy(reply.edge_mask, "edge_mask").shape == (edges.shape[1],)
    assert to_numpy(reply.node_feature_mask, "node_feature_mask").shape == (predicted.nodes_used, 16)
    assert {7, 4242} <= set(reply.subgraph_node_ids) and set(edges.reshape(-1)) <= set(reply.subgraph_node_ids)
    np.testing.assert_allclose(to_numpy(reply.outputs["probabilities"], "probabilities"),
                               to_numpy(predicted.outputs["probabilities"], "probabilities"), rtol=1e-4, atol=1e-5)

    links = stub.Explain(gnn_pb2.ExplainRequest(model_name="lesmis-links", stored_graph="les-miserables",
                                                pairs=from_numpy(np.array([[11], [48]], np.int64))),
                         timeout=60)  # fmt: skip
    link_edges = to_numpy(links.subgraph_edge_index, "subgraph_edge_index")
    assert links.graph_version >= 1 and to_numpy(links.edge_mask, "edge_mask").shape == (link_edges.shape[1],)
    assert {11, 48} <= set(links.subgraph_node_ids)


BAD = {
    "unknown method": (
        "dense", dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(np.zeros((1, 64),
                                          np.float32))}, method="lime"),  # fmt: skip
        ["method: unknown method 'lime'", "integrated_gradients"],
    ),
    "baseline of the wrong shape": (
        "dense", dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(np.zeros((2, 64),
                                          np.float32))}, baselines={"pixels": from_numpy(np.zeros((63,),
                                          np.float32))}),  # fmt: skip
        ["baselines['pixels']", "[2, 64]", "got [63]"],
    ),
    "too many steps": (
        "dense", dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(np.zeros((1, 64),
                                          np.float32))}, steps=1_000_000),  # fmt: skip
        ["steps: must be 0 (the default) to", "got 1000000"],
    ),
    "text over the token limit": (
        "nlp", nlp_pb2.ExplainRequest(model_name="sentiment", text="word " * 400),
        ["text: 402 tokens, over the model's limit of 128"],
    ),
    "gnn unknown method": (
        "gnn", gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0], method="pgm"),
        ["method: unknown method 'pgm'", "gnn_explainer"],
    ),
    "gnn too many epochs": (
        "gnn", gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0], epochs=99_999),
        ["epochs: must be 0 (the default) to"],
    ),
    "gnn no nodes": (
        "gnn", gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate"),
        ["node_ids: name at least one node"],
    ),
    "gnn node_ids for a graph classifier": (
        "gnn", gnn_pb2.ExplainRequest(model_name="motif-gin", graph=MOTIF_GRAPH, node_ids=[0]),
        ["node_ids: 'motif-gin' is a graph classifier", "leave node_ids empty"],
    ),
    "gnn graph classifier on a graph-store graph": (
        "gnn", gnn_pb2.ExplainRequest(model_name="motif-gin", stored_graph="sbm-100k"),
        ["stored_graph: 'motif-gin' is a graph classifier", "inline"],
    ),
    "gnn pairs out of range": (
        "gnn", gnn_pb2.ExplainRequest(model_name="lesmis-links", stored_graph="les-miserables",
                                      pairs=from_numpy(np.array([[0, 1], [2, 500]], np.int64))),  # fmt: skip
        ["pairs[3]: node 500 is out of range", "0..76"],
    ),
    "gnn pairs of the wrong shape": (
        "gnn", gnn_pb2.ExplainRequest(model_name="lesmis-links", stored_graph="les-miserables",
                                      pairs=from_numpy(np.array([0, 1, 2], np.int64))),  # fmt: skip
        ["pairs: expected INT64 of shape [2, P]", "[3]"],
    ),
    "gnn no pairs for a link predictor": (
        "gnn", gnn_pb2.ExplainRequest(model_name="lesmis-links", stored_graph="les-miserables", node_ids=[3]),
        ["node_ids: 'lesmis-links' is a link predictor", "pairs"],
    ),
    "gnn pairs for a node classifier": (
        "gnn", gnn_pb2.ExplainRequest(model_name="karate-gcn", stored_graph="karate", node_ids=[0],
                                      pairs=from_numpy(np.array([[0], [1]], np.int64))),  # fmt: skip
        ["pairs: 'karate-gcn' is a node classifier"],
    ),
    "gnn link target not 0 or 1": (
        "gnn", gnn_pb2.ExplainRequest(model_name="lesmis-links", stored_graph="les-miserables", target=2,
                                      pairs=from_numpy(np.array([[0], [1]], np.int64))),  # fmt: skip
        ["target: for a link predictor 1 (why a link) or 0 (why none), got 2"],
    ),
    "gnn fan-out of 0 on a graph-store graph": (
        "gnn", gnn_pb2.ExplainRequest(model_name="sbm-sage", stored_graph="sbm-100k", node_ids=[1], fan_outs=[5, 0]),
        ["fan_outs[1]: 0"],
    ),
    "nlp similarity explained on a classifier": (
        "nlp", nlp_pb2.ExplainRequest(model_name="sentiment", text="good", compare_text="bad"),
        ["compare_text: only for embedding models"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_explain_requests_get_invalid_argument(gateway_channel, case):
    family, request, fragments = BAD[case]
    stub = {"dense": dense_stub, "nlp": nlp_stub, "gnn": gnn_stub}[family](gateway_channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()
    # The service keeps serving.
    ok = dense_stub(gateway_channel).Explain(
        dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(np.ones((1, 64), np.float32))}),
        timeout=30,
    )
    assert ok.method == "integrated_gradients"


def test_an_explanation_is_cached_with_its_method_and_parameters(gateway_channel):
    x = from_numpy(digits(2)[0])
    stub = dense_stub(gateway_channel)

    def call(**kwargs):
        reply, call = stub.Explain.with_call(
            dense_pb2.ExplainRequest(model_name="digits-mlp", inputs={"pixels": x}, **kwargs), timeout=30
        )
        return reply, dict(call.trailing_metadata())["maas-cache"]

    first, outcome = call(steps=33)
    assert outcome == "miss"
    again, outcome = call(steps=33)
    assert outcome == "hit" and again == first
    other_steps, outcome = call(steps=34)
    assert outcome == "miss"  # the parameters are part of the key
    other_method, outcome = call(method="feature_ablation")
    assert outcome == "miss" and other_method.method == "feature_ablation"
    predicted, predict_call = stub.Predict.with_call(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": x}), timeout=30
    )
    assert "probabilities" in predicted.outputs  # a prediction is never answered from an explanation
