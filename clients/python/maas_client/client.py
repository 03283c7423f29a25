"""The maas Python SDK: one `Client` per gateway, numpy in and out.

    from maas_client import Client

    with Client("maas.example.com:443", api_key="...", tls=True) as maas:
        labels = maas.dense.predict("digits-mlp", pixels)["label"]
        vectors = maas.nlp.embed(["a sentence", "another"])
        job = maas.training.submit("dense", "mlp", dataset="iris", epochs=5, output_model="iris-mlp")
        final = maas.training.wait(job.job_id)

Every call carries a deadline (`timeout`, 30 s unless given), and calls that fail with UNAVAILABLE
are retried with exponential backoff by gRPC's own retry policy. Failures raise `MaasError`
subclasses carrying the gRPC status and the server's message.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2, training_pb2_grpc
from maas_client import errors
from maas_client.tensors import decode, encode

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0
FAMILIES = ("dense", "gnn", "nlp")
TERMINAL_STATES = frozenset(
    {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
)
_DATASET_FORMATS = {
    ".npz": training_pb2.DATASET_FORMAT_NPZ,
    ".csv": training_pb2.DATASET_FORMAT_CSV,
    ".json": training_pb2.DATASET_FORMAT_JSON,
    ".jsonl": training_pb2.DATASET_FORMAT_JSONL,
}


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


def retry_service_config(max_attempts: int) -> str:
    """gRPC's retry policy for every method: UNAVAILABLE is retried with exponential backoff.

    Only UNAVAILABLE is retried: the call did not reach a server that could act on it. SubmitJob
    is safe to retry because the SDK always sends an idempotency key. WatchJob is left out:
    `TrainingApi.watch` reopens it itself, also after events have arrived, which gRPC cannot.
    """
    watch = {"name": [{"service": "maas.training.v1.TrainingService", "method": "WatchJob"}]}
    if max_attempts < 2:
        return json.dumps({"methodConfig": [{"name": [{}]}]})
    policy = {
        "maxAttempts": min(max_attempts, 5),  # gRPC caps attempts at 5
        "initialBackoff": "0.2s",
        "maxBackoff": "5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": policy}, watch]})


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


class _Api:
    def __init__(self, client: Client) -> None:
        self._client = client

    def _call(self, method: Callable, request: Any, timeout: float | None = None) -> Any:
        return self._client._call(method, request, timeout)


class DenseApi(_Api):
    """Dense models (MLP, CNN, GRU) served with ONNX Runtime."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.stub = dense_pb2_grpc.DenseServiceStub(client.channel)
        self._input_names: dict[tuple[str, int], str] = {}

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
        if not isinstance(inputs, Mapping):
            inputs = {self._single_input(model, version): inputs}
        request = dense_pb2.PredictRequest(
            model_name=model,
            model_version=version,
            inputs={name: encode(value) for name, value in inputs.items()},
            output_names=list(outputs),
        )
        reply = self._call(self.stub.Predict, request, timeout)
        return Prediction(reply.model_name, reply.model_version, {k: decode(v) for k, v in reply.outputs.items()})

    def _single_input(self, model: str, version: int) -> str:
        if (model, version) not in self._input_names:
            found = self._client.models.get(model)
            wanted = version or found.default_version
            described = next((v for v in found.versions if v.version == wanted), None)
            if described is None:
                raise errors.NotFound(f"model {model!r} has no loaded version {wanted}")
            if len(described.inputs) != 1:
                names = [spec.name for spec in described.inputs]
                raise ValueError(f"{model} takes several inputs {names}; pass a dict of arrays by name")
            self._input_names[model, version] = described.inputs[0].name
        return self._input_names[model, version]


