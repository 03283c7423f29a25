"""The CSR neighbourhood sampler and the graph store: exact when fan-outs cover every neighbour,
bounded by the fan-outs otherwise, and updates that make new versions and leave old ones alone."""

import numpy as np
import pytest
import torch

from services.gnn.architectures import build_network
from services.gnn.generators import block_model_graph
from services.gnn.graph_store import GraphStore
from services.gnn.sampling import (
    NeighbourhoodTooLarge,
    csr_add_edges,
    csr_edge_index,
    csr_from_edges,
    sample_neighbourhood,
)
from shared.errors import FailedPreconditionError, InvalidArgumentError
from shared.model_store import ModelStore


@pytest.fixture(scope="module")
def graph():
    g = block_model_graph(3000, seed=3)
    indptr, indices = csr_from_edges(np.concatenate([g.edge_index, g.edge_index[::-1]], axis=1), 3000)
    return g, indptr, indices


@pytest.mark.parametrize("architecture", ["sage", "gat"])
def test_full_fan_outs_give_exactly_the_full_graph_answer(graph, architecture):
    g, indptr, indices = graph
    torch.manual_seed(0)
    net = build_network({"architecture": architecture, "in_channels": 16, "hidden": 8, "num_classes": 4,
                         "num_layers": 2}).eval()  # fmt: skip
    with torch.no_grad():
        full = net(torch.as_tensor(g.node_features), torch.as_tensor(csr_edge_index(indptr, indices)))
        seeds = np.array([7, 2999, 7, 0])
        sub = sample_neighbourhood(indptr, indices, seeds, [-1, -1])
        local = net(torch.as_tensor(g.node_features[sub.nodes]), torch.as_tensor(sub.edge_index))
    assert sub.num_nodes < 3000
    np.testing.assert_allclose(local[sub.seed_positions].numpy(), full[seeds].numpy(), rtol=1e-5, atol=1e-6)


def test_fan_outs_bound_each_hop_with_distinct_real_neighbours(graph):
    _, indptr, indices = graph
    sub = sample_neighbourhood(indptr, indices, np.arange(20), [3, 2], np.random.default_rng(0))
    assert sub.num_nodes <= 20 * (1 + 3 + 6)
    sources, targets = sub.nodes[sub.edge_index[0]], sub.nodes[sub.edge_index[1]]
    for target in np.unique(targets):
        picked = sources[targets == target]
        assert len(picked) == len(set(picked.tolist())) <= 3
        assert set(picked.tolist()) <= set(indices[indptr[target] : indptr[target + 1]].tolist())


def test_a_neighbourhood_over_the_limit_stops_early(graph):
    _, indptr, indices = graph
    with pytest.raises(NeighbourhoodTooLarge):
        sample_neighbourhood(indptr, indices, np.arange(10), [-1, -1, -1], max_nodes=100)


def test_adding_edges_in_place_equals_rebuilding(graph):
    _, indptr, indices = graph
    new = np.array([[0, 3000, 3001, 5, 3001], [3000, 3001, 3, 3001, 0]])
    merged_indptr, merged = csr_add_edges(indptr, indices, new, 3002)
    ref_indptr, ref = csr_from_edges(np.concatenate([csr_edge_index(indptr, indices), new], axis=1), 3002)
    np.testing.assert_array_equal(merged_indptr, ref_indptr)
    for v in range(3002):
        assert sorted(merged[merged_indptr[v] : merged_indptr[v + 1]]) == sorted(ref[ref_indptr[v] : ref_indptr[v + 1]])


def test_graph_store_versions_are_memory_mapped_and_updates_leave_old_ones_alone(tmp_path):
    store = GraphStore(ModelStore(tmp_path))
    edges = np.array([[0, 1], [1, 2]])
    first = store.publish_edges("g", edges, np.ones((3, 2), np.float32), undirected=True)
    assert isinstance(first.indices, np.memmap) and first.num_edges == 4
    second = store.update("g", 1, np.full((1, 2), 5, np.float32), np.array([[3], [0]]))
    assert (second.version, second.num_nodes, second.num_edges) == (2, 4, 6)
    assert sorted(second.indices[second.indptr[0] : second.indptr[1]].tolist()) == [1, 3]
    old = store.open("g", 1)
    assert (old.num_nodes, old.num_edges) == (3, 4) and store.open("g").version == 2
    with pytest.raises(FailedPreconditionError, match="base_version"):
        store.update("g", 1, np.zeros((0, 2), np.float32), np.array([[0], [2]]))
    with pytest.raises(InvalidArgumentError, match="node 9 does not exist"):
        store.update("g", 0, np.zeros((0, 2), np.float32), np.array([[0], [9]]))
    assert store.store.versions("g") == [1, 2]


def test_an_encrypted_store_seals_graphs_and_opens_them_in_memory(tmp_path):
    from shared.keyring import Keyring, create_kek

    create_kek(tmp_path / "keys", "a")
    store = GraphStore(ModelStore(tmp_path / "models", Keyring(tmp_path / "keys", "a")))
    features = np.arange(6, dtype=np.float32).reshape(3, 2) + 1000.5
    store.publish_edges("g", np.array([[0, 1], [1, 2]]), features, undirected=True)
    on_disk = (store.store.version_dir("g", 1) / "node_features.npy").read_bytes()
    assert features.tobytes() not in on_disk
    opened = GraphStore(ModelStore(tmp_path / "models", Keyring(tmp_path / "keys", "a"))).open("g")
    assert not isinstance(opened.node_features, np.memmap)
    np.testing.assert_array_equal(opened.node_features, features)
    updated = store.update("g", 1, np.ones((1, 2), np.float32), np.array([[3], [0]]))
    assert updated.num_nodes == 4 and store.open("g", 1).num_nodes == 3
