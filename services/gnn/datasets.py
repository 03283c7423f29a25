"""Graph data sets for the gnn trainer: parsers of uploaded graphs, and the built-in ones."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.datasets import labels_or_targets, load_npz, parse_with
from shared.errors import InvalidArgumentError


@dataclass
class GraphData:
    node_features: np.ndarray
    edge_index: np.ndarray
    labels: np.ndarray
    train_mask: np.ndarray | None
    task: str = "classification"
    class_names: list[str] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return len(self.labels)


def graph(node_features: Any, edge_index: Any, labels: Any, train_mask: Any, where: str) -> GraphData:
    try:
        x = np.asarray(node_features, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{where}: 'node_features' must be an N x F list of numbers") from None
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidArgumentError(f"{where}: 'node_features' must be N x F with N > 0, got shape {list(x.shape)}")
    try:
        edges = np.asarray(edge_index, dtype=np.int64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{where}: 'edge_index' must be two lists of node ids") from None
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise InvalidArgumentError(f"{where}: 'edge_index' must be 2 x E, got shape {list(edges.shape)}")
    if edges.size and (edges.min() < 0 or edges.max() >= len(x)):
        bad = int(edges.min() if edges.min() < 0 else edges.max())
        raise InvalidArgumentError(f"{where}: 'edge_index' names node {bad}, but there are {len(x)} nodes")
    y = np.asarray(labels)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgumentError(f"{where}: 'labels' must be {len(x)} integers, one per node")
    y, _, classes = labels_or_targets(y, f"{where}: 'labels'")
    mask = None
    if train_mask is not None:
        mask = np.asarray(train_mask, dtype=bool)
        if mask.shape != (len(x),) or not mask.any() or mask.all():
            raise InvalidArgumentError(f"{where}: 'train_mask' must be {len(x)} booleans with both true and false")
    return GraphData(x, edges, y, mask, class_names=classes)


@dataclass
class GraphSetData:
    """Many small graphs, one label each: a graph classification data set."""

    graphs: list[tuple[np.ndarray, np.ndarray]]  # (node_features, edge_index) per graph
    labels: np.ndarray
    task: str = "classification"
    class_names: list[str] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def node_features(self) -> np.ndarray:
        """The first graph's features: their width is every graph's."""
        return self.graphs[0][0]


MOTIF_DEGREE_CAP = 9


def degree_features(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """The motif classifier's node features: one-hot in-degree, capped at MOTIF_DEGREE_CAP."""
    degree = np.minimum(np.bincount(edge_index[1], minlength=num_nodes), MOTIF_DEGREE_CAP)
    return np.eye(MOTIF_DEGREE_CAP + 1, dtype=np.float32)[degree]