class GnnApi(_Api):
    """Graph models: node classification on a graph sent inline or stored with the model."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.stub = gnn_pb2_grpc.GnnServiceStub(client.channel)

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
    ) -> GraphPrediction:
        """Predicts for `node_ids` (all nodes when empty) of an inline graph or a stored one."""
        request = gnn_pb2.PredictRequest(model_name=model, model_version=version, node_ids=list(node_ids))
        if stored_graph:
            request.stored_graph = stored_graph
        elif node_features is not None and edge_index is not None:
            request.graph.node_features.CopyFrom(encode(np.asarray(node_features, np.float32)))
            request.graph.edge_index.CopyFrom(encode(np.asarray(edge_index, np.int64)))
            if edge_weight is not None:
                request.graph.edge_weight.CopyFrom(encode(np.asarray(edge_weight, np.float32)))
        else:
            raise ValueError("pass stored_graph, or node_features and edge_index")
        reply = self._call(self.stub.Predict, request, timeout)
        return GraphPrediction(
            reply.model_name,
            reply.model_version,
            {k: decode(v) for k, v in reply.outputs.items()},
            node_ids=np.array(reply.node_ids, np.int64),
        )


class NlpApi(_Api):
    """Language models: sentence embeddings and text classification."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.stub = nlp_pb2_grpc.NlpServiceStub(client.channel)

    def predict(
        self, model: str, texts: Sequence[str], *, version: int = 0, timeout: float | None = None
    ) -> Prediction:
        if isinstance(texts, str):
            texts = [texts]
        request = nlp_pb2.PredictRequest(model_name=model, model_version=version, texts=list(texts))
        reply = self._call(self.stub.Predict, request, timeout)
        outputs = {k: decode(v) for k, v in reply.outputs.items()}
        return Prediction(reply.model_name, reply.model_version, outputs, list(reply.labels))

    def embed(self, texts: Sequence[str], *, model: str = "minilm-l6-v2", timeout: float | None = None) -> np.ndarray:
        """One L2-normalised embedding per text, as an N x D float32 array."""
        return self.predict(model, texts, timeout=timeout)["embedding"]

    def classify(self, texts: Sequence[str], *, model: str = "sentiment", timeout: float | None = None) -> Prediction:
        """Labels (`.labels`) and class probabilities (`["probabilities"]`) for each text."""
        return self.predict(model, texts, timeout=timeout)


class ModelsApi(_Api):
    """The model repository: versions, the default version, loading and unloading."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self._stubs = {
            "dense": dense_pb2_grpc.DenseServiceStub(client.channel),
            "gnn": gnn_pb2_grpc.GnnServiceStub(client.channel),
            "nlp": nlp_pb2_grpc.NlpServiceStub(client.channel),
        }
        self._modules = {"dense": dense_pb2, "gnn": gnn_pb2, "nlp": nlp_pb2}
        self._families: dict[str, str] = {}

    def list(self, family: str | None = None) -> list[tuple[str, model_pb2.Model]]:
        """(family, model) for every model the caller may see, by family then name."""
        found = []
        for name in [family] if family else FAMILIES:
            reply = self._call(self._stubs[name].ListModels, self._modules[name].ListModelsRequest())
            for model in sorted(reply.models, key=lambda m: m.name):
                self._families[model.name] = name
                found.append((name, model))
        return found

    def family_of(self, model: str) -> str:
        """The family serving `model`. A version just written by a job is in the store before
        its service has loaded it, so the store's manifests are asked when the listing misses it."""
        if model not in self._families:
            self.list()
        for family in FAMILIES if model not in self._families else ():
            request = self._modules[family].ListModelVersionsRequest(model_name=model)
            try:
                listing = self._call(self._stubs[family].ListModelVersions, request)
            except errors.NotFound:
                continue
            if any(version.family == family for version in listing.versions):
                self._families[model] = family
                break
        if model not in self._families:
            raise errors.NotFound(f"no model named {model!r} in any family (dense, gnn, nlp)")
        return self._families[model]

    def get(self, model: str) -> model_pb2.Model:
        family = self.family_of(model)
        reply = self._call(self._stubs[family].GetModel, self._modules[family].GetModelRequest(model_name=model))
        return reply.model

    def versions(self, model: str):
        """The ListModelVersions reply: `default_version`, `default_pinned` and `versions`."""
        family = self.family_of(model)
        request = self._modules[family].ListModelVersionsRequest(model_name=model)
        return self._call(self._stubs[family].ListModelVersions, request)

    def promote(self, model: str, version: int) -> model_pb2.Model:
        """Makes `version` the default: it serves every call that names no version.

        The version is loaded first (a no-op when it is loaded), since only a ready version can
        be the default.
        """
        self.load(model, version)
        family = self.family_of(model)
        request = self._modules[family].SetDefaultVersionRequest(model_name=model, model_version=version)
        return self._call(self._stubs[family].SetDefaultVersion, request).model

    def rollback(self, model: str) -> model_pb2.Model:
        """Makes the newest version older than the current default the default again."""
        listing = self.versions(model)
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
        return self.promote(model, max(older))

    def load(self, model: str, version: int) -> model_pb2.ModelVersion:
        family = self.family_of(model)
        request = self._modules[family].LoadModelRequest(model_name=model, model_version=version)
        return self._call(self._stubs[family].LoadModel, request).version

    def unload(self, model: str, version: int) -> None:
        family = self.family_of(model)
        request = self._modules[family].UnloadModelRequest(model_name=model, model_version=version)
        self._call(self._stubs[family].UnloadModel, request)


