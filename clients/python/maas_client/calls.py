"""What each SDK call sends and what it makes of the replies, written once for both clients.

A call is a generator: it yields the `Rpc`s it needs, one at a time, receives each reply (or has
the call's `MaasError` thrown into it), and returns its result. `Client` runs calls with
blocking gRPC and `AsyncClient` with grpc.aio, so neither holds any request or reply logic.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import numpy as np
from grpc_health.v1 import health_pb2

from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2
from maas.gateway.v1 import gateway_pb2
from maas.gnn.v1 import gnn_pb2
from maas.keys.v1 import keys_pb2
from maas.models.v1 import models_pb2
from maas.nlp.v1 import nlp_pb2
from maas.training.v1 import training_pb2
from maas_client import errors
from maas_client.tensors import decode, encode

FAMILIES = ("dense", "gnn", "nlp")
TERMINAL_STATES = frozenset(
    {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
)
SERVICES = {
    "dense": "maas.dense.v1.DenseService",
    "gnn": "maas.gnn.v1.GnnService",
    "nlp": "maas.nlp.v1.NlpService",
    "models": "maas.models.v1.ModelService",
    "training": "maas.training.v1.TrainingService",
    "keys": "maas.keys.v1.KeyService",
    "explanations": "maas.gateway.v1.ExplanationService",
    "health": "grpc.health.v1.Health",
}
_DATASET_FORMATS = {
    ".npz": training_pb2.DATASET_FORMAT_NPZ,
    ".csv": training_pb2.DATASET_FORMAT_CSV,
    ".json": training_pb2.DATASET_FORMAT_JSON,
    ".jsonl": training_pb2.DATASET_FORMAT_JSONL,
}
CHUNK_BYTES = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class Rpc:
    """One unary (or client-streaming) rpc a call needs: `service` is a key of SERVICES."""

    service: str
    method: str
    request: Any
    timeout: float | None = None


Call = Generator[Rpc, Any, T]


@dataclass(frozen=True)
class Prediction:
    """A model's outputs by name, and the version that computed them."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    labels: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass(frozen=True)
class GraphPrediction(Prediction):
    node_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # For a stored graph: the version that answered, and the nodes and edges the model ran on.
    graph_version: int = 0
    nodes_used: int = 0
    edges_used: int = 0


@dataclass(frozen=True)
class Recommendations(GraphPrediction):
    """Recommend's or SimilarItems' answer: for each of `node_ids` (the users, or the items), its items best
    first ("items", -1 once no items are left) and their "scores"; Recommend also says which users had no
    interactions and got the most popular items ("popularity_fallback"), SimilarItems what it measured (`by`)."""

    by: str = ""

    @property
    def items(self) -> np.ndarray:
        return self.outputs["items"]

    @property
    def scores(self) -> np.ndarray:
        return self.outputs["scores"]

    @property
    def popularity_fallback(self) -> np.ndarray:
        return self.outputs.get("popularity_fallback", np.zeros(len(self.node_ids), bool))


@dataclass(frozen=True)
class GraphVersion:
    """A stored graph's version, as an update made it."""

    name: str
    version: int
    num_nodes: int
    num_edges: int
    first_new_node_id: int


@dataclass
class Lookups:
    """What a client learns once and reuses: each model's family and single input's name."""

    families: dict[str, str] = field(default_factory=dict)
    input_names: dict[tuple[str, int], str] = field(default_factory=dict)


class SubmitOptions(TypedDict, total=False):
    """The optional settings of `training.submit`; see SubmitJobRequest in training.proto."""

    dataset: str  # a built-in data set, e.g. "iris"
    dataset_id: str  # an uploaded one
    output_model: str
    epochs: int
    batch_size: int
    optimizer: str  # "adam" or "sgd"
    learning_rate: float
    hidden_sizes: Sequence[int]
    validation_split: float
    k_folds: int
    gate_metric: str
    gate_min: float
    gate_max: float
    better_than_default: bool
    idempotency_key: str  # made up by the SDK when not given
    seed: int
    private: bool
    drop_columns: Sequence[str]  # CSV columns removed before training (free text, identifiers)
    mask_columns: Sequence[str]  # CSV columns zeroed before training, and ignored by the model
    world_size: int  # data-parallel workers (dense, nlp); 1 by default
    timeout: float


