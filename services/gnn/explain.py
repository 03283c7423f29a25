"""Explanations of node predictions with torch_geometric.explain: which edges and node features matter.

The nodes' computation subgraph is cut out first (k_hop_subgraph, one hop more than the model
has layers, so every node that reaches them keeps its whole degree and the model computes on
the subgraph exactly what it computes on the whole graph), and the Explainer runs on it alone:
its cost follows the neighbourhood, not the graph. The masks come back over the whole input,
zero outside the subgraph, with the subgraph's edges and nodes named.

Methods: GNNExplainer (learned soft masks, seeded), or Captum's Integrated Gradients and
Saliency through torch_geometric.explain.algorithm.CaptumExplainer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch_geometric.explain import Explainer, ModelConfig
from torch_geometric.explain.algorithm import CaptumExplainer, GNNExplainer
from torch_geometric.utils import k_hop_subgraph

from shared.errors import InvalidArgumentError, NotFoundError
from shared.explanations import check_method, check_steps, checkpoint

GNN_EXPLAINER = "gnn_explainer"
INTEGRATED_GRADIENTS = "integrated_gradients"
SALIENCY = "saliency"
METHODS = (GNN_EXPLAINER, INTEGRATED_GRADIENTS, SALIENCY)
DEFAULT_EPOCHS = {GNN_EXPLAINER: 100, INTEGRATED_GRADIENTS: 32, SALIENCY: 0}


@dataclass(frozen=True)
class GnnExplainLimits:
    max_nodes: int = 64
    max_epochs: int = 1024


@dataclass
class GraphExplanation:
    method: str
    node_ids: list[int]
    edge_mask: np.ndarray
    node_feature_mask: np.ndarray
    subgraph_edge_ids: np.ndarray
    subgraph_node_ids: np.ndarray
    subgraph_edge_index: np.ndarray
    probabilities: np.ndarray


def _algorithm(method: str, epochs: int):
    if method == GNN_EXPLAINER:
        return GNNExplainer(epochs=epochs)
    if method == INTEGRATED_GRADIENTS:
        return CaptumExplainer("IntegratedGradients", n_steps=epochs)
    return CaptumExplainer("Saliency")


def explain_nodes(
    net: nn.Module,
    num_layers: int,
    node_features: np.ndarray,
    edge_index: np.ndarray,
    edge_weight: np.ndarray | None,
    node_ids: list[int],
    method: str,
    epochs: int,
    target: int | None,
    seed: int,
    limits: GnnExplainLimits,
    device: torch.device | None = None,
    num_classes: int | None = None,
    validate_only: bool = False,
) -> GraphExplanation | None:
    """Explains the predictions of `node_ids` (already checked to be in range) together; with
    `validate_only`, checks the request and returns None."""
    method = method or GNN_EXPLAINER
    check_method(method, METHODS)
    check_steps(epochs, limits.max_epochs, "epochs")
    epochs = epochs or DEFAULT_EPOCHS[method]
    if not node_ids:
        raise InvalidArgumentError("node_ids: name at least one node whose prediction to explain")
    if len(node_ids) > limits.max_nodes:
        raise InvalidArgumentError(f"node_ids: {len(node_ids)} nodes; the service explains at most {limits.max_nodes} "
                                   "per call (max_explain_rows)")  # fmt: skip
    if target is not None and num_classes is not None and not 0 <= target < num_classes:
        raise InvalidArgumentError(f"target: must be 0..{num_classes - 1} (a class), got {target}")
    if validate_only:
        return None
    device = device or torch.device("cpu")
    x = torch.as_tensor(np.array(node_features, dtype=np.float32), device=device)
    edges = torch.as_tensor(np.array(edge_index, dtype=np.int64), device=device)
    weight = None if edge_weight is None else torch.as_tensor(np.array(edge_weight, dtype=np.float32), device=device)
    nodes = torch.as_tensor(node_ids, dtype=torch.long, device=device)
    with torch.no_grad():
        probabilities = torch.softmax(net(x, edges, weight), dim=-1)[nodes]
    classes = probabilities.shape[1]
    if target is not None and not 0 <= target < classes:
        raise InvalidArgumentError(f"target: must be 0..{classes - 1} (a class), got {target}")

    subset, sub_edges, mapping, kept = k_hop_subgraph(nodes, num_layers + 1, edges, relabel_nodes=True,
                                                      num_nodes=x.shape[0])  # fmt: skip
    sub_weight = None if weight is None else weight[kept]
    explainer = Explainer(
        model=net,
        algorithm=_algorithm(method, epochs).to(device),
        explanation_type="phenomenon" if target is not None else "model",
        node_mask_type="attributes",
        edge_mask_type="object",
        model_config=ModelConfig(mode="multiclass_classification", task_level="node", return_type="raw"),
    )
    torch.manual_seed(seed)
    phenomenon = None
    if target is not None:
        phenomenon = torch.full((len(subset),), int(target), dtype=torch.long, device=device)
    # A checkpoint before every forward pass (each GNNExplainer epoch, each Captum step): a cancelled
    # explanation stops within one pass.
    hook = net.register_forward_pre_hook(lambda module, args: checkpoint())
    try:
        explanation = explainer(x[subset], sub_edges, target=phenomenon, index=mapping, edge_weight=sub_weight)
    finally:
        hook.remove()

    edge_ids = kept.nonzero().flatten()
    edge_mask = torch.zeros(edges.shape[1], device=device)
    edge_mask[edge_ids] = explanation.edge_mask.detach().abs()
    node_mask = torch.zeros_like(x)
    node_mask[subset] = explanation.node_mask.detach().abs()
    return GraphExplanation(
        method=method,
        node_ids=list(node_ids),
        edge_mask=edge_mask.cpu().numpy().astype(np.float32),
        node_feature_mask=node_mask.cpu().numpy().astype(np.float32),
        subgraph_edge_ids=edge_ids.cpu().numpy().astype(np.int64),
        subgraph_node_ids=subset.cpu().numpy().astype(np.int64),
        subgraph_edge_index=edges[:, edge_ids].cpu().numpy().astype(np.int64),
        probabilities=probabilities.cpu().numpy(),
    )


def check_node_task(manifest) -> None:
    """Explanations cover node classifiers; link predictors and graph classifiers are refused, saying so."""
    task = manifest.config.get("task", "node")
    if task != "node":
        raise InvalidArgumentError(f"model_name: {manifest.name!r} is a {task}-level model; Explain explains node "
                                   "classifiers' predictions only (node_ids)")  # fmt: skip


class GnnExplanations:
    """Explain for the gnn service: resolves the version and the graph as Predict does, then explains on a
    copy of the version's network (the Explainer sets masks inside the layers it runs, which Predict's
    network must never see)."""

    def __init__(self, repository, runner, limits: GnnExplainLimits, query_limits=None) -> None:
        from services.gnn.runtime import QueryLimits

        self.repository = repository
        self.runner = runner
        self.limits = limits
        self.query_limits = query_limits or QueryLimits()

    async def explain(self, name: str, version: int, graph, stored_graph: str, node_ids: list[int], method: str,
                      epochs: int, target: int | None, seed: int, deadline: float | None = None,
                      validate_only: bool = False):  # fmt: skip
        from services.gnn.runtime import check_graph, check_node_ids

        entry = self.repository.resolve(name, version)
        model = entry.predictor
        check_node_task(entry.manifest)
        if stored_graph:
            graph = model.graphs.get(stored_graph)
            if graph is None:
                raise NotFoundError(
                    f"stored_graph: {name!r} v{entry.manifest.version} has no graph {stored_graph!r}; "
                    f"it has {sorted(model.graphs)}"
                )
        elif graph is None:
            raise InvalidArgumentError("graph_source: send either graph or stored_graph")
        else:
            check_graph(graph, model.in_channels, self.query_limits)
        check_node_ids(np.asarray(node_ids, np.int64), graph.num_nodes)
        layers = entry.manifest.config["num_layers"]

        def run() -> GraphExplanation:
            return explain_nodes(copy.deepcopy(model.net), layers, graph.node_features, graph.edge_index,
                                 graph.edge_weight, node_ids, method, epochs, target, seed, self.limits,
                                 model.torch_device, entry.manifest.config["num_classes"], validate_only)  # fmt: skip

        explanation = await self.runner.run(run, deadline=deadline)
        return entry.manifest, explanation