def motif_graphs(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """BA-2Motifs: 20-node Barabási–Albert graphs with a house (label 0) or a 5-cycle (label 1)
    attached, from torch_geometric's graph and motif generators: (features, edge_index, label)."""
    return [(x, edges, label) for x, edges, label, _ in motif_graphs_with_truth(count, seed)]


def motif_graphs_with_truth(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """As motif_graphs, each with the generator's ground truth: a bool per edge, true on the motif's edges."""
    import torch

    torch.manual_seed(seed)
    # barabasi_albert_graph draws with numpy's global generator too: seeded here (and put back after), so the
    # same seed gives the same graphs in every process.
    numpy_state = np.random.get_state()
    np.random.seed(seed)
    try:
        return _motif_graphs(count)
    finally:
        np.random.set_state(numpy_state)


def _motif_graphs(count: int) -> list[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    from torch_geometric.datasets import ExplainerDataset
    from torch_geometric.datasets.graph_generator import BAGraph
    from torch_geometric.datasets.motif_generator import CycleMotif, HouseMotif

    graphs = []
    for i in range(count):
        label = i % 2
        motif = HouseMotif() if label == 0 else CycleMotif(5)
        data = ExplainerDataset(BAGraph(num_nodes=20, num_edges=1), motif, num_motifs=1)[0]
        edges = data.edge_index.numpy().astype(np.int64)
        graphs.append((degree_features(edges, data.num_nodes), edges, label, data.edge_mask.numpy().astype(bool)))
    return graphs


MAX_INTERACTION_NODES = 5_000_000


def interactions(user_ids: Any, item_ids: Any, item_features: Any, where: str, item_texts: Any = None):
    """A user-item interaction set (a recommender's data): each (user_ids[k], item_ids[k]) one interaction, in
    order (each user's last one is held out); users and items are numbered from 0 on their own. Optional
    item_features: one content vector per item (I x D; rows of zeros for items without one), or item_texts (json):
    one text per item, which the trainer embeds with the nlp service."""
    from services.gnn.recommend import leave_last_out

    try:
        users, items = np.asarray(user_ids), np.asarray(item_ids)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{where}: 'user_ids' and 'item_ids' must be lists of integers") from None
    for name, ids in (("user_ids", users), ("item_ids", items)):
        if ids.ndim != 1 or not ids.size or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgumentError(f"{where}: {name!r} must be a non-empty list of integers, got {ids.dtype} "
                                       f"of shape {list(ids.shape)}")  # fmt: skip
        if ids.min() < 0 or ids.max() >= MAX_INTERACTION_NODES:
            raise InvalidArgumentError(f"{where}: {name!r} holds {int(ids.min() if ids.min() < 0 else ids.max())}; "
                                       f"ids are 0..{MAX_INTERACTION_NODES - 1}")  # fmt: skip
    if users.shape != items.shape:
        raise InvalidArgumentError(f"{where}: 'user_ids' has {users.size} entries and 'item_ids' {items.size}; "
                                   "one of each per interaction")  # fmt: skip
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    features = None
    if item_features is not None:
        try:
            features = np.asarray(item_features, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{where}: 'item_features' must be an I x D list of numbers") from None
        if features.ndim != 2 or features.shape[0] < num_items or not np.isfinite(features).all():
            raise InvalidArgumentError(f"{where}: 'item_features' must be finite, I x D with I >= {num_items} (one "
                                       f"row per item), got shape {list(features.shape)}")  # fmt: skip
        num_items = features.shape[0]
    texts = None
    if item_texts is not None and features is None:
        if not isinstance(item_texts, list) or len(item_texts) < num_items or not all(
            isinstance(text, str) and text.strip() for text in item_texts
        ):
            raise InvalidArgumentError(f"{where}: 'item_texts' must be a list of at least {num_items} non-empty "
                                       "strings, one per item")  # fmt: skip
        texts, num_items = list(item_texts), len(item_texts)
    data = leave_last_out(users, items, num_users, num_items, features)
    data.item_texts = texts
    return data


def parse_json(data: bytes) -> GraphData:
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"json: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise InvalidArgumentError("json: expected an object with node_features, edge_index and labels")
    if "user_ids" in record or "item_ids" in record:
        return interactions(record.get("user_ids"), record.get("item_ids"), record.get("item_features"), "json",
                            record.get("item_texts"))  # fmt: skip
    for key in ("node_features", "edge_index", "labels"):
        if key not in record:
            raise InvalidArgumentError(f"json: missing field {key!r}")
    return graph(record["node_features"], record["edge_index"], record["labels"], record.get("train_mask"), "json")


def parse_npz(data: bytes) -> GraphData:
    arrays = load_npz(data)
    if "user_ids" in arrays or "item_ids" in arrays:
        return interactions(arrays.get("user_ids"), arrays.get("item_ids"), arrays.get("item_features"), "npz")
    for key in ("node_features", "edge_index", "labels"):
        if key not in arrays:
            raise InvalidArgumentError(f"npz: missing array {key!r}; it has {sorted(arrays)}")
    return graph(arrays["node_features"], arrays["edge_index"], arrays["labels"], arrays.get("train_mask"), "npz")


PARSERS = {"json": parse_json, "npz": parse_npz}


def parse(fmt: str, data: bytes) -> GraphData:
    return parse_with(PARSERS, "gnn", fmt, data)


def describe(parsed) -> dict:
    if not isinstance(parsed, GraphData | GraphSetData):  # interactions: one "feature" per node, for the size check
        return {"num_examples": parsed.num_examples, "feature_shape": [parsed.num_users + parsed.num_items],
                "task": "ranking", "class_names": []}  # fmt: skip
    return {"num_examples": parsed.num_examples, "feature_shape": [parsed.node_features.shape[1]],
            "task": parsed.task, "class_names": parsed.class_names}  # fmt: skip


def load_builtin(name: str):
    if name == "interactions":
        from services.gnn.recommend import planted_interactions

        return planted_interactions(seed=0)
    if name == "sbm":
        from services.gnn.generators import block_model_graph

        sbm = block_model_graph(2000, seed=0)
        edges = np.concatenate([sbm.edge_index, sbm.edge_index[::-1]], axis=1)
        return graph(sbm.node_features, edges, sbm.labels, None, "sbm")
    if name == "motifs":
        graphs = motif_graphs(400, seed=0)
        return GraphSetData([(x, e) for x, e, _ in graphs], np.array([y for *_, y in graphs]),
                            class_names=["house", "cycle"])  # fmt: skip
    if name != "karate":
        raise InvalidArgumentError(f"builtin_dataset: {name!r} is not a built-in gnn data set")
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    return graph(data.x.numpy(), data.edge_index.numpy(), data.y.numpy(), None, "karate")
