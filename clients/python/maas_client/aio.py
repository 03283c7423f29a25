"""The maas Python SDK for asyncio: `AsyncClient` is `Client` over grpc.aio, with awaitable calls.

    from maas_client.aio import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as maas:
        predictions = await asyncio.gather(*(maas.dense.predict("digits-mlp", x) for x in batches))
        async for event in maas.training.watch(job_id):
            ...

Deadlines, retries on UNAVAILABLE, errors and results are those of `maas_client.client.Client`:
both run the same calls from `maas_client.calls`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Unpack

import grpc
import numpy as np

from maas.common.v1 import model_pb2
from maas.keys.v1 import keys_pb2
from maas.training.v1 import training_pb2
from maas_client import calls, errors
from maas_client.calls import GraphPrediction, GraphVersion, Prediction, Recommendations, SubmitOptions
from maas_client.client import STUBS
from maas_client.connection import Connection, ConnectionSettings


class AsyncDenseApi:
    """Dense models (MLP, CNN, GRU) served with ONNX Runtime."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | np.ndarray,
        *,
        version: int = 0,
        outputs: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Prediction:
        """Runs a model. A bare array goes to the model's only input."""
        return await self._client.run(
            calls.dense_predict(self._client.lookups, model, inputs, version, outputs, timeout)
        )

    async def explain(
        self, model: str, inputs: Mapping[str, np.ndarray] | np.ndarray, *, method: str = "",
        baselines: Mapping[str, np.ndarray] | np.ndarray | None = None, steps: int = 0, target: int | None = None,
        version: int = 0, timeout: float | None = None,
    ) -> calls.DenseExplanation:  # fmt: skip
        """As `Client.dense.explain`."""
        return await self._client.run(calls.dense_explain(self._client.lookups, model, inputs, method, baselines,
                                                          steps, target, version, timeout))  # fmt: skip


