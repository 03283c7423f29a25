"""Graph network architectures, built from the config dict that the manifest records.

Tasks: "node" (a label per node), "link" (node embeddings whose dot product scores a pair) and
"graph" (a label per graph, from pooled node embeddings). Architectures: GCN, GraphSAGE (mean
aggregation: inductive, exact on sampled neighbourhoods that cover every neighbour), GAT and GIN,
the last three from torch_geometric's maintained models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch_geometric.nn import GCNConv, global_add_pool
from torch_geometric.nn.models import GAT, GIN, GraphSAGE

TASKS = ("node", "link", "graph")
ARCHITECTURES = ("gcn", "sage", "gat", "gin")


class GCN(nn.Module):
    """Kipf & Welling graph convolutions with ReLU and dropout between layers; returns logits."""

    def __init__(
        self, in_channels: int, hidden: int, num_classes: int, num_layers: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        widths = [in_channels] + [hidden] * (num_layers - 1) + [num_classes]
        self.convs = nn.ModuleList(GCNConv(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index, edge_weight)
            if i < len(self.convs) - 1:
                x = nn.functional.dropout(torch.relu(x), p=self.dropout, training=self.training)
        return x


class NodeNetwork(nn.Module):
    """A torch_geometric basic GNN whose forward takes (x, edge_index) only, as ONNX export wants."""

    def __init__(self, gnn: nn.Module) -> None:
        super().__init__()
        self.gnn = gnn

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None):
        return self.gnn(x, edge_index)


class GraphClassifier(nn.Module):
    """Node embeddings, summed per graph (GIN's readout), then a linear classifier."""

    def __init__(self, gnn: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.gnn = gnn
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None):
        return self.head(global_add_pool(self.gnn(x, edge_index), batch, num_graphs))


def _basic(architecture: str, in_channels: int, hidden: int, num_layers: int, out: int | None, dropout: float):
    if architecture == "sage":
        return GraphSAGE(in_channels, hidden, num_layers, out, dropout=dropout)
    if architecture == "gat":
        return GAT(in_channels, hidden, num_layers, out, dropout=dropout, heads=2, add_self_loops=True)
    if architecture == "gin":
        return GIN(in_channels, hidden, num_layers, out, dropout=dropout)
    raise ValueError(f"architecture {architecture!r} is not one of {ARCHITECTURES}")


def build_network(config: dict[str, Any]) -> nn.Module:
    """The untrained network a manifest's config describes."""
    task, architecture = config.get("task", "node"), config["architecture"]
    in_channels, hidden, layers = config["in_channels"], config["hidden"], config["num_layers"]
    dropout = config.get("dropout", 0.0)
    if task == "graph":
        return GraphClassifier(_basic(architecture, in_channels, hidden, layers, None, dropout), hidden,
                               config["num_classes"])  # fmt: skip
    out = config["num_classes"] if task == "node" else config["embedding_size"]
    if architecture == "gcn":
        return GCN(in_channels, hidden, out, layers, dropout)
    return NodeNetwork(_basic(architecture, in_channels, hidden, layers, out, dropout))
