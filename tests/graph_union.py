"""Small graphs as Open Inference takes them for graph classification."""

from __future__ import annotations

import numpy as np


def graph_union(graphs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small graphs as one disjoint union (node_features, shifted edge_index, graph_ids), as OIP takes them."""
    offsets = np.cumsum([0] + [x.shape[0] for x, _, _ in graphs[:-1]])
    features = np.concatenate([x for x, _, _ in graphs])
    edges = np.concatenate([e + offset for (_, e, _), offset in zip(graphs, offsets, strict=True)], axis=1)
    ids = np.repeat(np.arange(len(graphs), dtype=np.int64), [x.shape[0] for x, _, _ in graphs])
    return features, edges, ids
