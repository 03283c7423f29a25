"""GNN inference, independent of gRPC: validate graphs and queries, sample neighbourhoods, run
the model off the loop through the batcher, and pick the rows each caller asked for.

A model version has one task (its config's "task"), so its batcher sees one kind of item:
- node: a GraphInput (an inline graph, a graph stored with the model, or a sampled neighbourhood);
- link: a LinkQuery (a graph, pairs to score, nodes to find new neighbours for);
- graph: a list of GraphInputs (one call's small graphs).
Every batch runs as one disjoint union, so each item gets exactly what it would get alone.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load

from maas.common.v1 import model_pb2
from services.gnn.architectures import build_network
from services.gnn.graph_store import GraphStore, StoredGraph
from services.gnn.recommend import ITEM_COLUMN, Recommender, RecommendQuery, SimilarQuery
from services.gnn.sampling import ALL, NeighbourhoodTooLarge, csr_edge_index
from shared.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from shared.model_events import GRAPH_CHANGED, ModelEvent
from shared.model_repository import ModelRepository, Prediction
from shared.model_store import Artifacts, Manifest, check_model_name
from shared.onnx_session import OnnxConfig, OnnxSession
from shared.stored_graphs import missing_graph


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # Arrays decoded from a request are read-only views of its bytes, and stored graphs are
    # read-only maps; torch wants writable memory.
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(device)


@dataclass
class GraphInput:
    node_features: np.ndarray
    edge_index: np.ndarray
    edge_weight: np.ndarray | None = None

    @property
    def num_nodes(self) -> int:
        return self.node_features.shape[0]

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]


@dataclass
class LinkQuery:
    graph: GraphInput
    pairs: np.ndarray  # 2 x P local node ids
    nodes: np.ndarray  # local ids of the nodes whose top_k new neighbours are wanted
    top_k: int = 0


@dataclass(frozen=True)
class QueryLimits:
    max_hops: int = 4
    max_fan_out: int = 1000
    max_subgraph_nodes: int = 200_000
    max_full_graph_nodes: int = 200_000
    max_graph_nodes: int = 100_000
    max_graph_edges: int = 2_000_000
    max_graphs_per_call: int = 1024
    max_top_k: int = 100
    max_users_per_call: int = 1024


@dataclass
class GraphAnswer:
    """A Predict or PredictLinks result, with what it ran on."""

    prediction: Prediction
    node_ids: list[int] = field(default_factory=list)
    graph_version: int = 0
    nodes_used: int = 0
    edges_used: int = 0
    by: str = ""  # SimilarItems: what the similarity was measured on


class GnnModel:
    """A GNN version loaded from safetensors weights and its architecture config (no pickle).

    A graph classifier whose ONNX export held up (the manifest's config names onnx_file) runs on
    ONNX Runtime when `onnx` is given (MAAS_GNN_ONNX_GRAPH_CLASSIFIERS): a lone small graph costs a
    fraction of PyG's Python-heavy forward, though big batches cost more (ORT's CPU scatter).
    """

    def __init__(
        self, manifest: Manifest, artifacts: Artifacts, device: torch.device, onnx: OnnxConfig | None = None
    ) -> None:
        config = manifest.config
        self.torch_device = device
        self.device = str(device)
        self.task = config.get("task", "node")
        self.in_channels = config["in_channels"]
        self.fan_outs = list(config.get("fan_outs") or [10] * config["num_layers"])
        self.net = build_network(config)
        self.net.load_state_dict(load(artifacts.read(config["weights_file"])))
        self.net.to(self.torch_device).eval()
        self.graphs = {
            name: GraphInput(tensors["node_features"].numpy(), tensors["edge_index"].numpy())
            for name, file in config.get("graphs", {}).items()
            for tensors in [load(artifacts.read(file))]
        }
        self.session: OnnxSession | None = None
        if onnx is not None and self.task == "graph" and config.get("onnx_file"):
            self.session = OnnxSession(artifacts.read(config["onnx_file"]), onnx)
            self.device = self.session.device

    def warm_up(self, max_batch_size: int = 1) -> None:
        graph = next(iter(self.graphs.values()), None) or GraphInput(
            np.zeros((2, self.in_channels), np.float32), np.array([[0], [1]], np.int64)
        )
        if self.task == "graph":
            self.run_batch([[graph]])
        elif self.task == "link":
            self.run_batch([LinkQuery(graph, np.zeros((2, 1), np.int64), np.zeros(1, np.int64), 1)])
        else:
            self.predict(graph)

    def _forward(self, graph: GraphInput) -> torch.Tensor:
        x = _tensor(graph.node_features, self.torch_device)
        edges = _tensor(graph.edge_index, self.torch_device)
        weight = None if graph.edge_weight is None else _tensor(graph.edge_weight, self.torch_device)
        return self.net(x, edges, weight)

    def predict(self, graph: GraphInput) -> np.ndarray:
        """Class probabilities for every node of the graph."""
        with torch.inference_mode():
            return torch.softmax(self._forward(graph), dim=-1).cpu().numpy()

    def item_size(self, item) -> int:
        if self.task == "graph":
            return sum(graph.num_nodes for graph in item)
        return (item.graph if self.task == "link" else item).num_nodes

    def run_batch(self, items: list) -> list:
        if self.task == "graph":
            return self._classify_graphs(items)
        if self.task == "link":
            return self._score_links(items)
        return self._label_nodes(items)

    def _per_graph(self, graphs: list[GraphInput], run) -> list[np.ndarray]:
        """Runs `run` once on the union of the distinct graphs; splits its node rows back per graph.

        Graphs share no edges in the union, so each gets exactly what it would alone; a graph
        several requests name (one stored with the model) is run once."""
        unique = list({id(graph): graph for graph in graphs}.values())
        if len(unique) == 1:
            rows = run(unique[0])
            return [rows for _ in graphs]
        union, offsets = disjoint_union(unique)
        rows = run(union)
        by_graph = {id(g): rows[start : start + g.num_nodes] for g, start in zip(unique, offsets, strict=True)}
        return [by_graph[id(graph)] for graph in graphs]

    def _label_nodes(self, graphs: list[GraphInput]) -> list[np.ndarray]:
        return self._per_graph(graphs, self.predict)

    def _embed(self, graph: GraphInput) -> np.ndarray:
        with torch.inference_mode():
            return self._forward(graph).cpu().numpy()

    def _score_links(self, queries: list[LinkQuery]) -> list[dict[str, np.ndarray]]:
        embeddings = self._per_graph([query.graph for query in queries], self._embed)
        return [link_outputs(query, z) for query, z in zip(queries, embeddings, strict=True)]

    def _classify_graphs(self, calls: list[list[GraphInput]]) -> list[np.ndarray]:
        graphs = [graph for call in calls for graph in call]
        union, _ = disjoint_union(graphs)
        batch = np.repeat(np.arange(len(graphs), dtype=np.int64), [graph.num_nodes for graph in graphs])
        if self.session is not None:
            logits = self.session.run(
                {"node_features": union.node_features, "edge_index": union.edge_index, "batch": batch}
            )["output"]
            probabilities = _softmax(logits)
        else:
            probabilities = self._torch_graph_probabilities(union, batch, len(graphs))
        splits = np.cumsum([len(call) for call in calls])[:-1]
        return np.split(probabilities, splits)

    def _torch_graph_probabilities(self, union: GraphInput, batch: np.ndarray, num_graphs: int) -> np.ndarray:
        with torch.inference_mode():
            x = _tensor(union.node_features, self.torch_device)
            edges = _tensor(union.edge_index, self.torch_device)
            logits = self.net(x, edges, _tensor(batch, self.torch_device), num_graphs)
            return torch.softmax(logits, dim=-1).cpu().numpy()


def link_outputs(query: LinkQuery, z: np.ndarray) -> dict[str, np.ndarray]:
    """Link probabilities for the pairs, and each node's top_k nodes it is not linked to yet."""
    u, v = query.pairs
    outputs = {"scores": _sigmoid(np.einsum("ij,ij->i", z[u], z[v])).astype(np.float32)}
    if query.top_k:
        scores = _sigmoid(z[query.nodes] @ z.T)
        sources, targets = query.graph.edge_index
        for row, node in enumerate(query.nodes):
            scores[row, sources[targets == node]] = -np.inf
            scores[row, targets[sources == node]] = -np.inf
            scores[row, node] = -np.inf
        k = min(query.top_k, z.shape[0])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        outputs["neighbors"] = best.astype(np.int64)
        outputs["neighbor_scores"] = np.take_along_axis(scores, best, axis=1).astype(np.float32)
    return outputs


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def disjoint_union(graphs: list[GraphInput]) -> tuple[GraphInput, list[int]]:
    """One graph holding all of them, node ids shifted by each graph's offset."""
    offsets = np.cumsum([0] + [graph.num_nodes for graph in graphs[:-1]]).tolist()
    weighted = any(graph.edge_weight is not None for graph in graphs)
    union = GraphInput(
        node_features=np.concatenate([graph.node_features for graph in graphs]),
        edge_index=np.concatenate(
            [graph.edge_index + offset for graph, offset in zip(graphs, offsets, strict=True)], axis=1
        ),
        edge_weight=np.concatenate(
            [
                graph.edge_weight if graph.edge_weight is not None else np.ones(graph.edge_index.shape[1], np.float32)
                for graph in graphs
            ]
        )
        if weighted
        else None,
    )
    return union, offsets