def family_code(family: str | int) -> int:
    """ "dense", "gnn" or "nlp" (or a `training_pb2.Family` value) as the Family enum."""
    if isinstance(family, int):
        return family
    try:
        return training_pb2.Family.Value(f"FAMILY_{family.upper()}")
    except ValueError:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}") from None


def family_name(code: int) -> str:
    return training_pb2.Family.Name(code).removeprefix("FAMILY_").lower()


def state_name(code: int) -> str:
    return training_pb2.JobState.Name(code).removeprefix("JOB_STATE_").lower()


def _outputs(reply: Any) -> dict[str, np.ndarray]:
    return {name: decode(tensor) for name, tensor in reply.outputs.items()}


# --- inference -----------------------------------------------------------------------------


def dense_predict(
    lookups: Lookups,
    model: str,
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    version: int,
    outputs: Sequence[str],
    timeout: float | None,
) -> Call[Prediction]:
    if not isinstance(inputs, Mapping):
        inputs = {(yield from single_input(lookups, model, version)): inputs}
    request = dense_pb2.PredictRequest(
        model_name=model,
        model_version=version,
        inputs={name: encode(value) for name, value in inputs.items()},
        output_names=list(outputs),
    )
    reply = yield Rpc("dense", "Predict", request, timeout)
    return Prediction(reply.model_name, reply.model_version, _outputs(reply))


def single_input(lookups: Lookups, model: str, version: int) -> Call[str]:
    """The name of the one input a dense model version takes."""
    if (model, version) not in lookups.input_names:
        found = yield from models_get(lookups, model)
        wanted = version or found.default_version
        described = next((v for v in found.versions if v.version == wanted), None)
        if described is None:
            raise errors.NotFound(f"model {model!r} has no loaded version {wanted}")
        if len(described.inputs) != 1:
            names = [spec.name for spec in described.inputs]
            raise ValueError(f"{model} takes several inputs {names}; pass a dict of arrays by name")
        lookups.input_names[model, version] = described.inputs[0].name
    return lookups.input_names[model, version]


def gnn_predict(
    model: str,
    node_features: np.ndarray | None,
    edge_index: np.ndarray | None,
    edge_weight: np.ndarray | None,
    stored_graph: str,
    node_ids: Iterable[int],
    version: int,
    timeout: float | None,
    graph_version: int = 0,
    fan_outs: Iterable[int] = (),
) -> Call[GraphPrediction]:
    request = gnn_pb2.PredictRequest(model_name=model, model_version=version, node_ids=list(node_ids),
                                     fan_outs=list(fan_outs))  # fmt: skip
    _set_graph(request, node_features, edge_index, edge_weight, stored_graph, graph_version)
    reply = yield Rpc("gnn", "Predict", request, timeout)
    node_ids = np.array(reply.node_ids, np.int64)
    return GraphPrediction(reply.model_name, reply.model_version, _outputs(reply), node_ids=node_ids,
                           graph_version=reply.graph_version, nodes_used=reply.nodes_used,
                           edges_used=reply.edges_used)  # fmt: skip


def _graph(node_features: np.ndarray, edge_index: np.ndarray, edge_weight: np.ndarray | None = None) -> Any:
    graph = gnn_pb2.Graph(node_features=encode(np.asarray(node_features, np.float32)),
                          edge_index=encode(np.asarray(edge_index, np.int64)))  # fmt: skip
    if edge_weight is not None:
        graph.edge_weight.CopyFrom(encode(np.asarray(edge_weight, np.float32)))
    return graph


def _set_graph(request: Any, node_features, edge_index, edge_weight, stored_graph: str, graph_version: int) -> None:
    if stored_graph:
        request.stored_graph = stored_graph
        request.graph_version = graph_version
    elif node_features is not None and edge_index is not None:
        request.graph.CopyFrom(_graph(node_features, edge_index, edge_weight))
    else:
        raise ValueError("pass stored_graph, or node_features and edge_index")


