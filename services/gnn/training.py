"""Training jobs for graph models: a GCN that labels nodes, on an uploaded or built-in graph."""

from __future__ import annotations

import re

import numpy as np
import torch
from safetensors.torch import save

from services.gnn.architectures import GCN
from shared.job_splits import TEST_SHARE, fit_and_evaluate, split_indices
from shared.training import make_optimizer, task_metrics
from shared.training_worker import JobContext, JobResult


def run_job(context: JobContext) -> JobResult:
    spec = context.spec
    graph = context.dataset()
    context.check_size([graph.node_features.shape[1]], len(graph.class_names), len(graph.labels))
    torch.manual_seed(spec["seed"])
    device = context.device
    x = torch.as_tensor(graph.node_features).to(device)
    edges = torch.as_tensor(graph.edge_index).to(device)
    y = torch.as_tensor(graph.labels).to(device)
    classes = len(graph.class_names)
    hidden = spec["hidden_sizes"]
    n = len(graph.labels)
    if graph.train_mask is not None:
        rest, test = np.flatnonzero(graph.train_mask), np.flatnonzero(~graph.train_mask)
    else:
        rest, test = split_indices(n, graph.labels, TEST_SHARE, spec["seed"])

    def fresh():
        net = GCN(x.shape[1], hidden[0], classes, num_layers=len(hidden) + 1, dropout=0.5).to(device)
        return net, make_optimizer(spec["optimizer"], net.parameters(), spec["learning_rate"])

    def epoch_fn(net, opt, idx):
        index = torch.as_tensor(idx, device=device)

        def step(epoch: int) -> float:
            net.train()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x, edges)[index], y[index])
            loss.backward()
            opt.step()
            net.eval()
            return loss.item()

        return step

    def evaluate(net, idx) -> dict[str, float]:
        with torch.no_grad():
            return task_metrics("classification", graph.labels[idx], net(x, edges)[torch.as_tensor(idx)].cpu().numpy())

    net, metrics = fit_and_evaluate(context, n, graph.labels, rest, test, fresh, epoch_fn, evaluate)

    graph_name = re.sub(r"[^a-z0-9_-]", "-", context.dataset_name().lower()) or "train"
    graph_file = f"graph-{graph_name}.safetensors"
    config = {"architecture": "gcn", "in_channels": int(x.shape[1]), "hidden": hidden[0], "num_classes": classes,
              "num_layers": len(hidden) + 1, "dropout": 0.5, "weights_file": "weights.safetensors",
              "graphs": {graph_name: graph_file}, "job": context.job_id, "spec": spec}  # fmt: skip
    # In memory: weights and graph reach disk only sealed by the model store.
    weights = save({k: v.cpu().contiguous() for k, v in net.state_dict().items()})
    stored = save({"node_features": x.cpu().contiguous(), "edge_index": edges.cpu().contiguous()})
    record = {
        "family": "gnn",
        "framework": "torch",
        "inputs": [
            {"name": "node_features", "dtype": "FP32", "shape": [-1, int(x.shape[1])]},
            {"name": "edge_index", "dtype": "INT64", "shape": [2, -1]},
            {"name": "edge_weight", "dtype": "FP32", "shape": [-1]},
        ],
        "outputs": [
            {"name": "probabilities", "dtype": "FP32", "shape": [-1, classes]},
            {"name": "label", "dtype": "INT64", "shape": [-1]},
        ],
        "metrics": metrics,
        "class_names": graph.class_names,
        "description": f"GCN {hidden} trained on {context.dataset_name()}; stored graph {graph_name!r}",
        "config": config,
    }
    context.message("evaluated; writing the version", state="EVALUATING")
    return context.publish(record, {"weights.safetensors": weights, graph_file: stored}, "classification")