def gnn_loader(device: torch.device, onnx: OnnxConfig | None = None):
    """Loads GNN versions on `device`; graph classifiers with an ONNX export on ONNX Runtime when `onnx` is set."""

    def load(manifest: Manifest, artifacts: Artifacts) -> GnnModel | Recommender:
        if manifest.config.get("task") == "recommend":
            return Recommender.load(manifest.config, artifacts)  # scores on CPU: one small matrix product a call
        return GnnModel(manifest, artifacts, device, onnx)

    return load


def check_graph(graph: GraphInput, in_channels: int, limits: QueryLimits, where: str = "graph") -> None:
    x, edges, weight = graph.node_features, graph.edge_index, graph.edge_weight
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != in_channels:
        raise InvalidArgumentError(
            f"{where}.node_features: expected FP32 of shape [N, {in_channels}], got {x.dtype} of shape {list(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InvalidArgumentError(f"{where}.node_features: the graph has no nodes")
    if x.shape[0] > limits.max_graph_nodes:
        raise InvalidArgumentError(
            f"{where}.node_features: the graph has {x.shape[0]} nodes; at most {limits.max_graph_nodes} per graph "
            "(store a bigger graph and query it by neighbourhood)"
        )
    if edges.dtype != np.int64 or edges.ndim != 2 or edges.shape[0] != 2:
        raise InvalidArgumentError(
            f"{where}.edge_index: expected INT64 of shape [2, E], got {edges.dtype} of shape {list(edges.shape)}"
        )
    if edges.shape[1] > limits.max_graph_edges:
        raise InvalidArgumentError(
            f"{where}.edge_index: the graph has {edges.shape[1]} edges; at most {limits.max_graph_edges} per graph"
        )
    low, high = (int(edges.min()), int(edges.max())) if edges.size else (0, 0)
    if low < 0 or high >= graph.num_nodes:
        bad = low if low < 0 else high
        raise InvalidArgumentError(
            f"{where}.edge_index: node index {bad} is out of range for a graph of {graph.num_nodes} nodes "
            f"(valid: 0..{graph.num_nodes - 1})"
        )
    if weight is not None and (weight.dtype != np.float32 or weight.shape != (edges.shape[1],)):
        raise InvalidArgumentError(
            f"{where}.edge_weight: expected FP32 of shape [{edges.shape[1]}] (one per edge), "
            f"got {weight.dtype} of shape {list(weight.shape)}"
        )


def check_node_ids(node_ids: np.ndarray, num_nodes: int, where: str = "node_ids") -> None:
    if not node_ids.size:
        return
    bad = np.flatnonzero((node_ids < 0) | (node_ids >= num_nodes))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgumentError(
            f"{where}[{i}]: node {int(node_ids[i])} is out of range for a graph of {num_nodes} nodes "
            f"(valid: 0..{num_nodes - 1})"
        )


def check_fan_outs(fan_outs: list[int], limits: QueryLimits) -> None:
    if len(fan_outs) > limits.max_hops:
        raise InvalidArgumentError(f"fan_outs: {len(fan_outs)} hops (k); at most {limits.max_hops}")
    for hop, fan_out in enumerate(fan_outs):
        if fan_out == 0 or fan_out < ALL or fan_out > limits.max_fan_out:
            raise InvalidArgumentError(
                f"fan_outs[{hop}]: {fan_out}; expected 1..{limits.max_fan_out} neighbours per node, or -1 for all"
            )


def inline_or_embedded(manifest: Manifest, model: GnnModel, graph: GraphInput | None, stored_graph: str,
                       graph_version: int, fan_outs: list[int] | None, limits: QueryLimits) -> GraphInput:  # fmt: skip
    """The request's inline graph (checked), or the graph stored with the model it names."""
    if stored_graph:
        if graph_version or fan_outs:
            field_name = "graph_version" if graph_version else "fan_outs"
            raise InvalidArgumentError(
                f"{field_name}: graph {stored_graph!r} is stored with {manifest.name!r} v{manifest.version}, "
                "unversioned and always run whole; leave it unset"
            )
        return model.graphs[stored_graph]
    if graph is None:
        raise InvalidArgumentError("graph_source: send either graph or stored_graph")
    check_graph(graph, model.in_channels, limits)
    return graph


def open_stored_graph(graph_store: GraphStore, model: GnnModel, stored_graph: str, graph_version: int) -> StoredGraph:
    """A graph-store graph's version, checked against the model's feature width. Blocking."""
    try:
        stored = graph_store.open(stored_graph, graph_version)
    except NotFoundError:
        if stored_graph in graph_store.names():
            raise  # a version that graph lacks
        raise missing_graph(stored_graph, model.graphs, graph_version) from None
    if stored.feature_width != model.in_channels:
        raise InvalidArgumentError(
            f"stored_graph: {stored.label} has {stored.feature_width} features per node; "
            f"the model takes {model.in_channels}"
        )
    return stored


def open_recommender_graph(graph_store: GraphStore, manifest: Manifest, model: Recommender, name: str,
                           graph_version: int) -> StoredGraph:  # fmt: skip
    """A user-item graph's version for a recommender: its own graph, or one made from it (an update, or
    UpdateGraph's new_graph_name), which keeps the nodes it was trained on and its feature width. Blocking."""
    try:
        stored = graph_store.open(name, graph_version)
    except NotFoundError:
        if name in graph_store.names():
            raise  # a version that graph lacks
        raise missing_graph(name, {}, graph_version) from None
    if stored.feature_width != model.in_channels or stored.num_nodes < model.trained_nodes:
        raise InvalidArgumentError(
            f"stored_graph: {stored.label} ({stored.num_nodes} nodes, {stored.feature_width} features each) is not "
            f"a user-item graph of {manifest.name!r} v{manifest.version}, which was trained on "
            f"{model.trained_nodes} nodes of {model.in_channels} features ({manifest.config['graph']!r})"
        )
    return stored


def query_neighbourhood(
    model: GnnModel, stored: StoredGraph, ids: np.ndarray, fan_outs: list[int] | None, limits: QueryLimits
) -> tuple[GraphInput, np.ndarray, np.ndarray]:
    """The neighbourhood a query on `ids` runs on (fan_outs empty: the model's), as (subgraph, where each
    id sits in it, the subgraph's global node ids). Blocking.

    The same query samples the same neighbourhood: answers are repeatable, and cacheable."""
    fan_outs = list(fan_outs or model.fan_outs)
    check_fan_outs(fan_outs, limits)
    seed = [stored.version, zlib.crc32(ids.tobytes()), *[f + 1 for f in fan_outs]]
    try:
        # Reads only the rows it visits (checking their blocks once), across a delta version's base too.
        sub = stored.sample(ids, fan_outs, np.random.default_rng(seed), limits.max_subgraph_nodes)
    except NeighbourhoodTooLarge as exc:
        raise InvalidArgumentError(
            f"fan_outs: the {len(fan_outs)}-hop neighbourhood of the {len(ids)} nodes is over the limit of "
            f"{limits.max_subgraph_nodes} nodes ({exc}); lower the fan-outs or the hops"
        ) from None
    return GraphInput(stored.features(sub.nodes), sub.edge_index), sub.seed_positions, sub.nodes


class GnnRuntime:
    def __init__(self, repository: ModelRepository, graph_store: GraphStore, limits: QueryLimits | None = None):
        self.repository = repository
        self.graph_store = graph_store
        self.limits = limits or QueryLimits()
        self._whole: OrderedDict[tuple[str, int], GraphInput] = OrderedDict()

    def _model(self, name: str, version: int, task: str):
        entry = self.repository.resolve(name, version)
        model: GnnModel = entry.predictor
        if model.task != task:
            wanted = {"node": "Predict", "link": "PredictLinks", "graph": "ClassifyGraphs", "recommend": "Recommend"}
            raise InvalidArgumentError(
                f"model_name: {name!r} is a {model.task}-level model; call {wanted[model.task]} for it"
            )
        return entry, model

    async def predict(
        self,
        name: str,
        version: int,
        graph: GraphInput | None,
        stored_graph: str,
        node_ids: list[int],
        deadline: float | None = None,
        graph_version: int = 0,
        fan_outs: list[int] | None = None,
    ) -> GraphAnswer:
        entry, model = self._model(name, version, "node")
        ids = np.asarray(node_ids, np.int64)
        if stored_graph and stored_graph not in model.graphs:
            return await self._predict_stored(entry, model, stored_graph, graph_version, ids, fan_outs, deadline)
        graph = self._inline_or_embedded(name, entry.manifest, model, graph, stored_graph, graph_version, fan_outs)
        check_node_ids(ids, graph.num_nodes)
        probabilities = await entry.batcher.submit(graph, deadline)
        rows = ids if ids.size else np.arange(graph.num_nodes)
        return GraphAnswer(_node_outputs(entry.manifest, probabilities[rows]), rows.tolist(), 0, graph.num_nodes,
                           graph.num_edges)  # fmt: skip

    def _inline_or_embedded(self, name, manifest, model, graph, stored_graph, graph_version, fan_outs) -> GraphInput:
        return inline_or_embedded(manifest, model, graph, stored_graph, graph_version, fan_outs, self.limits)

    async def _open(self, model: GnnModel, stored_graph: str, graph_version: int) -> StoredGraph:
        return await self.repository.run(open_stored_graph, self.graph_store, model, stored_graph, graph_version)

    async def _predict_stored(self, entry, model, stored_graph, graph_version, ids, fan_outs, deadline):
        stored = await self._open(model, stored_graph, graph_version)
        check_node_ids(ids, stored.num_nodes)
        if not ids.size:
            graph = await self._whole_graph(stored)
            probabilities = await entry.batcher.submit(graph, deadline)
            rows, positions = np.arange(stored.num_nodes), slice(None)
        else:
            graph, positions = await self._neighbourhood(model, stored, ids, fan_outs)
            probabilities = await entry.batcher.submit(graph, deadline)
            rows = ids
        return GraphAnswer(_node_outputs(entry.manifest, probabilities[positions]), rows.tolist(), stored.version,
                           graph.num_nodes, graph.num_edges)  # fmt: skip

    async def _whole_graph(self, stored: StoredGraph) -> GraphInput:
        """A stored graph as one input, for a whole-graph pass: only within the full-graph limit."""
        if stored.num_nodes > self.limits.max_full_graph_nodes:
            raise InvalidArgumentError(
                f"node_ids: empty asks for every node of {stored.label}, whose {stored.num_nodes} nodes are over "
                f"the whole-graph limit of {self.limits.max_full_graph_nodes}; name the nodes to query"
            )
        key = (stored.name, stored.version)
        graph = self._whole.get(key)
        if graph is None:
            graph = await self.repository.run(
                lambda: GraphInput(np.array(stored.node_features), csr_edge_index(stored.indptr, stored.indices))
            )
            self._whole[key] = graph
            while len(self._whole) > 2:
                self._whole.popitem(last=False)
        return graph

    async def _neighbourhood(
        self, model: GnnModel, stored: StoredGraph, ids: np.ndarray, fan_outs: list[int] | None
    ) -> tuple[GraphInput, np.ndarray]:
        graph, positions, _ = await self.repository.run(query_neighbourhood, model, stored, ids, fan_outs,
                                                        self.limits)  # fmt: skip
        return graph, positions

    async def predict_links(
        self,
        name: str,
        version: int,
        graph: GraphInput | None,
        stored_graph: str,
        graph_version: int,
        pairs: np.ndarray | None,
        node_ids: list[int],
        top_k: int,
        fan_outs: list[int] | None,
        deadline: float | None = None,
    ) -> GraphAnswer:
        entry, model = self._model(name, version, "link")
        pairs = np.zeros((2, 0), np.int64) if pairs is None else pairs
        if pairs.dtype != np.int64 or pairs.ndim != 2 or pairs.shape[0] != 2:
            raise InvalidArgumentError(
                f"pairs: expected INT64 of shape [2, P], got {pairs.dtype} of shape {list(pairs.shape)}"
            )
        ids = np.asarray(node_ids, np.int64)
        if top_k < 0 or top_k > self.limits.max_top_k:
            raise InvalidArgumentError(f"top_k: {top_k}; expected 0..{self.limits.max_top_k}")
        if bool(top_k) != bool(ids.size):
            raise InvalidArgumentError("top_k, node_ids: set both (top_k new neighbours of each node) or neither")
        if not pairs.size and not top_k:
            raise InvalidArgumentError("pairs: no pairs to score and no top_k asked for")
        used_version = 0
        if stored_graph and stored_graph not in model.graphs:
            stored = await self._open(model, stored_graph, graph_version)
            used_version = stored.version
            num_nodes = stored.num_nodes
        else:
            whole = self._inline_or_embedded(name, entry.manifest, model, graph, stored_graph, graph_version, fan_outs)
            num_nodes, stored = whole.num_nodes, None
        check_node_ids(pairs.reshape(-1), num_nodes, "pairs")
        check_node_ids(ids, num_nodes)
        if stored is None:
            query = LinkQuery(whole, pairs, ids, top_k)
        elif top_k:
            if fan_outs:
                raise InvalidArgumentError("fan_outs: top_k scores every node, on the whole graph; leave it unset")
            query = LinkQuery(await self._whole_graph(stored), pairs, ids, top_k)
        else:
            endpoints = pairs.reshape(-1)
            sub, positions = await self._neighbourhood(model, stored, endpoints, fan_outs)
            query = LinkQuery(sub, positions.reshape(2, -1), np.zeros(0, np.int64), 0)
        outputs = await entry.batcher.submit(query, deadline)
        return GraphAnswer(Prediction(entry.manifest, outputs), ids.tolist(), used_version, query.graph.num_nodes,
                           query.graph.num_edges)  # fmt: skip

    async def _recommender_table(self, name: str, version: int, stored_graph: str, graph_version: int, top_k: int,
                                 ids: np.ndarray, field_name: str, most: int):  # fmt: skip
        """The checks every recommender query makes, in order (model, top_k, the ids' count, the graph, the ids),
        and the propagated table of the graph version it runs on."""
        entry, model = self._model(name, version, "recommend")
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgumentError(
                f"top_k: {top_k}; expected 1..{self.limits.max_top_k} items per {field_name[:-4]}"
            )
        if not ids.size:
            raise InvalidArgumentError(f"{field_name}: empty; name at least one")
        if ids.size > most:
            raise InvalidArgumentError(
                f"{field_name}: {ids.size} ids; at most {most} per call (MAAS_GNN_MAX_USERS_PER_CALL)"
            )
        graph = stored_graph or entry.manifest.config["graph"]
        stored = await self.repository.run(open_recommender_graph, self.graph_store, entry.manifest, model, graph,
                                           graph_version)  # fmt: skip
        check_node_ids(ids, stored.num_nodes, field_name)
        kinds = await self.repository.run(lambda: stored.features(ids)[:, ITEM_COLUMN] > 0.5)
        wanted_item = field_name == "item_ids"
        wrong = np.flatnonzero(kinds != wanted_item)
        if wrong.size:
            i = int(wrong[0])
            what, expected = ("a user", "an item") if wanted_item else ("an item", "a user")
            raise InvalidArgumentError(f"{field_name}[{i}]: node {int(ids[i])} of {stored.label} is {what}, not "
                                       f"{expected} (node feature column {ITEM_COLUMN} says which)")  # fmt: skip
        table = await self.repository.run(model.table, stored)
        return entry, table

    async def recommend(self, name: str, version: int, stored_graph: str, graph_version: int,
                        user_ids: list[int], top_k: int, include_seen: bool = False,
                        deadline: float | None = None) -> GraphAnswer:  # fmt: skip
        """Each user's top_k items on the graph version, best first, the items it interacted with left out unless
        `include_seen`; a user with no interactions gets the most popular ones, flagged."""
        ids = np.asarray(user_ids, np.int64)
        entry, table = await self._recommender_table(name, version, stored_graph, graph_version, top_k, ids,
                                                     "user_ids", self.limits.max_users_per_call)  # fmt: skip
        outputs = await entry.batcher.submit(RecommendQuery(table, ids, top_k, include_seen), deadline)
        return GraphAnswer(Prediction(entry.manifest, outputs), ids.tolist(), table.graph_version, table.num_nodes,
                           table.num_edges)  # fmt: skip

    async def similar_items(self, name: str, version: int, stored_graph: str, graph_version: int,
                            item_ids: list[int], top_k: int, by: str = "", deadline: float | None = None,
                            ) -> GraphAnswer:  # fmt: skip
        """Each item's top_k most similar items by the cosine of their content vectors ("content", the default
        where the graph has them) or of their propagated embeddings ("collaborative")."""
        if by not in ("", "content", "collaborative"):
            raise InvalidArgumentError(f"by: {by!r}; expected 'content' or 'collaborative'")
        ids = np.asarray(item_ids, np.int64)
        entry, table = await self._recommender_table(name, version, stored_graph, graph_version, top_k, ids,
                                                     "item_ids", self.limits.max_users_per_call)  # fmt: skip
        by = by or ("content" if table.content is not None else "collaborative")
        if by == "content":
            if table.content is None:
                raise InvalidArgumentError(f"by: graph {table.graph!r} v{table.graph_version} has no content "
                                           "vectors; ask for 'collaborative'")  # fmt: skip
            lacking = np.flatnonzero(~table.has_content[table.position[ids]])
            if lacking.size:
                i = int(lacking[0])
                raise InvalidArgumentError(f"item_ids[{i}]: item {int(ids[i])} has no content vector; ask for "
                                           "by 'collaborative'")  # fmt: skip
        outputs = await entry.batcher.submit(SimilarQuery(table, ids, top_k, by), deadline)
        return GraphAnswer(Prediction(entry.manifest, outputs), ids.tolist(), table.graph_version, table.num_nodes,
                           table.num_edges, by)  # fmt: skip

    async def classify_graphs(
        self, name: str, version: int, graphs: list[GraphInput], deadline: float | None = None
    ) -> Prediction:
        entry, model = self._model(name, version, "graph")
        if not graphs:
            raise InvalidArgumentError("graphs: send at least one graph")
        if len(graphs) > self.limits.max_graphs_per_call:
            raise InvalidArgumentError(
                f"graphs: {len(graphs)} graphs; at most {self.limits.max_graphs_per_call} per call"
            )
        for i, graph in enumerate(graphs):
            check_graph(graph, model.in_channels, self.limits, f"graphs[{i}]")
        return _node_outputs(entry.manifest, await entry.batcher.submit(graphs, deadline))

    async def update_graph(
        self, name: str, base_version: int, node_features: np.ndarray, edge_index: np.ndarray, new_name: str = "",
        owner: str = "",
    ) -> StoredGraph:  # fmt: skip
        if not name:
            raise InvalidArgumentError("graph_name: required, the stored graph to update")
        if base_version < 0:
            raise InvalidArgumentError(f"base_version: must be 0 (latest) or positive, got {base_version}")
        if new_name:
            check_model_name(new_name, "new_graph_name")
            stored = await self.repository.run(self.graph_store.names)
            if new_name in stored or any(new_name in graphs for _, graphs in self.model_graphs()):
                raise AlreadyExistsError(f"new_graph_name: a graph named {new_name!r} exists; choose another name")
        stored = await self.repository.run(self.graph_store.update, name, base_version, node_features, edge_index,
                                           new_name, owner)  # fmt: skip
        await self._graph_changed(new_name or name, stored.version)  # a new version; retention may have pruned
        return stored

    def model_graphs(self) -> list[tuple[str, list[str]]]:
        """(model, the graphs stored with it) for every loaded gnn model that holds some."""
        found = []
        for model in self.repository.describe_all():
            graphs: set[str] = set()
            for version in model.versions:
                if version.state == model_pb2.MODEL_STATE_READY:
                    graphs.update(self.repository.resolve(model.name, version.version).predictor.graphs)
            if graphs:
                found.append((model.name, sorted(graphs)))
        return found

    async def list_graphs(self) -> list[tuple[str, list[int], str, str]]:
        """(name, versions, owner, model) of every stored graph, then of every graph stored with a model (which
        has no versions)."""

        def stored() -> list[tuple[str, list[int], str, str]]:
            return [(name, self.graph_store.versions(name), self.graph_store.owner(name), "")
                    for name in self.graph_store.names()]  # fmt: skip

        found = await self.repository.run(stored)
        return found + [(graph, [], "", model) for model, graphs in self.model_graphs() for graph in graphs]

    async def delete_graph_version(self, name: str, version: int) -> list[int]:
        if not name:
            raise InvalidArgumentError("graph_name: required, the stored graph whose version to delete")
        if version <= 0:
            raise InvalidArgumentError(f"graph_version: the version to delete, a positive number; got {version}")
        left = await self.repository.run(self.graph_store.delete, name, version)
        await self._graph_changed(name, version)
        return left

    async def _graph_changed(self, name: str, version: int) -> None:
        """Gateways read the graph's versions again: one deleted (or pruned) is NOT_FOUND there at once, never
        a result they cached for it."""
        await self.repository.events.publish(ModelEvent("gnn", name, GRAPH_CHANGED, version))


def _node_outputs(manifest: Manifest, probabilities: np.ndarray) -> Prediction:
    return Prediction(
        manifest, {"probabilities": probabilities, "label": probabilities.argmax(axis=1).astype(np.int64)}
    )


# The names before GNNs had several tasks, for code written against them (branches in flight).
GcnModel = GnnModel
gcn_loader = gnn_loader
