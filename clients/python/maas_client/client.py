"""The maas Python SDK: one `Client` per gateway, numpy in and out.

    from maas_client import Client

    with Client("maas.example.com:443", api_key="...", tls=True) as maas:
        labels = maas.dense.predict("digits-mlp", pixels)["label"]
        vectors = maas.nlp.embed(["a sentence", "another"])
        job = maas.training.submit("dense", "mlp", dataset="iris", epochs=5, output_model="iris-mlp")
        final = maas.training.wait(job.job_id)

Every call carries a deadline (`timeout`, 30 s unless given), and calls that fail with UNAVAILABLE
are retried with exponential backoff by gRPC's own retry policy. Failures raise `MaasError`
subclasses carrying the gRPC status and the server's message. `maas_client.aio.AsyncClient` is
the same API for asyncio.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Unpack

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2_grpc
from maas.gateway.v1 import gateway_pb2_grpc
from maas.gnn.v1 import gnn_pb2_grpc
from maas.keys.v1 import keys_pb2, keys_pb2_grpc
from maas.models.v1 import models_pb2_grpc
from maas.nlp.v1 import nlp_pb2_grpc
from maas.training.v1 import training_pb2, training_pb2_grpc
from maas_client import calls, errors
from maas_client.calls import (
    FAMILIES,
    TERMINAL_STATES,
    DenseExplanation,
    ExplanationJob,
    GraphExplanation,
    GraphPrediction,
    GraphVersion,
    Prediction,
    Recommendations,
    Similarity,
    SubmitOptions,
    TextExplanation,
    family_code,
    family_name,
    state_name,
)
from maas_client.connection import Connection, ConnectionSettings

__all__ = [
    "FAMILIES",
    "TERMINAL_STATES",
    "Client",
    "DenseExplanation",
    "ExplanationJob",
    "GraphExplanation",
    "Similarity",
    "TextExplanation",
    "GraphPrediction",
    "GraphVersion",
    "Prediction",
    "Recommendations",
    "family_code",
    "family_name",
    "state_name",
]

STUBS = {
    "dense": dense_pb2_grpc.DenseServiceStub,
    "gnn": gnn_pb2_grpc.GnnServiceStub,
    "nlp": nlp_pb2_grpc.NlpServiceStub,
    "models": models_pb2_grpc.ModelServiceStub,
    "training": training_pb2_grpc.TrainingServiceStub,
    "keys": keys_pb2_grpc.KeyServiceStub,
    "explanations": gateway_pb2_grpc.ExplanationServiceStub,
    "health": health_pb2_grpc.HealthStub,
}


class DenseApi:
    """Dense models (MLP, CNN, GRU) served with ONNX Runtime."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | np.ndarray,
        *,
        version: int = 0,
        outputs: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Prediction:
        """Runs a model. A bare array goes to the model's only input."""
        return self._client.run(calls.dense_predict(self._client.lookups, model, inputs, version, outputs, timeout))

    def explain(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | np.ndarray,
        *,
        method: str = "",
        baselines: Mapping[str, np.ndarray] | np.ndarray | None = None,
        steps: int = 0,
        target: int | None = None,
        version: int = 0,
        timeout: float | None = None,
    ) -> DenseExplanation:
        """Attributions of each row's prediction to its features, as numpy arrays in the inputs' shapes.

        `method`: "integrated_gradients" (the default where the version has a torch form), "feature_ablation"
        or "kernel_shap"; `baselines` default to zeros; `target` defaults to each row's predicted class."""
        return self._client.run(calls.dense_explain(self._client.lookups, model, inputs, method, baselines, steps,
                                                    target, version, timeout))  # fmt: skip


