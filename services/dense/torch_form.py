"""The torch form of a dense version: safetensors weights beside its ONNX graph, and the config that
rebuilds the network, so gradient methods (Integrated Gradients) can run on exactly what was exported.

A form is a small dict the manifest records under config["torch_form"]:
  architecture   "mlp", "cnn" or "gru"
  input_shape    one example's shape, e.g. [64] or [1, 8, 8]
  hidden_sizes   the architecture's widths
  outputs        classes (classification) or values (regression)
  task           "classification" or "regression"
  input_scale    what raw inputs are multiplied by before the network (digits: 1/16)
  standardize    whether the network starts with the training set's (x - mean) / std
  dropout        the MLP's dropout (no weights; kept so the same module is rebuilt)
  masked         feature columns a job masked (multiplied by 0 before anything else)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from safetensors.torch import load
from safetensors.torch import save as save_bytes
from torch import nn

from services.dense.architectures import MLP, GRUForecaster, SmallCNN
from shared.model_store import Artifacts, Manifest
from shared.training import Standardize

TORCH_FILE = "weights.safetensors"


class ZeroColumns(nn.Module):
    """Multiplies a job's masked feature columns by 0: whatever a caller sends there is ignored."""

    def __init__(self, width: int, masked: list[int]) -> None:
        super().__init__()
        keep = torch.ones(width)
        keep[masked] = 0.0
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


def build_net(form: dict[str, Any]) -> nn.Module:
    """The logits (classifiers) or values (regressors) network a form describes, untrained."""
    shape, hidden, outputs = list(form["input_shape"]), list(form["hidden_sizes"]), int(form["outputs"])
    architecture = form["architecture"]
    if architecture == "mlp":
        core: nn.Module = nn.Sequential(nn.Flatten(), MLP(math.prod(shape), hidden, outputs, form.get("dropout", 0.0)))
    elif architecture == "cnn":
        channels, height, width = shape
        core = SmallCNN(hidden[0], outputs, channels, height, width)
    elif architecture == "gru":
        core = GRUForecaster(shape[-1], hidden[0], outputs)
    else:
        raise ValueError(f"no torch form for architecture {architecture!r}")
    layers: list[nn.Module] = []
    if form.get("masked"):
        layers.append(ZeroColumns(shape[-1], list(form["masked"])))
    if form.get("standardize"):
        layers.append(Standardize(np.zeros(shape, np.float32), np.ones(shape, np.float32)))
    return nn.Sequential(*layers, core)


class ScoredNet(nn.Module):
    """What the ONNX graph computes, as one differentiable function: class probabilities or values."""

    def __init__(self, net: nn.Module, form: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.input_scale = float(form.get("input_scale", 1.0))
        self.classification = form["task"] == "classification"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x * self.input_scale)
        return torch.softmax(out, dim=-1) if self.classification else out


def save(net: nn.Module, form: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The weights, in memory (the store seals what it writes); returns (artifacts to publish, config
    entries for the manifest)."""
    weights = save_bytes({name: value.detach().cpu().contiguous() for name, value in net.state_dict().items()})
    return {TORCH_FILE: weights}, {"torch_file": TORCH_FILE, "torch_form": form}


def has_torch_form(manifest: Manifest) -> bool:
    return bool(manifest.config.get("torch_form")) and manifest.config.get("torch_file") in manifest.files


def load_scored(manifest: Manifest, artifacts: Artifacts) -> ScoredNet | None:
    """The version's torch form (checked against its sha256 like every artifact), or None without one."""
    if not has_torch_form(manifest):
        return None
    form = manifest.config["torch_form"]
    net = build_net(form)
    net.load_state_dict(load(artifacts.read(manifest.config["torch_file"])))
    return ScoredNet(net, form).eval()
