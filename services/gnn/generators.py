"""Synthetic graphs for the default models and the benchmarks, generated offline in seconds.

torch_geometric's `stochastic_blockmodel_graph` enumerates every pair of nodes (O(N^2): 5e9 pairs
for 100k nodes), so the stochastic block model here draws each node's edges directly, in O(E).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockModelGraph:
    edge_index: np.ndarray  # 2 x E, each undirected edge once
    node_features: np.ndarray  # N x F, FP32
    labels: np.ndarray  # N, the block of each node


def block_model_graph(
    num_nodes: int,
    num_blocks: int = 4,
    intra_degree: float = 8.0,
    inter_degree: float = 2.0,
    num_features: int = 16,
    noise: float = 2.0,
    seed: int = 0,
) -> BlockModelGraph:
    """A stochastic block model graph with Gaussian node features around a centroid per block.

    Each node draws Poisson(intra_degree / 2) edges to random nodes of its own block and
    Poisson(inter_degree / 2) to random nodes anywhere, so the average degree is about
    intra_degree + inter_degree. `noise` makes one node's own features a weak clue to its block,
    so a model must aggregate its neighbourhood. The centroids depend on `seed` only, so graphs
    of different sizes from one seed share them: a model trained on a small graph serves a big one.
    """
    centroids = np.random.default_rng(seed).normal(size=(num_blocks, num_features)).astype(np.float32)
    rng = np.random.default_rng([seed, num_nodes])
    labels = np.empty(num_nodes, np.int64)
    order = rng.permutation(num_nodes)
    labels[order] = np.arange(num_nodes) % num_blocks
    members = [order[b::num_blocks] for b in range(num_blocks)]
    sizes = np.array([len(m) for m in members])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    by_block = np.concatenate(members)

    intra = rng.poisson(intra_degree / 2, num_nodes)
    sources = np.repeat(np.arange(num_nodes, dtype=np.int64), intra)
    block = labels[sources]
    targets = by_block[starts[block] + (rng.random(len(sources)) * sizes[block]).astype(np.int64)]
    inter = rng.poisson(inter_degree / 2, num_nodes)
    noise_sources = np.repeat(np.arange(num_nodes, dtype=np.int64), inter)
    noise_targets = rng.integers(0, num_nodes, len(noise_sources))
    edges = np.stack([np.concatenate([sources, noise_sources]), np.concatenate([targets, noise_targets])])
    edges = edges[:, edges[0] != edges[1]]

    features = centroids[labels] + rng.normal(scale=noise, size=(num_nodes, num_features)).astype(np.float32)
    return BlockModelGraph(edges, features.astype(np.float32), labels)
