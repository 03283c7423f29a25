"""Dense network architectures, built from a config dict that the manifest records."""

from __future__ import annotations

import torch
from torch import nn

from shared.training import MLP

__all__ = ["MLP", "GRUForecaster", "SmallCNN"]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a 2x2 max-pool, then a linear layer; returns logits."""

    def __init__(
        self, channels: int = 16, out_features: int = 10, in_channels: int = 1, height: int = 8, width: int = 8
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * channels * (height // 2) * (width // 2), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class GRUForecaster(nn.Module):
    """A GRU over a [batch, steps, features] window; predicts the next value from the last state."""

    def __init__(self, in_features: int = 1, hidden: int = 32, out_features: int = 1) -> None:
        super().__init__()
        self.gru = nn.GRU(in_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.gru(x)
        return self.head(state[-1])