class AsyncGnnApi:
    """Graph models: node classification on a graph sent inline or stored with the model."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def predict(
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
        return await self._client.run(
            calls.gnn_predict(model, node_features, edge_index, edge_weight, stored_graph, node_ids, version, timeout,
                              graph_version, fan_outs)  # fmt: skip
        )

    async def links(
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
        return await self._client.run(
            calls.gnn_links(model, node_features, edge_index, stored_graph, graph_version, pairs, node_ids, top_k,
                            fan_outs, version, timeout)  # fmt: skip
        )

    async def recommend(
        self, model: str, user_ids: Iterable[int], *, top_k: int = 10, include_seen: bool = False,
        stored_graph: str = "", graph_version: int = 0, version: int = 0, timeout: float | None = None,
    ) -> Recommendations:  # fmt: skip
        """Each user's `top_k` items from a recommender, best first, on the latest version of its user-item graph
        (or `stored_graph`, `graph_version`); the items a user has interacted with are left out unless
        `include_seen`. Users with no interactions get the most popular items (`popularity_fallback`)."""
        return await self._client.run(calls.gnn_recommend(model, user_ids, top_k, include_seen, stored_graph,
                                                      graph_version, version, timeout))  # fmt: skip

    async def similar_items(
        self, model: str, item_ids: Iterable[int], *, top_k: int = 10, by: str = "", stored_graph: str = "",
        graph_version: int = 0, version: int = 0, timeout: float | None = None,
    ) -> Recommendations:  # fmt: skip
        """Each item's `top_k` most similar items, by the cosine of their content vectors (`by` "content", the
        default where the graph has them) or of their propagated embeddings ("collaborative")."""
        return await self._client.run(calls.gnn_similar_items(model, item_ids, top_k, by, stored_graph, graph_version,
                                                          version, timeout))  # fmt: skip

    async def classify(
        self, model: str, graphs: Sequence[tuple[np.ndarray, np.ndarray]], *, version: int = 0,
        timeout: float | None = None,
    ) -> Prediction:  # fmt: skip
        """One label per (node_features, edge_index) graph: "probabilities" and "label"."""
        return await self._client.run(calls.gnn_classify(model, graphs, version, timeout))

    async def update_graph(
        self, name: str, *, node_features: np.ndarray | None = None, edge_index: np.ndarray | None = None,
        base_version: int = 0, new_graph_name: str = "", timeout: float | None = None,
    ) -> GraphVersion:  # fmt: skip
        """Adds nodes (ids from the graph's node count on) and edges to a stored graph, as a new version; with
        `new_graph_name`, as a new graph of that name, private to the caller's tenant."""
        return await self._client.run(calls.gnn_update_graph(name, node_features, edge_index, base_version, timeout,
                                                          new_graph_name))  # fmt: skip

    async def delete_graph_version(self, name: str, version: int, *, timeout: float | None = None) -> list[int]:
        """Deletes one version of a stored graph (not the latest, nor a delta's base); returns the versions left."""
        return await self._client.run(calls.gnn_delete_graph_version(name, version, timeout))

    async def explain(
        self, model: str, node_ids: Iterable[int] = (), *, node_features: np.ndarray | None = None,
        edge_index: np.ndarray | None = None, edge_weight: np.ndarray | None = None, stored_graph: str = "",
        pairs: np.ndarray | None = None, graph_version: int = 0, fan_outs: Iterable[int] = (), method: str = "",
        epochs: int = 0, target: int | None = None, seed: int = 0, version: int = 0, timeout: float | None = None,
    ) -> calls.GraphExplanation:  # fmt: skip
        """As `Client.gnn.explain`."""
        request = calls.gnn_explain_request(model, node_ids, node_features, edge_index, edge_weight, stored_graph,
                                            method, epochs, target, seed, version, pairs, graph_version,
                                            fan_outs)  # fmt: skip
        return await self._client.run(calls.gnn_explain(request, timeout))


class AsyncNlpApi:
    """Language models: sentence embeddings and text classification."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def predict(
        self, model: str, texts: Sequence[str], *, version: int = 0, timeout: float | None = None
    ) -> Prediction:
        return await self._client.run(calls.nlp_predict(model, texts, version, timeout))

    async def embed(
        self, texts: Sequence[str], *, model: str = "minilm-l6-v2", timeout: float | None = None
    ) -> np.ndarray:
        """One L2-normalised embedding per text, as an N x D float32 array."""
        return await self._client.run(calls.embedding(calls.nlp_predict(model, texts, 0, timeout)))

    async def classify(
        self, texts: Sequence[str], *, model: str = "sentiment", timeout: float | None = None
    ) -> Prediction:
        """Labels (`.labels`) and class probabilities (`["probabilities"]`) for each text."""
        return await self._client.run(calls.nlp_predict(model, texts, 0, timeout))

    async def explain(
        self, model: str, text: str, *, compare_text: str = "", method: str = "", target: int | None = None,
        version: int = 0, timeout: float | None = None,
    ) -> calls.TextExplanation:  # fmt: skip
        """As `Client.nlp.explain`."""
        return await self._client.run(calls.nlp_explain(model, text, method, target, compare_text, version, timeout))

    async def similarity(
        self, query: str, candidates: Sequence[str], *, model: str = "minilm-l6-v2", error_on_truncation: bool = False,
        version: int = 0, rerank_label: str = "", timeout: float | None = None,
    ) -> calls.Similarity:  # fmt: skip
        """As `Client.nlp.similarity`."""
        return await self._client.run(calls.nlp_similarity(model, query, candidates, version, error_on_truncation,
                                                           timeout, rerank_label))  # fmt: skip


class AsyncModelsApi:
    """The model repository: versions, the default version, loading and unloading."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._lookups = client.lookups

    async def list(self, family: str | None = None) -> list[tuple[str, model_pb2.Model]]:
        """(family, model) for every model the caller may see, by family then name."""
        return await self._client.run(calls.models_list(self._lookups, family))

    async def family_of(self, model: str) -> str:
        return await self._client.run(calls.family_of(self._lookups, model))

    async def get(self, model: str) -> model_pb2.Model:
        return await self._client.run(calls.models_get(self._lookups, model))

    async def versions(self, model: str) -> Any:
        """The ListModelVersions reply: `default_version`, `default_pinned` and `versions`."""
        return await self._client.run(calls.models_versions(self._lookups, model))

    async def promote(self, model: str, version: int) -> model_pb2.Model:
        """Loads `version` and makes it the default: it serves every call that names no version."""
        return await self._client.run(calls.models_promote(self._lookups, model, version))

    async def rollback(self, model: str) -> model_pb2.Model:
        """Makes the newest version older than the current default the default again."""
        return await self._client.run(calls.models_rollback(self._lookups, model))

    async def canary(self, model: str, version: int, percent: int) -> model_pb2.Model:
        """Loads `version` and sends it `percent` (1 to 99) of the calls that name no version, split by
        request id; percent 0 ends the split. Promoting or rolling back ends it too."""
        return await self._client.run(calls.models_canary(self._lookups, model, version, percent))

    async def shadow(self, model: str, version: int, percent: int) -> model_pb2.Model:
        """Loads `version` and sends it copies of `percent` (1 to 100) of the calls that name no version,
        after each caller has its answer; the copies' answers are compared in metrics, never returned.
        Percent 0 stops the copies."""
        return await self._client.run(calls.models_shadow(self._lookups, model, version, percent))

    async def load(self, model: str, version: int) -> model_pb2.ModelVersion:
        return await self._client.run(calls.models_load(self._lookups, model, version))

    async def unload(self, model: str, version: int) -> None:
        await self._client.run(calls.models_unload(self._lookups, model, version))

    async def wait_ready(self, model: str, version: int = 0, *, timeout: float = 60.0,
                         poll_s: float = 0.2) -> model_pb2.Model:  # fmt: skip
        """Waits until `version` of `model` (0: any version) is loaded and serving (Client.models.wait_ready)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = await self.get(model)
                if calls.serving(found, version):
                    return found
                failure: errors.MaasError = errors.DeadlineExceeded(
                    f"{model} v{version or 'any'} is not serving after {timeout:g} s", method="wait_ready"
                )
            except errors.NotFound as missing:
                failure = missing
            if time.monotonic() + poll_s > deadline:
                raise failure
            await asyncio.sleep(poll_s)


class AsyncDatasetsApi:
    """Data sets for training: uploaded in chunks, listed and described."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(
        self,
        path: str | os.PathLike,
        family: str | int,
        *,
        format: str | int | None = None,
        name: str = "",
        progress: Callable[[int, int], None] | None = None,
        timeout: float | None = 600.0,
    ) -> training_pb2.Dataset:
        """Streams a file; the format comes from its suffix (.npz, .csv, .json, .jsonl) unless given."""
        return await self._client.run(calls.datasets_upload(path, family, format, name, progress, timeout))

    async def get(self, dataset_id: str) -> training_pb2.Dataset:
        return await self._client.run(calls.datasets_get(dataset_id))

    async def list(self, family: str | None = None) -> training_pb2.ListDatasetsResponse:
        """The caller's uploaded data sets (`.datasets`, newest first) and the built-in ones."""
        return await self._client.run(calls.datasets_list(family))