class GnnApi:
    """Graph models: node classification on a graph sent inline or stored with the model."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def predict(
        self,
        model: str,
        *,
        node_features: np.ndarray | None = None,
        edge_index: np.ndarray | None = None,
        edge_weight: np.ndarray | None = None,
        stored_graph: str = "",
        node_ids: Iterable[int] = (),
        version: int = 0,
        timeout: float | None = None,
        graph_version: int = 0,
        fan_outs: Iterable[int] = (),
    ) -> GraphPrediction:
        """Predicts for `node_ids` (all nodes when empty) of an inline graph or a stored one; on a stored
        graph, over their neighbourhood sampled with `fan_outs` (per hop; -1 takes every neighbour)."""
        return self._client.run(
            calls.gnn_predict(model, node_features, edge_index, edge_weight, stored_graph, node_ids, version, timeout,
                              graph_version, fan_outs)  # fmt: skip
        )

    def links(
        self,
        model: str,
        *,
        stored_graph: str = "",
        node_features: np.ndarray | None = None,
        edge_index: np.ndarray | None = None,
        pairs: np.ndarray | None = None,
        node_ids: Iterable[int] = (),
        top_k: int = 0,
        graph_version: int = 0,
        fan_outs: Iterable[int] = (),
        version: int = 0,
        timeout: float | None = None,
    ) -> GraphPrediction:
        """Link probabilities for `pairs` (2 x P) ("scores"), and with `top_k` each of `node_ids`' likeliest
        new neighbours ("neighbors", "neighbor_scores")."""
        return self._client.run(
            calls.gnn_links(model, node_features, edge_index, stored_graph, graph_version, pairs, node_ids, top_k,
                            fan_outs, version, timeout)  # fmt: skip
        )

    def recommend(
        self, model: str, user_ids: Iterable[int], *, top_k: int = 10, include_seen: bool = False,
        stored_graph: str = "", graph_version: int = 0, version: int = 0, timeout: float | None = None,
    ) -> Recommendations:  # fmt: skip
        """Each user's `top_k` items from a recommender, best first, on the latest version of its user-item graph
        (or `stored_graph`, `graph_version`); the items a user has interacted with are left out unless
        `include_seen`. Users with no interactions get the most popular items (`popularity_fallback`)."""
        return self._client.run(calls.gnn_recommend(model, user_ids, top_k, include_seen, stored_graph,
                                                      graph_version, version, timeout))  # fmt: skip

    def similar_items(
        self, model: str, item_ids: Iterable[int], *, top_k: int = 10, by: str = "", stored_graph: str = "",
        graph_version: int = 0, version: int = 0, timeout: float | None = None,
    ) -> Recommendations:  # fmt: skip
        """Each item's `top_k` most similar items, by the cosine of their content vectors (`by` "content", the
        default where the graph has them) or of their propagated embeddings ("collaborative")."""
        return self._client.run(calls.gnn_similar_items(model, item_ids, top_k, by, stored_graph, graph_version,
                                                          version, timeout))  # fmt: skip

    def classify(
        self, model: str, graphs: Sequence[tuple[np.ndarray, np.ndarray]], *, version: int = 0,
        timeout: float | None = None,
    ) -> Prediction:  # fmt: skip
        """One label per (node_features, edge_index) graph: "probabilities" and "label"."""
        return self._client.run(calls.gnn_classify(model, graphs, version, timeout))

    def update_graph(
        self, name: str, *, node_features: np.ndarray | None = None, edge_index: np.ndarray | None = None,
        base_version: int = 0, new_graph_name: str = "", timeout: float | None = None,
    ) -> GraphVersion:  # fmt: skip
        """Adds nodes (ids from the graph's node count on) and edges to a stored graph, as a new version; with
        `new_graph_name`, as a new graph of that name, private to the caller's tenant."""
        return self._client.run(calls.gnn_update_graph(name, node_features, edge_index, base_version, timeout,
                                                          new_graph_name))  # fmt: skip

    def delete_graph_version(self, name: str, version: int, *, timeout: float | None = None) -> list[int]:
        """Deletes one version of a stored graph (not the latest, nor a delta's base); returns the versions left."""
        return self._client.run(calls.gnn_delete_graph_version(name, version, timeout))

    def explain(
        self,
        model: str,
        node_ids: Iterable[int] = (),
        *,
        node_features: np.ndarray | None = None,
        edge_index: np.ndarray | None = None,
        edge_weight: np.ndarray | None = None,
        stored_graph: str = "",
        pairs: np.ndarray | None = None,
        graph_version: int = 0,
        fan_outs: Iterable[int] = (),
        method: str = "",
        epochs: int = 0,
        target: int | None = None,
        seed: int = 0,
        version: int = 0,
        timeout: float | None = None,
    ) -> GraphExplanation:
        """The edges and node features a prediction rests on: node_ids' labels (node classifiers), the scores
        of pairs, 2 x P (link predictors), or the label of the one graph (graph classifiers, neither given).
        Methods: "gnn_explainer" (default), "integrated_gradients" or "saliency"."""
        request = calls.gnn_explain_request(model, node_ids, node_features, edge_index, edge_weight, stored_graph,
                                            method, epochs, target, seed, version, pairs, graph_version,
                                            fan_outs)  # fmt: skip
        return self._client.run(calls.gnn_explain(request, timeout))


class NlpApi:
    """Language models: sentence embeddings and text classification."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def predict(
        self, model: str, texts: Sequence[str], *, version: int = 0, timeout: float | None = None
    ) -> Prediction:
        return self._client.run(calls.nlp_predict(model, texts, version, timeout))

    def embed(self, texts: Sequence[str], *, model: str = "minilm-l6-v2", timeout: float | None = None) -> np.ndarray:
        """One L2-normalised embedding per text, as an N x D float32 array."""
        return self._client.run(calls.embedding(calls.nlp_predict(model, texts, 0, timeout)))

    def classify(self, texts: Sequence[str], *, model: str = "sentiment", timeout: float | None = None) -> Prediction:
        """Labels (`.labels`) and class probabilities (`["probabilities"]`) for each text."""
        return self._client.run(calls.nlp_predict(model, texts, 0, timeout))

    def explain(
        self,
        model: str,
        text: str,
        *,
        compare_text: str = "",
        method: str = "",
        target: int | None = None,
        version: int = 0,
        timeout: float | None = None,
    ) -> TextExplanation:
        """Per-token attributions of a classifier's label (or of `text`'s similarity to `compare_text`, for an
        embedding model), with each token's character span."""
        return self._client.run(calls.nlp_explain(model, text, method, target, compare_text, version, timeout))

    def similarity(
        self,
        query: str,
        candidates: Sequence[str],
        *,
        model: str = "minilm-l6-v2",
        error_on_truncation: bool = False,
        version: int = 0,
        rerank_label: str = "",
        timeout: float | None = None,
    ) -> Similarity:
        """Cosine similarity of each candidate to the query, and the candidates' ranking, best first; with a
        classifier `model` and `rerank_label`, also the candidates reranked by the head's probability of it."""
        return self._client.run(calls.nlp_similarity(model, query, candidates, version, error_on_truncation, timeout,
                                                     rerank_label))  # fmt: skip


