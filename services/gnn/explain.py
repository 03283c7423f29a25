"""Explanations of GNN predictions with torch_geometric.explain: which edges and node features matter.

Every task is explained on the computation subgraph of what it predicts, and the Explainer runs on
it alone, so its cost follows the neighbourhood, not the graph:
- node classifiers: the nodes' k_hop_subgraph (one hop more than the model has layers, so every
  node that reaches them keeps its whole degree and the model computes on the subgraph exactly
  what it computes on the whole graph), ModelConfig(task_level="node");
- link predictors: the same around the pairs' endpoints, the pairs passed to the model as
  edge_label_index, ModelConfig(mode="binary_classification", task_level="edge");
- graph classifiers: the whole (one, inline) graph, ModelConfig(task_level="graph").
On an inline graph (or one stored with the model) the masks come back over the whole input, zero
outside the subgraph; on a graph-store graph, the subgraph is the neighbourhood the same query
samples for Predict (runtime.query_neighbourhood), and the masks cover it alone, with its nodes'
global ids: a stored graph of millions of nodes never yields a mask of its size.

Methods: GNNExplainer (learned soft masks, seeded), or Captum's Integrated Gradients and
Saliency through torch_geometric.explain.algorithm.CaptumExplainer; the default is GNNExplainer for
node classifiers, Saliency for link predictors and graph classifiers (DEFAULT_METHODS).

The rpc and the explanation job share the two steps: `resolve_query` (checks, graph, sampling)
and `explain_query` (the computation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch_geometric.explain import Explainer, ModelConfig
from torch_geometric.explain.algorithm import CaptumExplainer, GNNExplainer
from torch_geometric.utils import k_hop_subgraph

from services.gnn.graph_store import GraphStore
from services.gnn.runtime import (
    GnnModel,
    GraphInput,
    QueryLimits,
    check_node_ids,
    inline_or_embedded,
    open_stored_graph,
    query_neighbourhood,
)
from shared.errors import InvalidArgumentError
from shared.explanations import check_method, check_steps, checkpoint
from shared.model_store import Manifest

GNN_EXPLAINER = "gnn_explainer"
INTEGRATED_GRADIENTS = "integrated_gradients"
SALIENCY = "saliency"
METHODS = (GNN_EXPLAINER, INTEGRATED_GRADIENTS, SALIENCY)
DEFAULT_EPOCHS = {GNN_EXPLAINER: 100, INTEGRATED_GRADIENTS: 32, SALIENCY: 0}
# Each task's default method, as measured in tests/e2e/test_explain.py. Graph classifiers: on motif-gin's
# held-out house graphs Saliency's edge masks scored a ROC-AUC of 0.97 against the motif, GNNExplainer's
# 0.66-0.91, changing with the thread count its optimisation ran on. Link predictors: deleting the 8 edges
# Saliency ranks first moved lesmis-links' explained outcome by 0.17, GNNExplainer's 0.03, random ones 0.
DEFAULT_METHODS = {"node": GNN_EXPLAINER, "link": SALIENCY, "graph": SALIENCY}


@dataclass(frozen=True)
class GnnExplainLimits:
    max_nodes: int = 64  # node_ids, or pairs, per call
    max_epochs: int = 1024


@dataclass
class ExplainParams:
    """An Explain request, as the runtime reads it."""

    graph: GraphInput | None = None
    stored_graph: str = ""
    node_ids: list[int] = field(default_factory=list)
    pairs: np.ndarray | None = None
    method: str = ""
    epochs: int = 0
    target: int | None = None
    seed: int = 0
    graph_version: int = 0
    fan_outs: list[int] = field(default_factory=list)


@dataclass
class ExplainQuery:
    """What an explanation runs on, checked: a graph, and in its local ids the nodes or pairs explained."""

    task: str
    graph: GraphInput
    node_ids: np.ndarray  # local ids of the nodes explained (node classifiers)
    pairs: np.ndarray  # 2 x P local ids of the pairs explained (link predictors)
    requested_node_ids: list[int]
    # A graph-store graph: its version, and the sampled subgraph's global node ids.
    graph_version: int = 0
    global_nodes: np.ndarray | None = None


@dataclass
class GraphExplanation:
    method: str
    node_ids: list[int]
    edge_mask: np.ndarray
    node_feature_mask: np.ndarray
    subgraph_edge_ids: np.ndarray
    subgraph_node_ids: np.ndarray
    subgraph_edge_index: np.ndarray
    outputs: dict[str, np.ndarray]
    graph_version: int = 0


class LinkScores(nn.Module):
    """A link predictor's encoder as the Explainer calls it: the probability of each pair's link."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, edge_index, edge_label_index, edge_weight=None):
        z = self.net(x, edge_index, edge_weight)
        return torch.sigmoid((z[edge_label_index[0]] * z[edge_label_index[1]]).sum(-1))


