"""Builds the default GNN: a GCN that labels the communities of Zachary's karate club."""

from __future__ import annotations

import logging

import numpy as np
import torch
from safetensors.torch import save
from sklearn.model_selection import train_test_split
from torch_geometric.datasets import KarateClub

from services.gnn.architectures import GCN
from shared.model_store import Manifest, ModelStore
from shared.training import classification_metrics, make_optimizer

log = logging.getLogger(__name__)

KARATE_GCN = "karate-gcn"
KARATE_GRAPH = "karate"


def karate_split(seed: int = 0):
    """The graph and a fixed stratified 50/50 split of its nodes into train and held-out."""
    data = KarateClub()[0]
    nodes = np.arange(data.num_nodes)
    train, test = train_test_split(nodes, test_size=0.5, stratify=data.y.numpy(), random_state=seed)
    return data, torch.as_tensor(train), torch.as_tensor(test)


def build_karate_gcn(store: ModelStore, seed: int = 0) -> Manifest:
    torch.manual_seed(seed)
    data, train, test = karate_split(seed)
    config = {
        "architecture": "gcn",
        "in_channels": data.num_features,
        "hidden": 16,
        "num_classes": int(data.y.max()) + 1,
        "num_layers": 2,
        "dropout": 0.5,
    }
    net = GCN(config["in_channels"], config["hidden"], config["num_classes"], config["num_layers"], config["dropout"])
    opt = make_optimizer("adam", net.parameters(), lr=0.01)
    for _ in range(200):
        net.train()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(data.x, data.edge_index)[train], data.y[train])
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        predicted = net(data.x, data.edge_index).argmax(dim=1)
    metrics = classification_metrics(data.y[test].numpy(), predicted[test].numpy())
    metrics["final_train_loss"] = loss.item()
    # In memory: the weights reach disk only as the store writes them (sealed, when it is encrypted).
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    graph = save({"node_features": data.x.contiguous(), "edge_index": data.edge_index.contiguous()})
    manifest = store.publish(
        {
            "name": KARATE_GCN,
            "family": "gnn",
            "framework": "torch",
            "inputs": [
                {"name": "node_features", "dtype": "FP32", "shape": [-1, config["in_channels"]]},
                {"name": "edge_index", "dtype": "INT64", "shape": [2, -1]},
                {"name": "edge_weight", "dtype": "FP32", "shape": [-1]},
            ],
            "outputs": [
                {"name": "probabilities", "dtype": "FP32", "shape": [-1, config["num_classes"]]},
                {"name": "label", "dtype": "INT64", "shape": [-1]},
            ],
            "metrics": metrics,
            "class_names": [f"community-{i}" for i in range(config["num_classes"])],
            "source": f"builtin:torch_geometric.datasets.KarateClub seed={seed} test_size=0.5",
            "description": "2-layer GCN; node features are one-hot node ids of the karate graph",
            "config": {
                **config,
                "weights_file": "weights.safetensors",
                "graphs": {KARATE_GRAPH: "graph-karate.safetensors"},
            },
        },
        {"weights.safetensors": weights, "graph-karate.safetensors": graph},
    )
    log.info("built %s v%d: %s", manifest.name, manifest.version, metrics)
    return manifest


# What `python -m services.defaults` builds for this family, in order.
DEFAULT_MODELS = {KARATE_GCN: build_karate_gcn}