def gnn_links(
    model: str,
    node_features: np.ndarray | None,
    edge_index: np.ndarray | None,
    stored_graph: str,
    graph_version: int,
    pairs: np.ndarray | None,
    node_ids: Iterable[int],
    top_k: int,
    fan_outs: Iterable[int],
    version: int,
    timeout: float | None,
) -> Call[GraphPrediction]:
    request = gnn_pb2.PredictLinksRequest(model_name=model, model_version=version, node_ids=list(node_ids),
                                          top_k=top_k, fan_outs=list(fan_outs))  # fmt: skip
    _set_graph(request, node_features, edge_index, None, stored_graph, graph_version)
    if pairs is not None:
        request.pairs.CopyFrom(encode(np.asarray(pairs, np.int64)))
    reply = yield Rpc("gnn", "PredictLinks", request, timeout)
    return GraphPrediction(reply.model_name, reply.model_version, _outputs(reply),
                           node_ids=np.array(request.node_ids, np.int64), graph_version=reply.graph_version,
                           nodes_used=reply.nodes_used, edges_used=reply.edges_used)  # fmt: skip


def serving(model: Any, version: int) -> bool:
    """Whether `version` of a described model (0: any of its versions) is loaded and serving."""
    return any(v.state == model_pb2.MODEL_STATE_READY and (not version or v.version == version) for v in model.versions)


def gnn_recommend(
    model: str, user_ids: Iterable[int], top_k: int, include_seen: bool, stored_graph: str, graph_version: int,
    version: int, timeout: float | None,
) -> Call[Recommendations]:  # fmt: skip
    request = gnn_pb2.RecommendRequest(model_name=model, model_version=version, user_ids=list(user_ids), top_k=top_k,
                                       include_seen=include_seen, stored_graph=stored_graph,
                                       graph_version=graph_version)  # fmt: skip
    reply = yield Rpc("gnn", "Recommend", request, timeout)
    return Recommendations(reply.model_name, reply.model_version, _outputs(reply),
                           node_ids=np.array(reply.user_ids, np.int64), graph_version=reply.graph_version,
                           nodes_used=reply.nodes_used, edges_used=reply.edges_used)  # fmt: skip


def gnn_similar_items(
    model: str, item_ids: Iterable[int], top_k: int, by: str, stored_graph: str, graph_version: int, version: int,
    timeout: float | None,
) -> Call[Recommendations]:  # fmt: skip
    request = gnn_pb2.SimilarItemsRequest(model_name=model, model_version=version, item_ids=list(item_ids),
                                          top_k=top_k, by=by, stored_graph=stored_graph,
                                          graph_version=graph_version)  # fmt: skip
    reply = yield Rpc("gnn", "SimilarItems", request, timeout)
    return Recommendations(reply.model_name, reply.model_version, _outputs(reply),
                           node_ids=np.array(reply.item_ids, np.int64), graph_version=reply.graph_version,
                           by=reply.by)  # fmt: skip


def gnn_classify(
    model: str, graphs: Sequence[tuple[np.ndarray, np.ndarray]], version: int, timeout: float | None
) -> Call[Prediction]:
    request = gnn_pb2.ClassifyGraphsRequest(model_name=model, model_version=version,
                                            graphs=[_graph(x, edges) for x, edges in graphs])  # fmt: skip
    reply = yield Rpc("gnn", "ClassifyGraphs", request, timeout)
    return Prediction(reply.model_name, reply.model_version, _outputs(reply))


def gnn_update_graph(
    name: str, node_features: np.ndarray | None, edge_index: np.ndarray | None, base_version: int,
    timeout: float | None, new_graph_name: str = "",
) -> Call[GraphVersion]:  # fmt: skip
    request = gnn_pb2.UpdateGraphRequest(graph_name=name, base_version=base_version, new_graph_name=new_graph_name)
    if node_features is not None:
        request.node_features.CopyFrom(encode(np.asarray(node_features, np.float32)))
    if edge_index is not None:
        request.edge_index.CopyFrom(encode(np.asarray(edge_index, np.int64)))
    reply = yield Rpc("gnn", "UpdateGraph", request, timeout)
    return GraphVersion(reply.graph_name, reply.graph_version, reply.num_nodes, reply.num_edges,
                        reply.first_new_node_id)  # fmt: skip


def gnn_delete_graph_version(name: str, version: int, timeout: float | None) -> Call[list[int]]:
    request = gnn_pb2.DeleteGraphVersionRequest(graph_name=name, graph_version=version)
    reply = yield Rpc("gnn", "DeleteGraphVersion", request, timeout)
    return list(reply.graph_versions)


