"""Graph network architectures, built from the config dict that the manifest records."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv


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