class OneGraph(nn.Module):
    """A graph classifier as the Explainer calls it, on one graph: (x, edge_index) -> 1 x C logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, edge_index):
        return self.net(x, edge_index, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 1)


def _algorithm(method: str, epochs: int):
    if method == GNN_EXPLAINER:
        return GNNExplainer(epochs=epochs)
    if method == INTEGRATED_GRADIENTS:
        return CaptumExplainer("IntegratedGradients", n_steps=epochs)
    return CaptumExplainer("Saliency")


def _check_method(task: str, params: ExplainParams, limits: GnnExplainLimits) -> tuple[str, int]:
    method = params.method or DEFAULT_METHODS[task]
    check_method(method, METHODS)
    check_steps(params.epochs, limits.max_epochs, "epochs")
    return method, params.epochs or DEFAULT_EPOCHS[method]


def _check_what(task: str, name: str, params: ExplainParams, limits: GnnExplainLimits, classes: int | None) -> None:
    """node_ids, pairs and target as the model's task wants them, before any graph is read."""
    pairs = params.pairs
    if task == "graph":
        if params.node_ids:
            raise InvalidArgumentError(f"node_ids: {name!r} is a graph classifier; Explain explains the label of the "
                                       "whole graph, so leave node_ids empty")  # fmt: skip
        if pairs is not None:
            raise InvalidArgumentError(f"pairs: {name!r} is a graph classifier; pairs are for link predictors")
    elif task == "link":
        if params.node_ids:
            raise InvalidArgumentError(f"node_ids: {name!r} is a link predictor; name the (u, v) links to explain in "
                                       "pairs instead")  # fmt: skip
        if pairs is None or pairs.size == 0:
            raise InvalidArgumentError(f"pairs: {name!r} is a link predictor; send the (u, v) pairs whose scores to "
                                       "explain, as INT64 of shape [2, P]")  # fmt: skip
        if pairs.dtype != np.int64 or pairs.ndim != 2 or pairs.shape[0] != 2:
            raise InvalidArgumentError(
                f"pairs: expected INT64 of shape [2, P], got {pairs.dtype} of shape {list(pairs.shape)}"
            )
        if pairs.shape[1] > limits.max_nodes:
            raise InvalidArgumentError(f"pairs: {pairs.shape[1]} pairs; the service explains at most "
                                       f"{limits.max_nodes} per call (max_explain_rows)")  # fmt: skip
    else:
        if pairs is not None:
            raise InvalidArgumentError(f"pairs: {name!r} is a node classifier; pairs are for link predictors")
        if not params.node_ids:
            raise InvalidArgumentError("node_ids: name at least one node whose prediction to explain")
        if len(params.node_ids) > limits.max_nodes:
            raise InvalidArgumentError(f"node_ids: {len(params.node_ids)} nodes; the service explains at most "
                                       f"{limits.max_nodes} per call (max_explain_rows)")  # fmt: skip
    if params.target is not None:
        if task == "link" and params.target not in (0, 1):
            raise InvalidArgumentError(f"target: for a link predictor 1 (why a link) or 0 (why none), got "
                                       f"{params.target}")  # fmt: skip
        if task != "link" and classes is not None and not 0 <= params.target < classes:
            raise InvalidArgumentError(f"target: must be 0..{classes - 1} (a class), got {params.target}")


def resolve_query(
    model: GnnModel, manifest: Manifest, params: ExplainParams, graph_store: GraphStore | None,
    limits: GnnExplainLimits, query_limits: QueryLimits,
) -> ExplainQuery:  # fmt: skip
    """Checks an Explain request against the version and finds the graph it runs on: inline, stored
    with the model, or sampled from the graph store as the same Predict query would. Blocking."""
    task = manifest.config.get("task", "node")
    _check_method(task, params, limits)
    _check_what(task, manifest.name, params, limits, manifest.config.get("num_classes"))
    asked = np.asarray(params.node_ids, np.int64)
    pairs = params.pairs if task == "link" else np.zeros((2, 0), np.int64)
    if params.stored_graph and params.stored_graph not in model.graphs:
        if task == "graph":
            raise InvalidArgumentError(f"stored_graph: {manifest.name!r} is a graph classifier; send the graph to "
                                       "explain inline (graph)")  # fmt: skip
        if graph_store is None:
            raise InvalidArgumentError(f"stored_graph: this service has no graph store to find "
                                       f"{params.stored_graph!r} in")  # fmt: skip
        stored = open_stored_graph(graph_store, model, params.stored_graph, params.graph_version)
        seeds = asked if task == "node" else pairs.reshape(-1)
        check_node_ids(seeds, stored.num_nodes, "node_ids" if task == "node" else "pairs")
        sub, positions, nodes = query_neighbourhood(model, stored, seeds, params.fan_outs, query_limits)
        local_nodes = positions if task == "node" else np.zeros(0, np.int64)
        local_pairs = positions.reshape(2, -1) if task == "link" else np.zeros((2, 0), np.int64)
        return ExplainQuery(task, sub, local_nodes, local_pairs, list(params.node_ids), stored.version, nodes)
    graph = inline_or_embedded(manifest, model, params.graph, params.stored_graph, params.graph_version,
                               params.fan_outs, query_limits)  # fmt: skip
    check_node_ids(asked, graph.num_nodes)
    check_node_ids(pairs.reshape(-1), graph.num_nodes, "pairs")
    return ExplainQuery(task, graph, asked, pairs, list(params.node_ids))


