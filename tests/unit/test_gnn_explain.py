"""GNN explanations per task, on small untrained networks: what each task accepts, and which graph the masks cover."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save

from services.gnn.architectures import build_network
from services.gnn.explain import ExplainParams, GnnExplainLimits, explain_query, resolve_query
from services.gnn.graph_store import GraphStore
from services.gnn.runtime import GnnModel, GraphInput, QueryLimits
from shared.errors import InvalidArgumentError
from shared.model_store import ModelStore

LIMITS = GnnExplainLimits(max_nodes=4, max_epochs=64)
WIDTH = 4


def tiny(store: ModelStore, task: str) -> tuple[GnnModel, object]:
    torch.manual_seed(0)
    config = {"task": task, "architecture": "sage" if task == "node" else "gcn" if task == "link" else "gin",
              "in_channels": WIDTH, "hidden": 8, "num_classes": 3, "embedding_size": 8, "num_layers": 2,
              "fan_outs": [3, 3], "weights_file": "weights.safetensors"}  # fmt: skip
    net = build_network(config)
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    manifest = store.publish({"name": f"tiny-{task}", "family": "gnn", "framework": "torch", "inputs": [],
                              "outputs": [], "config": config}, {"weights.safetensors": weights})  # fmt: skip
    return GnnModel(manifest, store.artifacts(manifest), torch.device("cpu")), manifest


def ring(n: int, rng: np.random.Generator) -> GraphInput:
    """A ring with random chords, both directions of each edge."""
    ring_edges = np.stack([np.arange(n), (np.arange(n) + 1) % n])
    chords = rng.integers(0, n, (2, n // 2))
    edges = np.concatenate([ring_edges, chords], axis=1)
    return GraphInput(rng.normal(size=(n, WIDTH)).astype(np.float32), np.concatenate([edges, edges[::-1]], axis=1))


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path)


def test_a_graph_store_explanation_is_over_the_sampled_neighbourhood_only(store):
    model, manifest = tiny(store, "node")
    graphs = GraphStore(store)
    whole = ring(20_000, np.random.default_rng(0))
    graphs.publish_edges("big", whole.edge_index, whole.node_features, undirected=False)
    params = ExplainParams(stored_graph="big", node_ids=[5, 17_000], fan_outs=[3, 3], method="saliency")
    query = resolve_query(model, manifest, params, graphs, LIMITS, QueryLimits())
    explanation = explain_query(model.net, manifest, query, params, LIMITS)
    nodes, edges = explanation.subgraph_node_ids, explanation.subgraph_edge_index
    assert explanation.graph_version == 1 and explanation.node_ids == [5, 17_000]
    assert len(nodes) <= 2 * (1 + 3 + 9) and {5, 17_000} <= set(nodes.tolist())
    assert explanation.edge_mask.shape == (edges.shape[1],) and explanation.node_feature_mask.shape == (len(nodes), 4)
    assert explanation.edge_mask.max() > 0
    stored = graphs.open("big")
    for source, target in edges.T:  # global ids of real edges: source is an in-neighbour of target
        assert source in stored.indices[stored.indptr[target] : stored.indptr[target + 1]]
    assert explanation.outputs["probabilities"].shape == (2, 3)


def test_a_link_explanation_masks_the_endpoints_computation_subgraph(store):
    model, manifest = tiny(store, "link")
    graph = ring(200, np.random.default_rng(1))
    for target in (None, 0):
        params = ExplainParams(graph=graph, pairs=np.array([[0, 50], [3, 51]], np.int64), epochs=5, target=target)
        explanation = explain_query(model.net, manifest, resolve_query(model, manifest, params, None, LIMITS,
                                                                        QueryLimits()), params, LIMITS)  # fmt: skip
        used = explanation.subgraph_edge_ids
        assert explanation.edge_mask.shape == (graph.num_edges,) and 0 < len(used) < graph.num_edges
        assert np.all(np.delete(explanation.edge_mask, used) == 0)
        assert {0, 3, 50, 51} <= set(explanation.subgraph_node_ids.tolist())
        assert explanation.outputs["scores"].shape == (2,) and np.all((0 < explanation.outputs["scores"]) <= 1)


def test_a_graph_explanation_covers_the_whole_graph(store):
    model, manifest = tiny(store, "graph")
    graph = ring(30, np.random.default_rng(2))
    params = ExplainParams(graph=graph, epochs=5, target=2)
    explanation = explain_query(model.net, manifest, resolve_query(model, manifest, params, None, LIMITS,
                                                                    QueryLimits()), params, LIMITS)  # fmt: skip
    assert explanation.edge_mask.shape == (graph.num_edges,) and explanation.node_feature_mask.shape == (30, WIDTH)
    np.testing.assert_array_equal(explanation.subgraph_edge_ids, np.arange(graph.num_edges))
    assert explanation.outputs["probabilities"].shape == (1, 3) and explanation.node_ids == []


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gnn_explainer"])
def test_nodes_with_no_edges_get_feature_masks_and_an_empty_edge_mask(store, method):
    """A pair of isolated nodes has a computation subgraph with no edges: its features still explain it."""
    model, manifest = tiny(store, "link")
    graph = ring(20, np.random.default_rng(4))
    graph = GraphInput(np.concatenate([graph.node_features, np.ones((2, WIDTH), np.float32)]), graph.edge_index)
    params = ExplainParams(graph=graph, pairs=np.array([[20], [21]], np.int64), method=method, epochs=4)
    explanation = explain_query(model.net, manifest, resolve_query(model, manifest, params, None, LIMITS,
                                                                    QueryLimits()), params, LIMITS)  # fmt: skip
    assert len(explanation.subgraph_edge_ids) == 0 and not explanation.edge_mask.any()
    assert explanation.node_feature_mask[20:].any() and not explanation.node_feature_mask[:20].any()


BAD = {
    "node_ids to a graph classifier": ("graph", {"node_ids": [0]}, "node_ids: 'tiny-graph' is a graph classifier"),
    "pairs to a graph classifier": ("graph", {"pairs": np.zeros((2, 1), np.int64)}, "pairs: 'tiny-graph' is a graph"),
    "a graph classifier's class out of range": ("graph", {"target": 3}, "target: must be 0..2 (a class), got 3"),
    "no pairs to a link predictor": ("link", {}, "pairs: 'tiny-link' is a link predictor; send the (u, v) pairs"),
    "node_ids to a link predictor": ("link", {"node_ids": [1]}, "node_ids: 'tiny-link' is a link predictor"),
    "pairs as INT32": ("link", {"pairs": np.zeros((2, 1), np.int32)}, "pairs: expected INT64 of shape [2, P]"),
    "too many pairs": ("link", {"pairs": np.zeros((2, 5), np.int64)}, "pairs: 5 pairs; the service explains at most 4"),
    "a pair out of range": ("link", {"pairs": np.array([[0], [30]])}, "pairs[1]: node 30 is out of range"),
    "pairs to a node classifier": ("node", {"node_ids": [0], "pairs": np.zeros((2, 1), np.int64)},
                                   "pairs: 'tiny-node' is a node classifier"),
    "no node_ids to a node classifier": ("node", {}, "node_ids: name at least one node"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_task_refuses_what_it_cannot_explain(store, case):
    task, fields, message = BAD[case]
    model, manifest = tiny(store, task)
    params = ExplainParams(graph=ring(30, np.random.default_rng(3)), **fields)
    with pytest.raises(InvalidArgumentError) as caught:
        resolve_query(model, manifest, params, None, LIMITS, QueryLimits())
    assert message in caught.value.message