def nlp_predict(model: str, texts: Sequence[str], version: int, timeout: float | None) -> Call[Prediction]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    reply = yield Rpc(
        "nlp", "Predict", nlp_pb2.PredictRequest(model_name=model, model_version=version, texts=texts), timeout
    )
    return Prediction(reply.model_name, reply.model_version, _outputs(reply), list(reply.labels))


def embedding(call: Call[Prediction]) -> Call[np.ndarray]:
    return (yield from call)["embedding"]


# --- explanations and similarity -------------------------------------------------------------


@dataclass(frozen=True)
class Explanation:
    """What every family's Explain returns: the version explained and the method that ran."""

    model: str
    version: int
    method: str


@dataclass(frozen=True)
class DenseExplanation(Explanation):
    """Attributions by input name, each in its input's shape; `targets` the output column explained per row,
    `scores` and `baseline_scores` that output at the input and at the baseline."""

    attributions: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    targets: np.ndarray
    scores: np.ndarray
    baseline_scores: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self.attributions[name]


@dataclass(frozen=True)
class TextExplanation(Explanation):
    """One attribution per token; `spans[i]` is token i's [start, end) in the text."""

    text: str
    tokens: list[str]
    attributions: np.ndarray
    spans: np.ndarray
    target: int
    label: str
    score: float
    baseline_score: float
    probabilities: np.ndarray | None

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.attributions)[:k]
        return [(self.tokens[i], float(self.attributions[i])) for i in order]


@dataclass(frozen=True)
class GraphExplanation(Explanation):
    """An importance per edge of the graph ([E]) and per node feature ([N, F]), zero outside the subgraph used."""

    node_ids: np.ndarray
    edge_mask: np.ndarray
    node_feature_mask: np.ndarray
    subgraph_edge_ids: np.ndarray
    subgraph_node_ids: np.ndarray
    subgraph_edge_index: np.ndarray  # 2 x len(subgraph_edge_ids): each subgraph edge's (source, target)
    outputs: dict[str, np.ndarray]
    # A graph-store graph's version; then the masks cover the sampled subgraph only (edge_mask[i] is
    # subgraph_edge_index[:, i], node_feature_mask's rows are subgraph_node_ids).
    graph_version: int = 0


@dataclass(frozen=True)
class Similarity:
    """Cosine similarity of each candidate to the query (in the request's order), and the ranking, best first."""

    model: str
    version: int
    scores: np.ndarray
    ranking: np.ndarray
    truncated: np.ndarray  # per candidate
    label_probabilities: np.ndarray | None = None  # with rerank_label: per candidate
    reranking: np.ndarray | None = None  # with rerank_label: by the label's probability, best first


def dense_explanation(reply: dense_pb2.ExplainResponse) -> DenseExplanation:
    return DenseExplanation(
        reply.model_name, reply.model_version, reply.method,
        attributions={name: decode(tensor) for name, tensor in reply.attributions.items()}, outputs=_outputs(reply),
        targets=np.array(reply.targets, np.int64), scores=np.array(reply.scores),
        baseline_scores=np.array(reply.baseline_scores),
    )  # fmt: skip


def text_explanation(reply: nlp_pb2.ExplainResponse, text: str) -> TextExplanation:
    return TextExplanation(
        reply.model_name, reply.model_version, reply.method, text=text,
        tokens=[token.token for token in reply.tokens],
        attributions=np.array([token.attribution for token in reply.tokens], np.float32),
        spans=np.array([(token.start, token.end) for token in reply.tokens], np.int64).reshape(-1, 2),
        target=reply.target, label=reply.label, score=reply.score, baseline_score=reply.baseline_score,
        probabilities=decode(reply.probabilities) if reply.HasField("probabilities") else None,
    )  # fmt: skip


def graph_explanation(reply: gnn_pb2.ExplainResponse) -> GraphExplanation:
    return GraphExplanation(
        reply.model_name, reply.model_version, reply.method, node_ids=np.array(reply.node_ids, np.int64),
        edge_mask=decode(reply.edge_mask), node_feature_mask=decode(reply.node_feature_mask),
        subgraph_edge_ids=np.array(reply.subgraph_edge_ids, np.int64),
        subgraph_node_ids=np.array(reply.subgraph_node_ids, np.int64),
        subgraph_edge_index=decode(reply.subgraph_edge_index), outputs=_outputs(reply),
        graph_version=reply.graph_version,
    )  # fmt: skip


