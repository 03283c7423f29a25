"""GNN inference, independent of gRPC: validate the graph, run the GCN off the loop, pick nodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load

from services.gnn.architectures import GCN
from shared.errors import InvalidArgumentError, NotFoundError
from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Artifacts, Manifest


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # Arrays decoded from a request are read-only views of its bytes; torch wants writable memory.
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(device)


@dataclass
class GraphInput:
    node_features: np.ndarray
    edge_index: np.ndarray
    edge_weight: np.ndarray | None = None

    @property
    def num_nodes(self) -> int:
        return self.node_features.shape[0]


class GcnModel:
    """A GCN version loaded from safetensors weights and its architecture config (no pickle)."""

    def __init__(self, manifest: Manifest, artifacts: Artifacts, device: torch.device) -> None:
        config = manifest.config
        self.torch_device = device
        self.device = str(device)
        self.in_channels = config["in_channels"]
        self.net = GCN(
            config["in_channels"], config["hidden"], config["num_classes"], config["num_layers"], config["dropout"]
        )
        self.net.load_state_dict(load(artifacts.read(config["weights_file"])))
        self.net.to(self.torch_device).eval()
        self.graphs = {
            name: GraphInput(tensors["node_features"].numpy(), tensors["edge_index"].numpy())
            for name, file in config.get("graphs", {}).items()
            for tensors in [load(artifacts.read(file))]
        }

    def warm_up(self, max_batch_size: int = 1) -> None:
        graph = next(iter(self.graphs.values()), None) or GraphInput(
            np.zeros((2, self.in_channels), np.float32), np.array([[0], [1]], np.int64)
        )
        self.predict(graph)

    def predict(self, graph: GraphInput) -> np.ndarray:
        """Class probabilities for every node of the graph."""
        with torch.inference_mode():
            x = _tensor(graph.node_features, self.torch_device)
            edges = _tensor(graph.edge_index, self.torch_device)
            weight = None if graph.edge_weight is None else _tensor(graph.edge_weight, self.torch_device)
            return torch.softmax(self.net(x, edges, weight), dim=-1).cpu().numpy()

    def item_size(self, graph: GraphInput) -> int:
        return graph.num_nodes

    def run_batch(self, graphs: list[GraphInput]) -> list[np.ndarray]:
        """Runs the graphs as one disjoint union and splits the node rows back per graph.

        Graphs share no edges in the union, so each gets exactly what it would alone; a graph
        several requests name (a stored one) is run once.
        """
        unique = list({id(graph): graph for graph in graphs}.values())
        if len(unique) == 1:
            probabilities = self.predict(unique[0])
            return [probabilities for _ in graphs]
        union, offsets = disjoint_union(unique)
        probabilities = self.predict(union)
        rows = {
            id(graph): probabilities[start : start + graph.num_nodes]
            for graph, start in zip(unique, offsets, strict=True)
        }
        return [rows[id(graph)] for graph in graphs]


def disjoint_union(graphs: list[GraphInput]) -> tuple[GraphInput, list[int]]:
    """One graph holding all of them, node ids shifted by each graph's offset."""
    offsets = np.cumsum([0] + [graph.num_nodes for graph in graphs[:-1]]).tolist()
    weighted = any(graph.edge_weight is not None for graph in graphs)
    union = GraphInput(
        node_features=np.concatenate([graph.node_features for graph in graphs]),
        edge_index=np.concatenate(
            [graph.edge_index + offset for graph, offset in zip(graphs, offsets, strict=True)], axis=1
        ),
        edge_weight=np.concatenate(
            [
                graph.edge_weight if graph.edge_weight is not None else np.ones(graph.edge_index.shape[1], np.float32)
                for graph in graphs
            ]
        )
        if weighted
        else None,
    )
    return union, offsets


def gcn_loader(device: torch.device):
    def load(manifest: Manifest, artifacts: Artifacts) -> GcnModel:
        return GcnModel(manifest, artifacts, device)

    return load


def check_graph(graph: GraphInput, in_channels: int) -> None:
    x, edges, weight = graph.node_features, graph.edge_index, graph.edge_weight
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != in_channels:
        raise InvalidArgumentError(
            f"graph.node_features: expected FP32 of shape [N, {in_channels}], got {x.dtype} of shape {list(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InvalidArgumentError("graph.node_features: the graph has no nodes")
    if edges.dtype != np.int64 or edges.ndim != 2 or edges.shape[0] != 2:
        raise InvalidArgumentError(
            f"graph.edge_index: expected INT64 of shape [2, E], got {edges.dtype} of shape {list(edges.shape)}"
        )
    if edges.size and (edges.min() < 0 or edges.max() >= graph.num_nodes):
        bad = int(edges.min() if edges.min() < 0 else edges.max())
        raise InvalidArgumentError(
            f"graph.edge_index: node index {bad} is out of range for a graph of {graph.num_nodes} nodes "
            f"(valid: 0..{graph.num_nodes - 1})"
        )
    if weight is not None and (weight.dtype != np.float32 or weight.shape != (edges.shape[1],)):
        raise InvalidArgumentError(
            f"graph.edge_weight: expected FP32 of shape [{edges.shape[1]}] (one per edge), "
            f"got {weight.dtype} of shape {list(weight.shape)}"
        )


def check_node_ids(node_ids: list[int], num_nodes: int) -> None:
    for i, node in enumerate(node_ids):
        if not 0 <= node < num_nodes:
            raise InvalidArgumentError(
                f"node_ids[{i}]: node {node} is out of range for a graph of {num_nodes} nodes "
                f"(valid: 0..{num_nodes - 1})"
            )


class GnnRuntime:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def predict(
        self,
        name: str,
        version: int,
        graph: GraphInput | None,
        stored_graph: str,
        node_ids: list[int],
        deadline: float | None = None,
    ) -> tuple[Prediction, list[int]]:
        entry = self.repository.resolve(name, version)
        model: GcnModel = entry.predictor
        if stored_graph:
            graph = model.graphs.get(stored_graph)
            if graph is None:
                raise NotFoundError(
                    f"stored_graph: {name!r} v{entry.manifest.version} has no graph {stored_graph!r}; "
                    f"it has {sorted(model.graphs)}"
                )
        elif graph is None:
            raise InvalidArgumentError("graph_source: send either graph or stored_graph")
        else:
            check_graph(graph, model.in_channels)
        check_node_ids(node_ids, graph.num_nodes)
        probabilities = await entry.batcher.submit(graph, deadline)
        rows = node_ids or list(range(graph.num_nodes))
        selected = probabilities[rows]
        outputs = {"probabilities": selected, "label": selected.argmax(axis=1).astype(np.int64)}
        return Prediction(entry.manifest, outputs), rows
