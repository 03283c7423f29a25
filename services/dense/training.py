"""Training jobs for dense models: MLP, CNN or GRU on tabular, image or sequence data, exported to ONNX."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from services.dense import torch_form
from services.dense.datasets import ColumnFilter, TabularData, parse
from shared.data_parallel import NetworkRecipe, ShardedFit
from shared.drift import REFERENCE_FILE, reference_bytes
from shared.errors import InvalidArgumentError
from shared.job_splits import TEST_SHARE, fit_and_evaluate, split_indices
from shared.training import (
    ExportableClassifier,
    export_onnx_bytes,
    loss_and_targets,
    make_optimizer,
    task_metrics,
    train_minibatch_epoch,
)
from shared.training_worker import JobContext, JobResult


def network_form(spec: dict, shape: list[int], outputs: int, task: str, masked: list[int] | None = None) -> dict:
    """The torch form (services.dense.torch_form) of the network a job trains."""
    form = {"architecture": spec["architecture"], "input_shape": shape, "hidden_sizes": spec["hidden_sizes"],
            "outputs": outputs, "task": task, "standardize": True}  # fmt: skip
    if masked:
        form["masked"] = list(masked)
    return form


def build_network(
    spec: dict, shape: list[int], outputs: int, mean: np.ndarray, std: np.ndarray, masked: list[int] | None = None,
    task: str = "classification",
) -> nn.Module:
    """The network a job trains, built from its torch form, with the training set's statistics."""
    net = torch_form.build_net(network_form(spec, shape, outputs, task, masked))
    standardize = net[1] if masked else net[0]
    standardize.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    standardize.std.copy_(torch.as_tensor(std, dtype=torch.float32))
    return net


class Regressor(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def check_fit(architecture: str, shape: list[int]) -> None:
    """An architecture that cannot take the data set's examples fails the job at once, saying why."""
    if architecture == "cnn" and len(shape) != 3:
        raise InvalidArgumentError(f"architecture: cnn needs image-shaped examples [C, H, W], the data has {shape}")
    if architecture == "gru" and len(shape) != 2:
        raise InvalidArgumentError(f"architecture: gru needs sequences [T, F], the data has {shape}")


def job_data(context: JobContext) -> TabularData:
    """The job's data set; a CSV with columns to drop or mask is parsed here with them, so those cells are
    never read as data (and the data set's recorded description, which no one job's columns shape, stays)."""
    columns = ColumnFilter.from_spec(context.spec)
    if not columns:
        return context.dataset()
    if not context.spec.get("dataset_id"):
        raise InvalidArgumentError("drop_columns, mask_columns: apply to an uploaded CSV data set, not a built-in one")
    meta, raw = context.datasets.read(context.spec["dataset_id"], context.data.max_bytes)
    parsed = parse(meta["format"], raw, columns)
    context.heartbeat.beat()
    return parsed


def run_job(context: JobContext) -> JobResult:
    spec = context.spec
    data = job_data(context)
    check_fit(spec["architecture"], list(data.x.shape[1:]))
    torch.manual_seed(spec["seed"])
    classification = data.task == "classification"
    labels = data.y if classification else None
    outputs = len(data.class_names) if classification else 1
    shape = list(data.x.shape[1:])
    context.check_size(shape, outputs, len(data.x))
    device = context.device
    x_all = torch.as_tensor(data.x).to(device)
    loss_fn, y_all = loss_and_targets(data.task, data.y)
    y_all = y_all.to(device)

    form = network_form(spec, shape, outputs, data.task, data.masked_features)
    rest, test = split_indices(len(data.x), labels, TEST_SHARE, spec["seed"])
    mean, std = data.x[rest].mean(axis=0), data.x[rest].std(axis=0) + 1e-6

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        net = build_network(spec, shape, outputs, mean, std, data.masked_features, data.task).to(device)
        return net, make_optimizer(spec["optimizer"], net.parameters(), spec["learning_rate"])

    def evaluate(net: nn.Module, idx: np.ndarray) -> dict[str, float]:
        with torch.no_grad():
            return task_metrics(data.task, data.y[idx], net(x_all[idx]).cpu().numpy())

    def epoch_fn(net, opt, idx):
        return lambda epoch: train_minibatch_epoch(
            net, opt, loss_fn, x_all[idx], y_all[idx], spec["batch_size"], spec["seed"], epoch
        )

    # Data-parallel workers rebuild the network from its torch form; the trainer's initial weights carry the statistics.
    sharded = ShardedFit(NetworkRecipe("services.dense.torch_form:build_net", {"form": form}), x_all, y_all, data.y,
                         data.task)  # fmt: skip
    net, metrics = fit_and_evaluate(context, len(data.x), labels, rest, test, fresh, epoch_fn, evaluate, sharded)

    net = net.cpu()
    exportable = ExportableClassifier(net) if classification else Regressor(net)
    output_specs = (
        [
            {"name": "probabilities", "dtype": "FP32", "shape": [-1, outputs]},
            {"name": "label", "dtype": "INT64", "shape": [-1]},
        ]
        if classification
        else [{"name": "prediction", "dtype": "FP32", "shape": [-1, 1]}]
    )
    names = [o["name"] for o in output_specs]
    # In memory: the graph reaches disk only sealed by the model store.
    onnx_bytes = export_onnx_bytes(
        exportable,
        (torch.zeros(1, *shape),),
        input_names=["x"],
        output_names=names,
        dynamic_axes={name: {0: "batch"} for name in ["x", *names]},
    )
    torch_files, torch_config = torch_form.save(net, form)
    record = {
        "family": "dense",
        "framework": "onnx",
        "inputs": [{"name": "x", "dtype": "FP32", "shape": [-1, *shape]}],
        "outputs": output_specs,
        "metrics": metrics,
        "class_names": data.class_names,
        "description": f"{spec['architecture']} {spec['hidden_sizes']} trained on {context.dataset_name()}",
        "config": {
            "architecture": spec["architecture"],
            "hidden_sizes": spec["hidden_sizes"],
            "onnx_file": "model.onnx",
            "task": data.task,
            "job": context.job_id,
            "spec": spec,
            "drift_reference": REFERENCE_FILE,
            **torch_config,
        },  # fmt: skip
    }
    context.message("evaluated; writing the version", state="EVALUATING")
    reference = reference_bytes(data.x[rest], spec["seed"])  # training inputs as callers send them, for drift checks
    return context.publish(record, {"model.onnx": onnx_bytes, **torch_files, REFERENCE_FILE: reference}, data.task)