class ExplanationsApi:
    """Explanations as jobs: for the ones that take longer than a call's deadline."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def submit(self, request: Any, *, idempotency_key: str = "", timeout: float | None = None) -> ExplanationJob:
        """Queues a dense_pb2, gnn_pb2 or nlp_pb2 ExplainRequest; returns the queued job."""
        return self._client.run(calls.explanation_submit(request, idempotency_key, timeout))

    def get(self, job_id: str, *, text: str = "", timeout: float | None = None) -> ExplanationJob:
        """The job, and its explanation once it succeeded (`text` fills in an nlp explanation's text)."""
        return self._client.run(calls.explanation_get(job_id, text, timeout))

    def wait(self, job_id: str, *, text: str = "", timeout: float = 3600.0, poll_s: float = 0.5) -> ExplanationJob:
        """Polls the job until it ends; returns it with its explanation (None unless it succeeded)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.get(job_id, text=text)
            if found.job.state in calls.TERMINAL_STATES:
                return found
            if time.monotonic() + poll_s > deadline:
                raise errors.DeadlineExceeded(f"explanation job {job_id} still {found.state} after {timeout:g} s")
            time.sleep(poll_s)


class ModelsApi:
    """The model repository: versions, the default version, loading and unloading."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lookups = client.lookups

    def list(self, family: str | None = None) -> list[tuple[str, model_pb2.Model]]:
        """(family, model) for every model the caller may see, by family then name."""
        return self._client.run(calls.models_list(self._lookups, family))

    def family_of(self, model: str) -> str:
        return self._client.run(calls.family_of(self._lookups, model))

    def get(self, model: str) -> model_pb2.Model:
        return self._client.run(calls.models_get(self._lookups, model))

    def versions(self, model: str) -> Any:
        """The ListModelVersions reply: `default_version`, `default_pinned` and `versions`."""
        return self._client.run(calls.models_versions(self._lookups, model))

    def promote(self, model: str, version: int) -> model_pb2.Model:
        """Loads `version` and makes it the default: it serves every call that names no version."""
        return self._client.run(calls.models_promote(self._lookups, model, version))

    def rollback(self, model: str) -> model_pb2.Model:
        """Makes the newest version older than the current default the default again."""
        return self._client.run(calls.models_rollback(self._lookups, model))

    def canary(self, model: str, version: int, percent: int) -> model_pb2.Model:
        """Loads `version` and sends it `percent` (1 to 99) of the calls that name no version, split by
        request id; percent 0 ends the split. Promoting or rolling back ends it too."""
        return self._client.run(calls.models_canary(self._lookups, model, version, percent))

    def shadow(self, model: str, version: int, percent: int) -> model_pb2.Model:
        """Loads `version` and sends it copies of `percent` (1 to 100) of the calls that name no version,
        after each caller has its answer; the copies' answers are compared in metrics, never returned.
        Percent 0 stops the copies."""
        return self._client.run(calls.models_shadow(self._lookups, model, version, percent))

    def load(self, model: str, version: int) -> model_pb2.ModelVersion:
        return self._client.run(calls.models_load(self._lookups, model, version))

    def unload(self, model: str, version: int) -> None:
        self._client.run(calls.models_unload(self._lookups, model, version))

    def wait_ready(self, model: str, version: int = 0, *, timeout: float = 60.0,
                   poll_s: float = 0.2) -> model_pb2.Model:  # fmt: skip
        """Waits until `version` of `model` (0: any version) is loaded and serving, as after a training job
        wrote it: its services load a new version within moments. Raises NotFound or DeadlineExceeded when it
        is not serving after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = self.get(model)
                if calls.serving(found, version):
                    return found
                failure: errors.MaasError = errors.DeadlineExceeded(
                    f"{model} v{version or 'any'} is not serving after {timeout:g} s", method="wait_ready"
                )
            except errors.NotFound as missing:
                failure = missing
            if time.monotonic() + poll_s > deadline:
                raise failure
            time.sleep(poll_s)


class DatasetsApi:
    """Data sets for training: uploaded in chunks, listed and described."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(
        self,
        path: str | os.PathLike,
        family: str | int,
        *,
        format: str | int | None = None,
        name: str = "",
        progress: Callable[[int, int], None] | None = None,
        timeout: float | None = 600.0,
    ) -> training_pb2.Dataset:
        """Streams a file; the format comes from its suffix (.npz, .csv, .json, .jsonl) unless given.

        `progress(sent_bytes, total_bytes)` is called after each chunk is handed to gRPC.
        """
        return self._client.run(calls.datasets_upload(path, family, format, name, progress, timeout))

    def get(self, dataset_id: str) -> training_pb2.Dataset:
        return self._client.run(calls.datasets_get(dataset_id))

    def list(self, family: str | None = None) -> training_pb2.ListDatasetsResponse:
        """The caller's uploaded data sets (`.datasets`, newest first) and the built-in ones."""
        return self._client.run(calls.datasets_list(family))