def dense_explain_request(
    model: str, inputs: Mapping[str, np.ndarray], method: str, baselines: Mapping[str, np.ndarray] | None,
    steps: int, target: int | None, version: int,
) -> dense_pb2.ExplainRequest:  # fmt: skip
    request = dense_pb2.ExplainRequest(
        model_name=model, model_version=version, method=method, steps=steps,
        inputs={name: encode(value) for name, value in inputs.items()},
        baselines={name: encode(value) for name, value in (baselines or {}).items()},
    )  # fmt: skip
    if target is not None:
        request.target = target
    return request


def dense_explain(
    lookups: Lookups, model: str, inputs: Mapping[str, np.ndarray] | np.ndarray, method: str,
    baselines: Mapping[str, np.ndarray] | np.ndarray | None, steps: int, target: int | None, version: int,
    timeout: float | None,
) -> Call[DenseExplanation]:  # fmt: skip
    if not isinstance(inputs, Mapping) or (baselines is not None and not isinstance(baselines, Mapping)):
        name = yield from single_input(lookups, model, version)
        inputs = inputs if isinstance(inputs, Mapping) else {name: inputs}
        baselines = baselines if baselines is None or isinstance(baselines, Mapping) else {name: baselines}
    request = dense_explain_request(model, inputs, method, baselines, steps, target, version)
    return dense_explanation((yield Rpc("dense", "Explain", request, timeout)))


def nlp_explain_request(model: str, text: str, method: str, target: int | None, compare_text: str,
                        version: int) -> nlp_pb2.ExplainRequest:  # fmt: skip
    request = nlp_pb2.ExplainRequest(model_name=model, model_version=version, text=text, method=method,
                                     compare_text=compare_text)  # fmt: skip
    if target is not None:
        request.target = target
    return request


def nlp_explain(model: str, text: str, method: str, target: int | None, compare_text: str, version: int,
                timeout: float | None) -> Call[TextExplanation]:  # fmt: skip
    request = nlp_explain_request(model, text, method, target, compare_text, version)
    return text_explanation((yield Rpc("nlp", "Explain", request, timeout)), text)


def gnn_explain_request(
    model: str, node_ids: Iterable[int], node_features: np.ndarray | None, edge_index: np.ndarray | None,
    edge_weight: np.ndarray | None, stored_graph: str, method: str, epochs: int, target: int | None, seed: int,
    version: int, pairs: np.ndarray | None = None, graph_version: int = 0, fan_outs: Iterable[int] = (),
) -> gnn_pb2.ExplainRequest:  # fmt: skip
    """node_ids for a node classifier, pairs (2 x P) for a link predictor, neither for a graph classifier;
    graph_version and fan_outs for a graph-store stored_graph, as for predict."""
    request = gnn_pb2.ExplainRequest(model_name=model, model_version=version, node_ids=list(node_ids), method=method,
                                     epochs=epochs, seed=seed, graph_version=graph_version,
                                     fan_outs=list(fan_outs))  # fmt: skip
    if pairs is not None:
        request.pairs.CopyFrom(encode(np.asarray(pairs, np.int64)))
    if stored_graph:
        request.stored_graph = stored_graph
    elif node_features is not None and edge_index is not None:
        request.graph.node_features.CopyFrom(encode(np.asarray(node_features, np.float32)))
        request.graph.edge_index.CopyFrom(encode(np.asarray(edge_index, np.int64)))
        if edge_weight is not None:
            request.graph.edge_weight.CopyFrom(encode(np.asarray(edge_weight, np.float32)))
    else:
        raise ValueError("pass stored_graph, or node_features and edge_index")
    if target is not None:
        request.target = target
    return request


def gnn_explain(request: gnn_pb2.ExplainRequest, timeout: float | None) -> Call[GraphExplanation]:
    return graph_explanation((yield Rpc("gnn", "Explain", request, timeout)))