class AsyncTrainingApi:
    """Training jobs: queued in Redis, trained, evaluated, and written as new model versions."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def submit(self, family: str | int, architecture: str, **options: Unpack[SubmitOptions]) -> training_pb2.Job:
        """Queues a job on a built-in `dataset` or an uploaded `dataset_id`; returns the queued job."""
        return await self._client.run(calls.training_submit(family, architecture, options))

    async def get(self, job_id: str) -> training_pb2.Job:
        return await self._client.run(calls.training_get(job_id))

    async def list(self, family: str | None = None, limit: int = 100) -> list[training_pb2.Job]:
        return await self._client.run(calls.training_list(family, limit))

    async def cancel(self, job_id: str) -> training_pb2.Job:
        return await self._client.run(calls.training_cancel(job_id))

    async def watch(
        self, job_id: str, *, timeout: float | None = 3600.0, reconnects: int | None = None
    ) -> AsyncIterator[training_pb2.JobEvent]:
        """The job's events, as `Client.training.watch` gives them, reconnecting the same way."""
        attempts = self._client.connection.max_attempts
        resume = calls.WatchResume(job_id, attempts - 1 if reconnects is None else reconnects)
        deadline = None if timeout is None else time.monotonic() + timeout
        stub = self._client.stubs["training"]
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                stream = stub.WatchJob(resume.request(), timeout=remaining, metadata=self._client.connection.metadata)
                index = 0
                async for reply in stream:
                    if resume.fresh(index):
                        yield reply.event
                    index += 1
                return
            except grpc.RpcError as error:
                failure = errors.from_rpc_error(error, "WatchJob")
            if not isinstance(failure, errors.Unavailable):
                raise failure
            pause = resume.backoff_s()
            if pause is None or (deadline is not None and time.monotonic() + pause >= deadline):
                raise failure
            await asyncio.sleep(pause)

    async def wait(
        self,
        job_id: str,
        *,
        on_event: Callable[[training_pb2.JobEvent], None] | None = None,
        timeout: float | None = 3600.0,
    ) -> training_pb2.Job:
        """Watches a job to its end and returns its final record (metrics, version, gate result)."""
        async for event in self.watch(job_id, timeout=timeout):
            if on_event:
                on_event(event)
        return await self.get(job_id)