def _config(task: str) -> ModelConfig:
    if task == "link":
        return ModelConfig(mode="binary_classification", task_level="edge", return_type="probs")
    return ModelConfig(mode="multiclass_classification", task_level=task, return_type="raw")


@dataclass
class _Setup:
    """One task's Explainer inputs: the model as the Explainer calls it, the subgraph it runs on (`subset`
    of the nodes, `kept` of the edges, relabelled as `sub_edges`) and the prediction explained."""

    model: nn.Module
    subset: torch.Tensor
    sub_edges: torch.Tensor
    kept: torch.Tensor
    outputs: dict[str, torch.Tensor]
    targets: int  # rows a phenomenon's target needs
    index: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)


def _whole_graph(net: nn.Module, x: torch.Tensor, edges: torch.Tensor) -> _Setup:
    model = OneGraph(net)
    with torch.no_grad():
        probabilities = torch.softmax(model(x, edges), dim=-1)
    everything = torch.ones(edges.shape[1], dtype=torch.bool, device=x.device)
    return _Setup(model, torch.arange(x.shape[0], device=x.device), edges, everything,
                  {"probabilities": probabilities, "label": probabilities.argmax(dim=1)}, 1)  # fmt: skip


def _computation_subgraph(net: nn.Module, layers: int, query: ExplainQuery, x: torch.Tensor, edges: torch.Tensor,
                          weight: torch.Tensor | None, target: int | None) -> _Setup:  # fmt: skip
    device = x.device
    if query.task == "link":
        pairs = torch.as_tensor(np.array(query.pairs, np.int64), device=device)
        seeds = pairs.reshape(-1)
    else:
        seeds = torch.as_tensor(np.array(query.node_ids, np.int64), device=device)
    subset, sub_edges, mapping, kept = k_hop_subgraph(seeds, layers + 1, edges, relabel_nodes=True,
                                                      num_nodes=x.shape[0])  # fmt: skip
    kwargs = {"edge_weight": None if weight is None else weight[kept]}
    if query.task == "link":
        model = LinkScores(net)
        with torch.no_grad():
            outputs = {"scores": model(x, edges, pairs, weight)}
        kwargs = {"edge_label_index": mapping.reshape(2, -1), **kwargs}  # positional order, for Captum
        index = torch.arange(pairs.shape[1], device=device)
        return _Setup(model, subset, sub_edges, kept, outputs, pairs.shape[1], index, kwargs)
    with torch.no_grad():
        probabilities = torch.softmax(net(x, edges, weight), dim=-1)[seeds]
    if target is not None and not 0 <= target < probabilities.shape[1]:
        raise InvalidArgumentError(f"target: must be 0..{probabilities.shape[1] - 1} (a class), got {target}")
    outputs = {"probabilities": probabilities, "label": probabilities.argmax(dim=1)}
    return _Setup(net, subset, sub_edges, kept, outputs, len(subset), mapping, kwargs)


