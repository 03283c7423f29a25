"""The model families, declared once: everything that lists families reads this registry.

A family is a model service with its own proto package, container and GPU allocation, and a
trainer. Its entry names what other processes need to know of it, as data: its data-plane
service, ports, data-set formats and built-in data sets, trainable architectures and the
training API's code for it. The code that acts on a family lives in its package,
`services/<name>/` (server, runtime, trainer, data-set parsers, default models); nothing in
`shared` imports it, and modules are named here only as strings that a process table runs.

Adding a fourth family: a package `services/<name>/` (with `__main__`, `trainer` and `defaults`
modules), its proto `protos/maas/<name>/v1/<name>.proto` with a `Predict` rpc, one entry below,
and a value of the training API's `Family` enum.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class Family:
    name: str
    # The proto package and service of its data plane (Predict); management is maas.models.v1.ModelService.
    proto_package: str
    service_name: str
    # Default ports under `make run`: gRPC, and Prometheus for the service and its trainer.
    port: int
    metrics_port: int
    trainer_metrics_port: int
    # The training API's `maas.training.v1.Family` value.
    training_code: int
    # What one unit of `max_batch_size` is for this family.
    batch_unit: str
    dataset_formats: frozenset[str]
    builtin_datasets: tuple[str, ...]
    # Trainable architectures and their default hidden sizes.
    architectures: dict[str, list[int]] = field(default_factory=dict)
    # Data-plane rpcs the gateway routes and caches like Predict (each has model_name and
    # model_version; its response has model_version), and rpcs that change stored data, which
    # the gateway passes on uncached (gateway/proxy.py says who may). Messages are named
    # <rpc>Request/Response. `internal`: rpcs only the gateway calls, never routed to callers.
    queries: tuple[str, ...] = ("Predict",)
    updates: tuple[str, ...] = ()
    internal: tuple[str, ...] = ()
    # Families whose services this family's trainer calls; it gets their targets as MAAS_<NAME>_TRAINER_<FAMILY>_TARGET.
    trainer_uses: tuple[str, ...] = ()
    # Whether a job may train on several data-parallel workers (SubmitJobRequest.world_size > 1).
    data_parallel: bool = False

    @property
    def service(self) -> str:
        """The full name of its data-plane service, e.g. maas.dense.v1.DenseService."""
        return f"{self.proto_package}.{self.service_name}"

    @property
    def module(self) -> str:
        return f"services.{self.name}"

    @property
    def trainer_module(self) -> str:
        return f"services.{self.name}.trainer"

    @property
    def defaults_module(self) -> str:
        return f"services.{self.name}.defaults"

    @property
    def env_prefix(self) -> str:
        return f"MAAS_{self.name.upper()}_"

    def pb2(self) -> ModuleType:
        """Its generated messages (PredictRequest, PredictResponse)."""
        return importlib.import_module(f"{self.proto_package}.{self.name}_pb2")

    def pb2_grpc(self) -> ModuleType:
        return importlib.import_module(f"{self.proto_package}.{self.name}_pb2_grpc")


FAMILIES: tuple[Family, ...] = (
    Family(
        name="dense",
        proto_package="maas.dense.v1",
        service_name="DenseService",
        port=50061,
        metrics_port=9465,
        trainer_metrics_port=9468,
        training_code=1,
        batch_unit="rows",
        dataset_formats=frozenset({"npz", "csv"}),
        builtin_datasets=("digits", "digits-images", "iris", "wine", "breast_cancer", "diabetes", "sine"),
        architectures={"mlp": [128, 64], "cnn": [16], "gru": [32]},
        queries=("Predict", "Explain"),
        data_parallel=True,
    ),
    Family(
        name="gnn",
        proto_package="maas.gnn.v1",
        service_name="GnnService",
        port=50062,
        metrics_port=9466,
        trainer_metrics_port=9469,
        training_code=2,
        batch_unit="nodes",
        dataset_formats=frozenset({"json", "npz"}),
        # karate and sbm: node classification; motifs: graph classification (BA-2Motifs); interactions:
        # a user-item set with planted communities, for recommenders (lightgcn: one width per layer).
        builtin_datasets=("karate", "sbm", "motifs", "interactions"),
        architectures={"gcn": [16], "sage": [32], "gat": [16], "gin": [32], "lightgcn": [64, 64]},
        queries=("Predict", "PredictLinks", "ClassifyGraphs", "Explain", "Recommend", "SimilarItems"),
        updates=("UpdateGraph", "DeleteGraphVersion"),
        internal=("ListGraphs",),  # stored graphs' owners, for the gateway's GraphCatalog
        trainer_uses=("nlp",),  # recommenders' item texts, embedded at training time
    ),
    Family(
        name="nlp",
        proto_package="maas.nlp.v1",
        service_name="NlpService",
        port=50063,
        metrics_port=9467,
        trainer_metrics_port=9470,
        training_code=3,
        batch_unit="texts",
        dataset_formats=frozenset({"jsonl"}),
        builtin_datasets=("sentiment", "topics", "aspects"),
        architectures={"linear": [], "mlp": [128]},
        queries=("Predict", "Explain", "Similarity"),
        data_parallel=True,
    ),
)
BY_NAME: dict[str, Family] = {family.name: family for family in FAMILIES}
BY_TRAINING_CODE: dict[int, Family] = {family.training_code: family for family in FAMILIES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def family(name: str) -> Family:
    return BY_NAME[name]