class AsyncKeysApi:
    """The key-encryption keys (KEKs) of the stores; admin only."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def rotate(
        self, to_kek_id: str, *, tenant: str = "", timeout: float | None = 600.0
    ) -> list[keys_pb2.StoreRotation]:
        """Re-wraps every data key under `to_kek_id` (only `tenant`'s, when given); what each store did."""
        return await self._client.run(calls.keys_rotate(to_kek_id, tenant, timeout))

    async def list(self, *, timeout: float | None = None) -> list[keys_pb2.StoreKeys]:
        return await self._client.run(calls.keys_list(timeout))


class AsyncClient:
    """A grpc.aio connection to a maas gateway; `settings` are those of `Connection`.

    Create it inside the event loop that uses it, and close it (or use `async with`).
    """

    def __init__(self, target: str | None = None, **settings: Unpack[ConnectionSettings]) -> None:
        self.connection = Connection.of(target, **settings)
        self.target = self.connection.target
        if self.connection.credentials is not None:
            self.channel = grpc.aio.secure_channel(self.target, self.connection.credentials, self.connection.options)
        else:
            self.channel = grpc.aio.insecure_channel(self.target, self.connection.options)
        self.stubs = {name: stub(self.channel) for name, stub in STUBS.items()}
        self.lookups = calls.Lookups()
        self.dense = AsyncDenseApi(self)
        self.gnn = AsyncGnnApi(self)
        self.nlp = AsyncNlpApi(self)
        self.models = AsyncModelsApi(self)
        self.datasets = AsyncDatasetsApi(self)
        self.training = AsyncTrainingApi(self)
        self.keys = AsyncKeysApi(self)

    async def health(self, timeout: float | None = 5.0) -> dict[str, str]:
        """The gateway's health ("gateway") and each family's, as the gateway sees its backends."""
        return await self.run(calls.health(timeout))

    async def run(self, call: calls.Call[calls.T]) -> calls.T:
        """Runs a call from `maas_client.calls` over grpc.aio."""
        outcome: Any = None
        failure: errors.MaasError | None = None
        while True:
            try:
                rpc = call.send(outcome) if failure is None else call.throw(failure)
            except StopIteration as done:
                return done.value
            method = getattr(self.stubs[rpc.service], rpc.method)
            timeout = self.connection.timeout_of(rpc.timeout)
            try:
                outcome, failure = await method(rpc.request, timeout=timeout, metadata=self.connection.metadata), None
            except grpc.RpcError as error:
                outcome, failure = None, errors.from_rpc_error(error, rpc.method)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