def explain_query(
    net: nn.Module, manifest: Manifest, query: ExplainQuery, params: ExplainParams, limits: GnnExplainLimits,
    device: torch.device | None = None,
) -> GraphExplanation:  # fmt: skip
    """Runs the Explainer for a resolved query. `net` gets masks set inside its layers as it runs:
    pass a network nothing else is using. Blocking."""
    method, epochs = _check_method(query.task, params, limits)
    device = device or torch.device("cpu")
    graph, target = query.graph, params.target
    x = torch.as_tensor(np.array(graph.node_features, dtype=np.float32), device=device)
    edges = torch.as_tensor(np.array(graph.edge_index, dtype=np.int64), device=device)
    weight = None
    if graph.edge_weight is not None:
        weight = torch.as_tensor(np.array(graph.edge_weight, dtype=np.float32), device=device)
    if query.task == "graph":
        setup = _whole_graph(net, x, edges)
    else:
        setup = _computation_subgraph(net, manifest.config["num_layers"], query, x, edges, weight, target)
    explainer = Explainer(
        model=setup.model,
        algorithm=_algorithm(method, epochs).to(device),
        explanation_type="phenomenon" if target is not None else "model",
        node_mask_type="attributes",
        # No edges to mask (isolated nodes): Captum cannot differentiate an empty mask; features only.
        edge_mask_type="object" if setup.sub_edges.shape[1] else None,
        model_config=_config(query.task),
    )
    torch.manual_seed(params.seed)
    phenomenon = None
    if target is not None:
        phenomenon = torch.full((setup.targets,), int(target), dtype=torch.long, device=device)
    # A checkpoint before every forward pass (each GNNExplainer epoch, each Captum step): a cancelled
    # explanation stops within one pass.
    hook = net.register_forward_pre_hook(lambda module, args: checkpoint())
    try:
        explanation = explainer(x[setup.subset], setup.sub_edges, target=phenomenon, index=setup.index,
                                **setup.kwargs)  # fmt: skip
    finally:
        hook.remove()
    return _framed(method, query, explanation, setup.subset, setup.kept, edges, graph,
                   {name: value.detach().cpu().numpy() for name, value in setup.outputs.items()})  # fmt: skip


def _framed(method, query: ExplainQuery, explanation, subset, kept, edges, graph: GraphInput,
            outputs) -> GraphExplanation:  # fmt: skip
    """The masks over the input graph (zero outside the subgraph), or over a graph-store subgraph alone."""
    edge_ids = kept.nonzero().flatten()
    edge_mask = torch.zeros(edges.shape[1], device=edges.device)
    if explanation.get("edge_mask") is not None:
        edge_mask[edge_ids] = explanation.edge_mask.detach().abs()
    node_mask = torch.zeros((graph.num_nodes, graph.node_features.shape[1]), device=edges.device)
    node_mask[subset] = explanation.node_mask.detach().abs()
    edge_mask, node_mask = edge_mask.cpu().numpy(), node_mask.cpu().numpy()
    if query.global_nodes is not None:  # the sampled subgraph is the whole input: name its nodes globally
        edge_index = np.asarray(graph.edge_index, np.int64)
        return GraphExplanation(
            method, query.requested_node_ids, edge_mask.astype(np.float32), node_mask.astype(np.float32),
            np.arange(edge_index.shape[1], dtype=np.int64), query.global_nodes.astype(np.int64),
            query.global_nodes[edge_index].astype(np.int64).reshape(2, -1), outputs, query.graph_version,
        )  # fmt: skip
    edge_ids = edge_ids.cpu().numpy().astype(np.int64)
    return GraphExplanation(
        method, query.requested_node_ids, edge_mask.astype(np.float32), node_mask.astype(np.float32), edge_ids,
        subset.cpu().numpy().astype(np.int64), np.asarray(graph.edge_index, np.int64)[:, edge_ids], outputs,
    )  # fmt: skip


class GnnExplanations:
    """Explain for the gnn service: resolves the version and the graph as Predict does, then explains on a
    copy of the version's network (the Explainer sets masks inside the layers it runs, which Predict's
    network must never see)."""

    def __init__(self, repository, runner, limits: GnnExplainLimits, query_limits: QueryLimits | None = None,
                 graph_store: GraphStore | None = None) -> None:  # fmt: skip
        self.repository = repository
        self.runner = runner
        self.limits = limits
        self.query_limits = query_limits or QueryLimits()
        self.graph_store = graph_store

    async def explain(self, name: str, version: int, params: ExplainParams, deadline: float | None = None,
                      validate_only: bool = False,
                      ) -> tuple[Manifest, ExplainQuery, GraphExplanation | None]:  # fmt: skip
        entry = self.repository.resolve(name, version)
        model: GnnModel = entry.predictor
        if model.task == "recommend":
            raise InvalidArgumentError(f"model_name: {name!r} is a recommender; Explain takes node, link and graph "
                                       "models (SimilarItems shows which items a recommender puts together)")
        query = await self.repository.run(resolve_query, model, entry.manifest, params, self.graph_store, self.limits,
                                          self.query_limits)  # fmt: skip
        if validate_only:
            return entry.manifest, query, None

        def run() -> GraphExplanation:
            return explain_query(copy.deepcopy(model.net), entry.manifest, query, params, self.limits,
                                 model.torch_device)  # fmt: skip

        return entry.manifest, query, await self.runner.run(run, deadline=deadline)