def nlp_similarity(model: str, query: str, candidates: Sequence[str], version: int, error_on_truncation: bool,
                   timeout: float | None, rerank_label: str = "") -> Call[Similarity]:  # fmt: skip
    truncation = nlp_pb2.TRUNCATION_ERROR if error_on_truncation else nlp_pb2.TRUNCATION_CUT
    request = nlp_pb2.SimilarityRequest(model_name=model, model_version=version, query=query,
                                        candidates=list(candidates), truncation=truncation,
                                        rerank_label=rerank_label)  # fmt: skip
    reply = yield Rpc("nlp", "Similarity", request, timeout)
    reranked = bool(rerank_label)
    return Similarity(reply.model_name, reply.model_version, np.array(reply.scores, np.float32),
                      np.array(reply.ranking, np.int64),
                      np.array([count.truncated for count in reply.candidate_tokens], bool),
                      np.array(reply.label_probabilities, np.float32) if reranked else None,
                      np.array(reply.reranking, np.int64) if reranked else None)  # fmt: skip


@dataclass(frozen=True)
class ExplanationJob:
    """An explanation job's record and, once it succeeded, its explanation."""

    job: gateway_pb2.ExplanationJob
    explanation: Explanation | None

    @property
    def state(self) -> str:
        return state_name(self.job.state)


def _explanation_job(reply: gateway_pb2.GetExplanationResponse | gateway_pb2.SubmitExplanationResponse,
                     text: str = "") -> ExplanationJob:  # fmt: skip
    kind = reply.WhichOneof("result") if isinstance(reply, gateway_pb2.GetExplanationResponse) else None
    explanation: Explanation | None = None
    if kind == "dense":
        explanation = dense_explanation(reply.dense)
    elif kind == "nlp":
        explanation = text_explanation(reply.nlp, text)
    elif kind == "gnn":
        explanation = graph_explanation(reply.gnn)
    return ExplanationJob(reply.job, explanation)


def explanation_submit(request: Any, idempotency_key: str = "", timeout: float | None = None) -> Call[ExplanationJob]:
    """Queues a family's ExplainRequest (dense_pb2, gnn_pb2 or nlp_pb2) as a job."""
    family = request.DESCRIPTOR.full_name.split(".")[1]
    submit = gateway_pb2.SubmitExplanationRequest(idempotency_key=idempotency_key or uuid.uuid4().hex)
    getattr(submit, family).CopyFrom(request)
    return _explanation_job((yield Rpc("explanations", "SubmitExplanation", submit, timeout)))


def explanation_get(job_id: str, text: str = "", timeout: float | None = None) -> Call[ExplanationJob]:
    reply = yield Rpc("explanations", "GetExplanation", gateway_pb2.GetExplanationRequest(job_id=job_id), timeout)
    return _explanation_job(reply, text)


# --- the model repository ------------------------------------------------------------------


def models_list(lookups: Lookups, family: str | None) -> Call[list[tuple[str, model_pb2.Model]]]:
    """(family, model) for every loaded model the caller may see: one rpc to the gateway's ModelService."""
    reply = yield Rpc("models", "ListModels", models_pb2.ListModelsRequest(family=family or ""))
    found = []
    for model in reply.models:
        name = model_family(model)
        lookups.families[model.name] = name
        found.append((name, model))
    return sorted(found, key=lambda pair: (FAMILIES.index(pair[0]) if pair[0] in FAMILIES else 99, pair[1].name))


def model_family(model: model_pb2.Model) -> str:
    return next((v.family for v in model.versions if v.family), "")


def family_of(lookups: Lookups, model: str) -> Call[str]:
    """The family serving `model`, from the store's manifests through the gateway (loaded or not)."""
    if model not in lookups.families:
        listing = yield from models_versions(lookups, model)
        lookups.families[model] = next((v.family for v in listing.versions if v.family), "")
    return lookups.families[model]


def models_get(lookups: Lookups, model: str) -> Call[model_pb2.Model]:
    reply = yield Rpc("models", "GetModel", models_pb2.GetModelRequest(model_name=model))
    lookups.families[model] = model_family(reply.model)
    return reply.model


def models_versions(lookups: Lookups, model: str) -> Call[models_pb2.ListModelVersionsResponse]:
    return (yield Rpc("models", "ListModelVersions", models_pb2.ListModelVersionsRequest(model_name=model)))


