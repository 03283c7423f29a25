"""Builds the default dense models: an MLP and a CNN on the digits images, and a GRU forecaster."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.dense import torch_form
from services.dense.datasets import PIXEL_MAX, SINE_WINDOW, digits_split, held_out, sine_windows
from shared.drift import REFERENCE_FILE, reference_bytes
from shared.model_store import Manifest, ModelStore
from shared.training import ExportableClassifier, classification_metrics, export_onnx_bytes, fit, regression_metrics

log = logging.getLogger(__name__)

DIGITS_MLP = "digits-mlp"
DIGITS_CNN = "digits-cnn"
SINE_GRU = "sine-gru"

CLASS_OUTPUTS = [
    {"name": "probabilities", "dtype": "FP32", "shape": [-1, 10]},
    {"name": "label", "dtype": "INT64", "shape": [-1]},
]


def publish_onnx(
    store: ModelStore,
    module: torch.nn.Module,
    example: torch.Tensor,
    record: dict[str, Any],
    net: torch.nn.Module,
    form: dict[str, Any],
    reference: np.ndarray | None = None,
) -> Manifest:
    """Exports `module` (one input, batch-first) to ONNX, in memory, and publishes it as the next version,
    with `net`'s weights beside it as the version's torch form (for gradient explanations), and a sample of
    `reference` (training inputs, as callers send them) for drift checks."""
    input_name = record["inputs"][0]["name"]
    output_names = [output["name"] for output in record["outputs"]]
    onnx_model = export_onnx_bytes(
        module,
        (example,),
        input_names=[input_name],
        output_names=output_names,
        dynamic_axes={name: {0: "batch"} for name in [input_name, *output_names]},
    )
    torch_files, torch_config = torch_form.save(net, form)
    record = {**record, "family": "dense", "framework": "onnx"}
    record["config"] = {**record["config"], "onnx_file": "model.onnx", **torch_config}
    files = {"model.onnx": onnx_model, **torch_files}
    if reference is not None:
        files[REFERENCE_FILE] = reference_bytes(reference)
        record["config"]["drift_reference"] = REFERENCE_FILE
    manifest = store.publish(record, files)
    log.info("built %s v%d: %s", manifest.name, manifest.version, manifest.metrics)
    return manifest


def build_digits_mlp(store: ModelStore, seed: int = 0) -> Manifest:
    torch.manual_seed(seed)
    x_train, _, y_train, _ = digits_split(seed)
    arch = {"architecture": "mlp", "in_features": 64, "hidden": [128, 64], "out_features": 10}
    form = {"architecture": "mlp", "input_shape": [64], "hidden_sizes": arch["hidden"], "outputs": 10,
            "task": "classification", "input_scale": 1.0 / PIXEL_MAX, "dropout": 0.1}  # fmt: skip
    net = torch_form.build_net(form)
    losses = fit(net, x_train / PIXEL_MAX, y_train, optimizer="adam", lr=2e-3, epochs=40, batch_size=64, seed=seed)
    exportable = ExportableClassifier(net, input_scale=1.0 / PIXEL_MAX)
    return publish_onnx(
        store,
        exportable,
        torch.zeros(1, 64),
        {
            "name": DIGITS_MLP,
            "inputs": [{"name": "pixels", "dtype": "FP32", "shape": [-1, 64]}],
            "outputs": CLASS_OUTPUTS,
            "metrics": {**evaluate_classifier(exportable, "sklearn.digits"), "final_train_loss": losses[-1]},
            "class_names": [str(digit) for digit in range(10)],
            "source": f"builtin:sklearn.load_digits seed={seed} test_size=0.2",
            "description": "MLP 64-128-64-10 on 8x8 digit images; send raw pixels (0..16)",
            "config": {**arch, "dataset": "sklearn.digits", "optimizer": "adam", "epochs": 40},
        },
        net,
        form,
        x_train,  # raw pixels, as callers send them
    )


def build_digits_cnn(store: ModelStore, seed: int = 0) -> Manifest:
    torch.manual_seed(seed)
    x_train, _, y_train, _ = digits_split(seed)
    arch = {"architecture": "cnn", "channels": 16, "out_features": 10}
    form = {"architecture": "cnn", "input_shape": [1, 8, 8], "hidden_sizes": [arch["channels"]], "outputs": 10,
            "task": "classification", "input_scale": 1.0 / PIXEL_MAX}  # fmt: skip
    net = torch_form.build_net(form)
    images = x_train.reshape(-1, 1, 8, 8) / PIXEL_MAX
    losses = fit(net, images, y_train, optimizer="adam", lr=2e-3, epochs=15, batch_size=64, seed=seed)
    exportable = ExportableClassifier(net, input_scale=1.0 / PIXEL_MAX)
    return publish_onnx(
        store,
        exportable,
        torch.zeros(1, 1, 8, 8),
        {
            "name": DIGITS_CNN,
            "inputs": [{"name": "image", "dtype": "FP32", "shape": [-1, 1, 8, 8]}],
            "outputs": CLASS_OUTPUTS,
            "metrics": {**evaluate_classifier(exportable, "sklearn.digits.images"), "final_train_loss": losses[-1]},
            "class_names": [str(digit) for digit in range(10)],
            "source": f"builtin:sklearn.load_digits seed={seed} test_size=0.2",
            "description": "CNN (2 conv layers, max-pool) on 1x8x8 digit images; send raw pixels (0..16)",
            "config": {**arch, "dataset": "sklearn.digits.images", "optimizer": "adam", "epochs": 15},
        },
        net,
        form,
        x_train.reshape(-1, 1, 8, 8),
    )


def build_sine_gru(store: ModelStore, seed: int = 0) -> Manifest:
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = sine_windows(seed)
    arch = {"architecture": "gru", "in_features": 1, "hidden": 32, "out_features": 1}
    form = {"architecture": "gru", "input_shape": [SINE_WINDOW, 1], "hidden_sizes": [arch["hidden"]], "outputs": 1,
            "task": "regression"}  # fmt: skip
    net = torch_form.build_net(form)
    losses = fit(
        net, x_train, y_train, task="regression", optimizer="adam", lr=1e-2, epochs=8, batch_size=64, seed=seed
    )
    with torch.no_grad():
        predicted = net(torch.as_tensor(x_test)).numpy()
    metrics = regression_metrics(y_test, predicted)
    # What repeating the last value would score: the forecaster should beat it.
    metrics["baseline_last_value_mse"] = regression_metrics(y_test, x_test[:, -1, :])["mse"]
    metrics["final_train_loss"] = losses[-1]
    return publish_onnx(
        store,
        net,
        torch.zeros(1, SINE_WINDOW, 1),
        {
            "name": SINE_GRU,
            "inputs": [{"name": "window", "dtype": "FP32", "shape": [-1, SINE_WINDOW, 1]}],
            "outputs": [{"name": "forecast", "dtype": "FP32", "shape": [-1, 1]}],
            "metrics": metrics,
            "source": f"generated:two sine waves (periods 24, 7) + noise, seed={seed}, last 20% held out",
            "description": f"GRU forecaster: the next value from the last {SINE_WINDOW} steps",
            "config": {**arch, "dataset": "generated.sine", "optimizer": "adam", "epochs": 8},
        },
        net,
        form,
        x_train,
    )


def evaluate_classifier(exportable: ExportableClassifier, dataset: str) -> dict[str, float]:
    x_test, y_test = held_out(dataset)
    with torch.no_grad():
        _, predicted = exportable(torch.as_tensor(x_test))
    return classification_metrics(y_test, predicted.numpy())


def evaluate_onnx(model: bytes | Path, dataset: str, input_name: str) -> dict[str, float]:
    """Held-out metrics of an exported model (its bytes), as served (used for quantized versions)."""
    from shared.onnx_session import OnnxConfig, OnnxSession

    x_test, y_test = held_out(dataset)
    outputs = OnnxSession(model, OnnxConfig(device="cpu")).run({input_name: x_test})
    if "label" in outputs:
        return classification_metrics(y_test, outputs["label"])
    return regression_metrics(y_test, np.asarray(next(iter(outputs.values()))))


# What `python -m services.defaults` builds for this family, in order.
DEFAULT_MODELS = {DIGITS_MLP: build_digits_mlp, DIGITS_CNN: build_digits_cnn, SINE_GRU: build_sine_gru}
