"""Builds the default dense model: an MLP that classifies the scikit-learn digits (8x8 images)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from services.dense.architectures import MLP
from shared.model_store import Manifest, ModelStore
from shared.training import ExportableClassifier, classification_metrics, export_onnx, fit_classifier

log = logging.getLogger(__name__)

DIGITS_MLP = "digits-mlp"
# Digits pixels run 0..16; the exported graph divides by this, so clients send raw pixels.
PIXEL_MAX = 16.0


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed 80/20 stratified split that training and the tests share."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def build_digits_mlp(store: ModelStore, seed: int = 0) -> Manifest:
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = digits_split(seed)
    config = {"architecture": "mlp", "in_features": 64, "hidden": [128, 64], "out_features": 10}
    net = MLP(config["in_features"], config["hidden"], config["out_features"], dropout=0.1)
    losses = fit_classifier(
        net, x_train / PIXEL_MAX, y_train, optimizer="adam", lr=2e-3, epochs=40, batch_size=64, seed=seed
    )
    exportable = ExportableClassifier(net, input_scale=1.0 / PIXEL_MAX)
    with torch.no_grad():
        _, predicted = exportable(torch.as_tensor(x_test))
    metrics = classification_metrics(y_test, predicted.numpy())
    metrics["final_train_loss"] = losses[-1]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(
            exportable,
            (torch.zeros(1, 64),),
            Path(tmp) / "model.onnx",
            input_names=["pixels"],
            output_names=["probabilities", "label"],
            dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}, "label": {0: "batch"}},
        )
        manifest = store.publish(
            {
                "name": DIGITS_MLP,
                "family": "dense",
                "framework": "onnx",
                "inputs": [{"name": "pixels", "dtype": "FP32", "shape": [-1, 64]}],
                "outputs": [
                    {"name": "probabilities", "dtype": "FP32", "shape": [-1, 10]},
                    {"name": "label", "dtype": "INT64", "shape": [-1]},
                ],
                "metrics": metrics,
                "class_names": [str(digit) for digit in range(10)],
                "source": f"builtin:sklearn.load_digits seed={seed} test_size=0.2",
                "description": "MLP 64-128-64-10 on 8x8 digit images; send raw pixels (0..16)",
                "config": {**config, "onnx_file": "model.onnx", "optimizer": "adam", "epochs": 40},
            },
            {"model.onnx": onnx_path},
        )
    log.info("built %s v%d: %s", manifest.name, manifest.version, metrics)
    return manifest