class TrainingApi:
    """Training jobs: queued in Redis, trained, evaluated, and written as new model versions."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def submit(self, family: str | int, architecture: str, **options: Unpack[SubmitOptions]) -> training_pb2.Job:
        """Queues a job on a built-in `dataset` or an uploaded `dataset_id`; returns the queued job."""
        return self._client.run(calls.training_submit(family, architecture, options))

    def get(self, job_id: str) -> training_pb2.Job:
        return self._client.run(calls.training_get(job_id))

    def list(self, family: str | None = None, limit: int = 100) -> list[training_pb2.Job]:
        return self._client.run(calls.training_list(family, limit))

    def cancel(self, job_id: str) -> training_pb2.Job:
        return self._client.run(calls.training_cancel(job_id))

    def watch(
        self, job_id: str, *, timeout: float | None = 3600.0, reconnects: int | None = None
    ) -> Iterator[training_pb2.JobEvent]:
        """The job's events: its history first, then each new one, ending after a terminal state.

        A stream cut by UNAVAILABLE (a gateway restarting, a connection dropped) is opened again,
        up to `reconnects` times in a row (the client's max_attempts - 1 unless given), and the
        events already yielded are skipped. `timeout=None` watches with no deadline.
        """
        attempts = self._client.connection.max_attempts
        resume = calls.WatchResume(job_id, attempts - 1 if reconnects is None else reconnects)
        deadline = None if timeout is None else time.monotonic() + timeout
        stub = self._client.stubs["training"]
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                stream = stub.WatchJob(resume.request(), timeout=remaining, metadata=self._client.connection.metadata)
                for index, reply in enumerate(stream):
                    if resume.fresh(index):
                        yield reply.event
                return
            except grpc.RpcError as error:
                failure = errors.from_rpc_error(error, "WatchJob")
            if not isinstance(failure, errors.Unavailable):
                raise failure
            pause = resume.backoff_s()
            if pause is None or (deadline is not None and time.monotonic() + pause >= deadline):
                raise failure
            time.sleep(pause)

    def wait(
        self,
        job_id: str,
        *,
        on_event: Callable[[training_pb2.JobEvent], None] | None = None,
        timeout: float | None = 3600.0,
    ) -> training_pb2.Job:
        """Watches a job to its end and returns its final record (metrics, version, gate result)."""
        for event in self.watch(job_id, timeout=timeout):
            if on_event:
                on_event(event)
        return self.get(job_id)


class KeysApi:
    """The key-encryption keys (KEKs) of the stores; admin only."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def rotate(
        self, to_kek_id: str, *, tenant: str = "", timeout: float | None = 600.0
    ) -> list[keys_pb2.StoreRotation]:
        """Re-wraps every data key under `to_kek_id` (only `tenant`'s, when given), without re-encrypting
        anything; what each store did, with its errors. Once no store reports any, the old KEK can go."""
        return self._client.run(calls.keys_rotate(to_kek_id, tenant, timeout))

    def list(self, *, timeout: float | None = None) -> list[keys_pb2.StoreKeys]:
        """Per store: the KEK new data keys get, the KEK ids available, and data keys per KEK."""
        return self._client.run(calls.keys_list(timeout))