def models_load(lookups: Lookups, model: str, version: int) -> Call[model_pb2.ModelVersion]:
    request = models_pb2.LoadModelRequest(model_name=model, model_version=version)
    return (yield Rpc("models", "LoadModel", request)).version


def models_unload(lookups: Lookups, model: str, version: int) -> Call[None]:
    yield Rpc("models", "UnloadModel", models_pb2.UnloadModelRequest(model_name=model, model_version=version))


def models_promote(lookups: Lookups, model: str, version: int) -> Call[model_pb2.Model]:
    # Only a ready version can be the default: load it first (a no-op when it is loaded).
    yield from models_load(lookups, model, version)
    request = models_pb2.SetDefaultVersionRequest(model_name=model, model_version=version)
    return (yield Rpc("models", "SetDefaultVersion", request)).model


def models_canary(lookups: Lookups, model: str, version: int, percent: int) -> Call[model_pb2.Model]:
    if percent:  # only a ready version can take traffic: load it first (a no-op when it is loaded)
        yield from models_load(lookups, model, version)
    request = models_pb2.SetCanaryRequest(model_name=model, model_version=version, percent=percent)
    return (yield Rpc("models", "SetCanary", request)).model


def models_shadow(lookups: Lookups, model: str, version: int, percent: int) -> Call[model_pb2.Model]:
    if percent:  # only a ready version can get copies: load it first (a no-op when it is loaded)
        yield from models_load(lookups, model, version)
    request = models_pb2.SetShadowRequest(model_name=model, model_version=version, percent=percent)
    return (yield Rpc("models", "SetShadow", request)).model


def models_rollback(lookups: Lookups, model: str) -> Call[model_pb2.Model]:
    listing = yield from models_versions(lookups, model)
    older = [
        v.version
        for v in listing.versions
        if v.version < listing.default_version and v.state != model_pb2.MODEL_STATE_FAILED
    ]
    if not older:
        raise errors.FailedPrecondition(
            f"{model} has no version older than its default v{listing.default_version} to roll back to",
            method="rollback",
        )
    return (yield from models_promote(lookups, model, max(older)))


# --- data sets and training ----------------------------------------------------------------