class DatasetsApi(_Api):
    """Data sets for training: uploaded in chunks, listed and described."""

    CHUNK_BYTES = 1 << 20

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.stub = training_pb2_grpc.TrainingServiceStub(client.channel)

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
                while chunk := file.read(self.CHUNK_BYTES):
                    yield training_pb2.UploadDatasetRequest(chunk=chunk)
                    sent += len(chunk)
                    if progress:
                        progress(sent, total)

        return self._call(self.stub.UploadDataset, parts(), timeout).dataset

    def get(self, dataset_id: str) -> training_pb2.Dataset:
        return self._call(self.stub.GetDataset, training_pb2.GetDatasetRequest(dataset_id=dataset_id)).dataset

    def list(self, family: str | None = None) -> training_pb2.ListDatasetsResponse:
        """The caller's uploaded data sets (`.datasets`, newest first) and the built-in ones."""
        request = training_pb2.ListDatasetsRequest(family=family_code(family) if family else 0)
        return self._call(self.stub.ListDatasets, request)


class TrainingApi(_Api):
    """Training jobs: queued in Redis, trained, evaluated, and written as new model versions."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.stub = training_pb2_grpc.TrainingServiceStub(client.channel)

    def submit(
        self,
        family: str | int,
        architecture: str,
        *,
        dataset: str = "",
        dataset_id: str = "",
        output_model: str = "",
        epochs: int = 0,
        batch_size: int = 0,
        optimizer: str = "adam",
        learning_rate: float | None = None,
        hidden_sizes: Sequence[int] = (),
        validation_split: float = 0.0,
        k_folds: int = 0,
        gate_metric: str = "",
        gate_min: float | None = None,
        gate_max: float | None = None,
        better_than_default: bool = False,
        idempotency_key: str = "",
        seed: int = 0,
        private: bool = False,
        timeout: float | None = None,
    ) -> training_pb2.Job:
        """Queues a job on a built-in `dataset` or an uploaded `dataset_id`; returns the queued job.

        Without an `idempotency_key` the SDK makes one, so a retried submit never queues twice.
        """
        request = training_pb2.SubmitJobRequest(
            family=family_code(family),
            architecture=architecture,
            hidden_sizes=list(hidden_sizes),
            optimizer=training_pb2.Optimizer.Value(f"OPTIMIZER_{optimizer.upper()}"),
            epochs=epochs,
            batch_size=batch_size,
            validation_split=validation_split,
            k_folds=k_folds,
            output_model=output_model,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            seed=seed,
            private=private,
        )
        if learning_rate is not None:
            request.learning_rate = learning_rate
        if dataset_id:
            request.dataset_id = dataset_id
        elif dataset:
            request.builtin_dataset = dataset
        else:
            raise ValueError("pass dataset (a built-in data set's name) or dataset_id (an uploaded one)")
        if gate_metric or gate_min is not None or gate_max is not None or better_than_default:
            request.gate.metric = gate_metric
            request.gate.better_than_default = better_than_default
            if gate_min is not None:
                request.gate.min_value = gate_min
            if gate_max is not None:
                request.gate.max_value = gate_max
        return self._call(self.stub.SubmitJob, request, timeout).job

    def get(self, job_id: str) -> training_pb2.Job:
        return self._call(self.stub.GetJob, training_pb2.GetJobRequest(job_id=job_id)).job

    def list(self, family: str | None = None, limit: int = 100) -> list[training_pb2.Job]:
        request = training_pb2.ListJobsRequest(family=family_code(family) if family else 0, limit=limit)
        return list(self._call(self.stub.ListJobs, request).jobs)

    def cancel(self, job_id: str) -> training_pb2.Job:
        return self._call(self.stub.CancelJob, training_pb2.CancelJobRequest(job_id=job_id)).job

    def watch(
        self, job_id: str, *, timeout: float | None = 3600.0, reconnects: int | None = None
    ) -> Iterator[training_pb2.JobEvent]:
        """The job's events: its history first, then each new one, ending after a terminal state.

        A stream cut by UNAVAILABLE (a gateway restarting, a connection dropped) is opened again,
        up to `reconnects` times in a row (the client's max_attempts - 1 unless given); the
        server replays the history, and events already yielded are skipped, so each event comes
        once. `timeout=None` watches with no deadline.
        """
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        request = training_pb2.WatchJobRequest(job_id=job_id)
        seen = failures = 0
        reconnects = self._client.max_attempts - 1 if reconnects is None else reconnects
        while True:
            try:
                remaining = None if timeout is None else max(deadline - time.monotonic(), 0.001)
                stream = self._client._stream(self.stub.WatchJob, request, remaining, no_deadline=timeout is None)
                for index, reply in enumerate(stream):
                    if index >= seen:
                        seen, failures = seen + 1, 0
                        yield reply.event
                return
            except errors.Unavailable:
                failures += 1
                if failures > reconnects or time.monotonic() >= deadline:
                    raise
                time.sleep(min(0.2 * 2**failures, 5.0))

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


class Client:
    """A connection to a maas gateway.

    target: host:port; defaults to $MAAS_TARGET, then localhost:50051.
    api_key: sent as `authorization: Bearer <key>`; defaults to $MAAS_API_KEY.
    tls: use TLS; `root_certificates` (PEM bytes or a path) trusts a private CA, and
        `certificate_chain` with `private_key` present a client certificate for mutual TLS.
    timeout: the deadline, in seconds, of every call that does not pass its own.
    max_attempts: attempts per call when the gateway answers UNAVAILABLE (1 turns retries off).
    metadata: headers sent with every call; channel_options: extra gRPC channel arguments.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike | None = None,
        certificate_chain: bytes | str | os.PathLike | None = None,
        private_key: bytes | str | os.PathLike | None = None,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = 4,
        max_message_bytes: int = 64 << 20,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its private key")
        self.target = target or os.environ.get("MAAS_TARGET") or DEFAULT_TARGET
        api_key = api_key if api_key is not None else os.environ.get("MAAS_API_KEY")
        self.timeout = timeout
        self.max_attempts = max_attempts
        key = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._metadata = (*metadata, *key)
        options = [
            ("grpc.service_config", retry_service_config(max_attempts)),
            ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        options.extend(channel_options)  # e.g. keepalive or compression settings
        if tls or root_certificates or certificate_chain:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates),
                private_key=_pem(private_key),
                certificate_chain=_pem(certificate_chain),
            )
            self.channel = grpc.secure_channel(self.target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(self.target, options)
        self.dense = DenseApi(self)
        self.gnn = GnnApi(self)
        self.nlp = NlpApi(self)
        self.models = ModelsApi(self)
        self.datasets = DatasetsApi(self)
        self.training = TrainingApi(self)

    def health(self, timeout: float | None = 5.0) -> dict[str, str]:
        """The gateway's health ("gateway") and each family's, as the gateway sees its backends."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        names = {
            "gateway": "",
            "dense": "maas.dense.v1.DenseService",
            "gnn": "maas.gnn.v1.GnnService",
            "nlp": "maas.nlp.v1.NlpService",
        }
        report = {}
        for label, service in names.items():
            reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
            report[label] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return report

    def _call(self, method: Callable, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error, _method_name(method)) from None

    def _stream(
        self, method: Callable, request: Any, timeout: float | None, no_deadline: bool = False
    ) -> Iterator[Any]:
        timeout = None if no_deadline else self.timeout if timeout is None else timeout
        try:
            yield from method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error, _method_name(method)) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _method_name(method: Callable) -> str:
    # grpc's multicallables keep the full method path, e.g. /maas.dense.v1.DenseService/Predict.
    path = getattr(method, "_method", b"")
    return (path.decode() if isinstance(path, bytes) else str(path)).rsplit("/", 1)[-1]