class Client:
    """A connection to a maas gateway; `settings` are those of `maas_client.connection.Connection`."""

    def __init__(self, target: str | None = None, **settings: Unpack[ConnectionSettings]) -> None:
        self.connection = Connection.of(target, **settings)
        self.target = self.connection.target
        if self.connection.credentials is not None:
            self.channel = grpc.secure_channel(self.target, self.connection.credentials, self.connection.options)
        else:
            self.channel = grpc.insecure_channel(self.target, self.connection.options)
        self.stubs = {name: stub(self.channel) for name, stub in STUBS.items()}
        self.lookups = calls.Lookups()
        self.dense = DenseApi(self)
        self.gnn = GnnApi(self)
        self.nlp = NlpApi(self)
        self.models = ModelsApi(self)
        self.datasets = DatasetsApi(self)
        self.training = TrainingApi(self)
        self.keys = KeysApi(self)
        self.explanations = ExplanationsApi(self)

    def health(self, timeout: float | None = 5.0) -> dict[str, str]:
        """The gateway's health ("gateway") and each family's, as the gateway sees its backends."""
        return self.run(calls.health(timeout))

    def run(self, call: calls.Call[calls.T]) -> calls.T:
        """Runs a call from `maas_client.calls` with blocking gRPC."""
        outcome: Any = None
        failure: errors.MaasError | None = None
        while True:
            try:
                rpc = call.send(outcome) if failure is None else call.throw(failure)
            except StopIteration as done:
                return done.value
            method = getattr(self.stubs[rpc.service], rpc.method)
            try:
                outcome, failure = (
                    method(
                        rpc.request, timeout=self.connection.timeout_of(rpc.timeout), metadata=self.connection.metadata
                    ),
                    None,
                )
            except grpc.RpcError as error:
                outcome, failure = None, errors.from_rpc_error(error, rpc.method)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
