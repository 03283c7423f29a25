"""Training jobs for graph models: GCN, GraphSAGE, GAT or GIN node classifiers on an uploaded or
built-in graph, and graph classifiers (GraphSAGE, GAT or GIN, sum readout) on a built-in set of
small graphs. Every version records its held-out metrics and its ONNX export, or why it failed."""

from __future__ import annotations

import re

import numpy as np
import torch
from safetensors.torch import save

from services.gnn.architectures import build_network
from services.gnn.datasets import GraphData, GraphSetData
from services.gnn.defaults import graph_classifier_signature, node_classifier_signature
from services.gnn.export import model_files
from shared.errors import InvalidArgumentError
from shared.job_splits import TEST_SHARE, fit_and_evaluate, split_indices
from shared.training import make_optimizer, task_metrics
from shared.training_worker import JobContext, JobResult


def network_config(spec: dict, task: str, in_channels: int, classes: int) -> dict:
    hidden = spec["hidden_sizes"]
    return {"task": task, "architecture": spec["architecture"], "in_channels": int(in_channels), "hidden": hidden[0],
            "num_classes": classes, "num_layers": len(hidden) + 1,
            "dropout": 0.5 if spec["architecture"] == "gcn" else 0.0}  # fmt: skip


def run_job(context: JobContext) -> JobResult:
    data = context.dataset()
    torch.manual_seed(context.spec["seed"])
    if isinstance(data, GraphSetData):
        return _graph_job(context, data)
    return _node_job(context, data)


def _node_job(context: JobContext, graph: GraphData) -> JobResult:
    spec = context.spec
    context.check_size([graph.node_features.shape[1]], len(graph.class_names), len(graph.labels))
    device = context.device
    x = torch.as_tensor(graph.node_features).to(device)
    edges = torch.as_tensor(graph.edge_index).to(device)
    y = torch.as_tensor(graph.labels).to(device)
    classes = len(graph.class_names)
    n = len(graph.labels)
    if graph.train_mask is not None:
        rest, test = np.flatnonzero(graph.train_mask), np.flatnonzero(~graph.train_mask)
    else:
        rest, test = split_indices(n, graph.labels, TEST_SHARE, spec["seed"])
    config = network_config(spec, "node", x.shape[1], classes)

    def fresh():
        net = build_network(config).to(device)
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
    config.update({"graphs": {graph_name: graph_file}, "job": context.job_id, "spec": spec})
    # In memory: weights and graph reach disk only sealed by the model store.
    files = model_files(net.cpu(), config)
    stored = save({"node_features": x.cpu().contiguous(), "edge_index": edges.cpu().contiguous()})
    record = {
        "family": "gnn",
        "framework": "torch",
        **node_classifier_signature(int(x.shape[1]), classes),
        "metrics": metrics,
        "class_names": graph.class_names,
        "description": f"{spec['architecture']} {spec['hidden_sizes']} node classifier trained on "
        f"{context.dataset_name()}; stored graph {graph_name!r}",
        "config": config,
    }
    context.message("evaluated; writing the version", state="EVALUATING")
    return context.publish(record, {**files, graph_file: stored}, "classification")


def _graph_job(context: JobContext, data: GraphSetData) -> JobResult:
    from torch_geometric.data import Batch, Data

    spec = context.spec
    if spec["architecture"] == "gcn":
        raise InvalidArgumentError("architecture: graph classification takes sage, gat or gin (a GCN has no readout)")
    width = data.node_features.shape[1]
    classes = len(data.class_names)
    context.check_size([width], classes, len(data.labels))
    device = context.device
    examples = [Data(x=torch.as_tensor(x), edge_index=torch.as_tensor(e), y=torch.tensor([int(label)]))
                for (x, e), label in zip(data.graphs, data.labels, strict=True)]  # fmt: skip
    config = network_config(spec, "graph", width, classes)
    n = len(examples)
    rest, test = split_indices(n, data.labels, TEST_SHARE, spec["seed"])

    def batch_of(idx) -> Batch:
        return Batch.from_data_list([examples[i] for i in idx]).to(device)

    def fresh():
        net = build_network(config).to(device)
        return net, make_optimizer(spec["optimizer"], net.parameters(), spec["learning_rate"])

    def epoch_fn(net, opt, idx):
        generator = torch.Generator().manual_seed(spec["seed"])

        def step(epoch: int) -> float:
            net.train()
            losses = []
            for chunk in torch.as_tensor(idx)[torch.randperm(len(idx), generator=generator)].split(spec["batch_size"]):
                batch = batch_of(chunk.tolist())
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(batch.x, batch.edge_index, batch.batch, batch.num_graphs),
                                                         batch.y)  # fmt: skip
                loss.backward()
                opt.step()
                losses.append(loss.item())
            net.eval()
            return float(np.mean(losses))

        return step

    def evaluate(net, idx) -> dict[str, float]:
        batch = batch_of(idx)
        with torch.no_grad():
            logits = net(batch.x, batch.edge_index, batch.batch, batch.num_graphs)
        return task_metrics("classification", data.labels[idx], logits.cpu().numpy())

    net, metrics = fit_and_evaluate(context, n, data.labels, rest, test, fresh, epoch_fn, evaluate)
    config.update({"job": context.job_id, "spec": spec})
    files = model_files(net.cpu(), config)
    record = {
        "family": "gnn",
        "framework": "torch",
        **graph_classifier_signature(width, classes),
        "metrics": metrics,
        "class_names": data.class_names,
        "description": f"{spec['architecture']} {spec['hidden_sizes']} graph classifier trained on "
        f"{context.dataset_name()}; call ClassifyGraphs",
        "config": config,
    }
    context.message("evaluated; writing the version", state="EVALUATING")
    return context.publish(record, files, "classification")
