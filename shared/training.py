"""Training pieces every family shares: seeded mini-batch gradient descent, metrics and ONNX export."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def fit(
    model: torch.nn.Module,
    features: np.ndarray,
    targets: np.ndarray,
    *,
    task: str = "classification",
    optimizer: str = "adam",
    lr: float = 1e-3,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Seeded mini-batch gradient descent: cross-entropy for classification, MSE for regression.

    Returns the mean training loss of each epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    if task == "classification":
        y, loss_fn = torch.as_tensor(targets, dtype=torch.long), torch.nn.CrossEntropyLoss()
    elif task == "regression":
        y, loss_fn = torch.as_tensor(targets, dtype=torch.float32), torch.nn.MSELoss()
    else:
        raise ValueError(f"task must be classification or regression, got {task!r}")
    opt = make_optimizer(optimizer, model.parameters(), lr)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    mse = float(mean_squared_error(y_true, y_pred))
    return {"mse": mse, "rmse": mse**0.5}


class ExportableClassifier(torch.nn.Module):
    """Wraps a logits model with its input scaling, so the exported graph takes raw features
    and returns both class probabilities and the label."""

    def __init__(self, logits_model: torch.nn.Module, input_scale: float = 1.0) -> None:
        super().__init__()
        self.logits_model = logits_model
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.logits_model(x * self.input_scale), dim=-1)
        return probabilities, probabilities.argmax(dim=-1)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """TorchScript-based export (opset 17): fast, and needs no onnxscript."""
    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            example_inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )
    return path