def datasets_upload(
    path: str | Path,
    family: str | int,
    format: str | int | None,
    name: str,
    progress: Callable[[int, int], None] | None,
    timeout: float | None,
) -> Call[training_pb2.Dataset]:
    path = Path(path)
    if format is None:
        if path.suffix.lower() not in _DATASET_FORMATS:
            raise ValueError(f"cannot tell the format of {path.name}; expected one of {sorted(_DATASET_FORMATS)}")
        code = _DATASET_FORMATS[path.suffix.lower()]
    elif isinstance(format, str):
        code = training_pb2.DatasetFormat.Value(f"DATASET_FORMAT_{format.upper()}")
    else:
        code = format
    total = path.stat().st_size
    info = training_pb2.DatasetInfo(name=name or path.stem, family=family_code(family), format=code)

    def parts() -> Iterator[training_pb2.UploadDatasetRequest]:
        yield training_pb2.UploadDatasetRequest(info=info)
        sent = 0
        with path.open("rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                yield training_pb2.UploadDatasetRequest(chunk=chunk)
                sent += len(chunk)
                if progress:
                    progress(sent, total)

    return (yield Rpc("training", "UploadDataset", parts(), timeout)).dataset


def datasets_get(dataset_id: str) -> Call[training_pb2.Dataset]:
    return (yield Rpc("training", "GetDataset", training_pb2.GetDatasetRequest(dataset_id=dataset_id))).dataset


def datasets_list(family: str | None) -> Call[training_pb2.ListDatasetsResponse]:
    request = training_pb2.ListDatasetsRequest(family=family_code(family) if family else 0)
    return (yield Rpc("training", "ListDatasets", request))


def training_submit(family: str | int, architecture: str, options: SubmitOptions) -> Call[training_pb2.Job]:
    """Queues a job; without an idempotency key the SDK makes one, so a retry never queues twice."""
    unknown = set(options) - set(SubmitOptions.__annotations__)
    if unknown:
        raise TypeError(f"training.submit got unknown options {sorted(unknown)}")
    request = training_pb2.SubmitJobRequest(
        family=family_code(family),
        architecture=architecture,
        hidden_sizes=list(options.get("hidden_sizes", ())),
        optimizer=training_pb2.Optimizer.Value(f"OPTIMIZER_{options.get('optimizer', 'adam').upper()}"),
        epochs=options.get("epochs", 0),
        batch_size=options.get("batch_size", 0),
        validation_split=options.get("validation_split", 0.0),
        k_folds=options.get("k_folds", 0),
        output_model=options.get("output_model", ""),
        idempotency_key=options.get("idempotency_key") or str(uuid.uuid4()),
        seed=options.get("seed", 0),
        private=options.get("private", False),
        drop_columns=list(options.get("drop_columns", ())),
        mask_columns=list(options.get("mask_columns", ())),
        world_size=options.get("world_size", 0),
    )
    if options.get("learning_rate") is not None:
        request.learning_rate = options["learning_rate"]
    if options.get("dataset_id"):
        request.dataset_id = options["dataset_id"]
    elif options.get("dataset"):
        request.builtin_dataset = options["dataset"]
    else:
        raise ValueError("pass dataset (a built-in data set's name) or dataset_id (an uploaded one)")
    gate = {key: options.get(key) for key in ("gate_metric", "gate_min", "gate_max", "better_than_default")}
    if any(value not in (None, "", False) for value in gate.values()):
        request.gate.metric = gate["gate_metric"] or ""
        request.gate.better_than_default = bool(gate["better_than_default"])
        if gate["gate_min"] is not None:
            request.gate.min_value = gate["gate_min"]
        if gate["gate_max"] is not None:
            request.gate.max_value = gate["gate_max"]
    return (yield Rpc("training", "SubmitJob", request, options.get("timeout"))).job


def keys_rotate(to_kek_id: str, tenant: str, timeout: float | None) -> Call[list[keys_pb2.StoreRotation]]:
    """Re-wraps the stores' data keys under KEK `to_kek_id` (admin only); what each store did."""
    request = keys_pb2.RotateKeysRequest(to_kek_id=to_kek_id, tenant=tenant)
    return list((yield Rpc("keys", "RotateKeys", request, timeout)).stores)


def keys_list(timeout: float | None) -> Call[list[keys_pb2.StoreKeys]]:
    return list((yield Rpc("keys", "ListKeys", keys_pb2.ListKeysRequest(), timeout)).stores)


def training_get(job_id: str) -> Call[training_pb2.Job]:
    return (yield Rpc("training", "GetJob", training_pb2.GetJobRequest(job_id=job_id))).job


def training_list(family: str | None, limit: int) -> Call[list[training_pb2.Job]]:
    request = training_pb2.ListJobsRequest(family=family_code(family) if family else 0, limit=limit)
    return list((yield Rpc("training", "ListJobs", request)).jobs)


def training_cancel(job_id: str) -> Call[training_pb2.Job]:
    return (yield Rpc("training", "CancelJob", training_pb2.CancelJobRequest(job_id=job_id))).job


@dataclass
class WatchResume:
    """Where a job watch is: the server replays a job's history on every WatchJob, so after a
    reconnect the events already handed out are skipped."""

    job_id: str
    reconnects: int
    seen: int = 0
    failures: int = 0

    def request(self) -> training_pb2.WatchJobRequest:
        return training_pb2.WatchJobRequest(job_id=self.job_id)

    def fresh(self, index: int) -> bool:
        """Whether the stream's `index`-th event is new; counts it if so."""
        if index < self.seen:
            return False
        self.seen, self.failures = self.seen + 1, 0
        return True

    def backoff_s(self) -> float | None:
        """Seconds to wait before reopening a cut stream; None once the reconnects are spent."""
        self.failures += 1
        return None if self.failures > self.reconnects else min(0.2 * 2**self.failures, 5.0)


# --- health --------------------------------------------------------------------------------


def health(timeout: float | None) -> Call[dict[str, str]]:
    """The gateway's own health ("gateway") and each family's, as the gateway sees its backends."""
    report = {}
    for label, service in {"gateway": "", **{family: SERVICES[family] for family in FAMILIES}}.items():
        reply = yield Rpc("health", "Check", health_pb2.HealthCheckRequest(service=service), timeout)
        report[label] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return report
