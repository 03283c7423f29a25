"""Training pieces every family shares: seeded mini-batch gradient descent, metrics and ONNX export."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error
from torch import nn

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
MULTILABEL = "multilabel"  # a task: any number of classes per example, each scored on its own


class MLP(nn.Module):
    """Fully connected layers with ReLU (and dropout) between them; returns logits. Dense models and
    text-classifier heads share it."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def train_minibatch_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
) -> float:
    """One shuffled pass over the data; the order depends only on (seed, epoch), so a resumed
    job replays exactly the epochs it would have run. Returns the mean loss."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(x), generator=generator)
    model.train()
    total = 0.0
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size].to(x.device)
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    model.eval()
    return total / len(x)


def loss_and_targets(task: str, targets: np.ndarray) -> tuple[Callable, torch.Tensor]:
    if task == "classification":
        return torch.nn.CrossEntropyLoss(), torch.as_tensor(targets, dtype=torch.long)
    if task == "regression":
        y = torch.as_tensor(targets, dtype=torch.float32)
        return torch.nn.MSELoss(), y.reshape(len(y), -1)
    if task == MULTILABEL:
        return torch.nn.BCEWithLogitsLoss(), torch.as_tensor(targets, dtype=torch.float32)
    raise ValueError(f"task must be classification, multilabel or regression, got {task!r}")


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
) -> list[float]:
    """Seeded mini-batch gradient descent; returns the mean training loss of each epoch."""
    x = torch.as_tensor(features, dtype=torch.float32)
    loss_fn, y = loss_and_targets(task, targets)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    return [train_minibatch_epoch(model, opt, loss_fn, x, y, batch_size, seed, epoch) for epoch in range(epochs)]


def run_epochs(
    context: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    train_epoch: Callable[[int], float],
    validate: Callable[[], dict[str, float]],
) -> list[float]:
    """The epoch loop of a training job: resumes from the job's checkpoint, checks for
    cancellation before each epoch, checkpoints after each, and reports loss, validation
    metrics and ETA."""
    start, losses = 0, []
    state = context.load_checkpoint()  # decrypted in memory when the stores are encrypted
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["epoch"]), [float(v) for v in state["losses"]]
        context.message(f"resumed from the checkpoint after epoch {start}")
    context.started = time.monotonic()  # the ETA counts epochs only, not data loading
    for epoch in range(start, epochs):
        context.raise_if_cancelled()
        losses.append(train_epoch(epoch))
        metrics = validate()
        context.save_checkpoint(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "losses": losses}
        )
        context.report_epoch(epoch + 1, epochs, losses[-1], metrics, start)
    return losses


def task_metrics(task: str, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """Held-out metrics from a model's raw outputs: logits for classification, values for regression."""
    if task == "classification":
        return classification_metrics(y_true, outputs.argmax(axis=-1))
    if task == MULTILABEL:
        return multilabel_metrics(y_true, outputs > 0)  # logit > 0: probability > 0.5
    return regression_metrics(np.asarray(y_true).reshape(len(y_true), -1), outputs)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
    }


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro-F1 over the labels (each label's F1, averaged), micro-F1, and the share of texts whose whole
    label set is right."""
    y_true, y_pred = np.asarray(y_true) > 0.5, np.asarray(y_pred).astype(bool)
    return {
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "exact_match": float(np.mean(np.all(y_true == y_pred, axis=1))),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    mse = float(mean_squared_error(y_true, y_pred))
    return {"mse": mse, "rmse": mse**0.5}


class Standardize(torch.nn.Module):
    """(x - mean) / std with the training set's statistics, baked into the exported graph."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ExportableMultiLabel(torch.nn.Module):
    """Wraps a logits model so the exported graph returns each label's probability (sigmoid) and the
    multi-hot labels (probability > 0.5), as INT64."""

    def __init__(self, logits_model: torch.nn.Module) -> None:
        super().__init__()
        self.logits_model = logits_model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.sigmoid(self.logits_model(x))
        return probabilities, (probabilities > 0.5).to(torch.int64)


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


def export_onnx_bytes(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """TorchScript-based export (opset 17): fast, and needs no onnxscript. In memory, so the weights reach
    disk only sealed by the model store."""
    module.eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            example_inputs,
            buffer,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()
