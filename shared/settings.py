"""Typed settings for every maas process, read from the environment in `main()`.

What every server and every model service shares lives here; each process's own class, with
its prefix (`MAAS_DENSE_`, `MAAS_GNN_`, `MAAS_NLP_`, `MAAS_GATEWAY_`), lives with its owner
(`services/<family>/settings.py`, `gateway/settings.py`). Every default is what `make run`
uses on one laptop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Enough for a batch of a few thousand 64-float rows; raise it for bigger tensors.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class EncryptionSettings(BaseSettings):
    """The key-encryption keys of a process that reads or writes the model or data-set store
    (`<PREFIX>KEYS_DIR`, `<PREFIX>KEK_ID` for every process)."""

    model_config = SettingsConfigDict(extra="ignore")

    keys_dir: Path | None = Field(
        None,
        description="Folder of key-encryption keys, one file of 32 random bytes per KEK, named by its id (a "
        "Kubernetes Secret mounted as a folder). Set with kek_id, the stores are encrypted at rest; unset, "
        "they are written in plain (and say so at start).",
    )
    kek_id: str = Field(
        "",
        description="The KEK that wraps new data keys, until a rotation (maasctl keys rotate) names another; "
        "a tenant's own KEK, tenant-<tenant>, is used for its files when the folder holds one.",
    )

    @model_validator(mode="after")
    def _kek_with_keys(self):
        if self.keys_dir is not None and not self.kek_id:
            raise ValueError("kek_id: required when keys_dir is set (the id of a KEK file in keys_dir)")
        return self


class ServerSettings(EncryptionSettings):
    """What every gRPC server in the cluster shares."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 inside containers.")
    port: int = Field(0, description="gRPC port; 0 picks a free one and logs it.")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, description="Largest request or response, in bytes.")
    shutdown_grace_s: float = Field(10.0, description="How long SIGTERM waits for in-flight calls before stopping.")
    max_connection_age_s: float = Field(300.0, description="Clients reconnect after this, so new replicas get traffic.")
    log_level: str = Field("INFO", description="Python logging level; DEBUG also logs (redacted) inputs.")
    log_format: Literal["json", "text"] = Field("json", description="JSON lines with the request id, or text.")
    metrics_port: int = Field(0, description="Prometheus /metrics port; 0 turns it off.")
    tracing: str = Field("off", description="OpenTelemetry exporter: off, console, otlp or file:<path>.")
    otlp_endpoint: str = Field("localhost:4317", description="OTLP/gRPC collector, when tracing is otlp.")
    workers: int = Field(
        1,
        description="Server processes sharing the port (SO_REUSEPORT), each with its own event loop; "
        "0 means one per usable core, at most 8. With more than one, this process supervises them.",
    )
    run_dir: Path | None = Field(
        None, description="Where workers keep their shared metrics and readiness files; a temporary folder if unset."
    )


class ModelServiceSettings(ServerSettings):
    """Settings of a model service (dense, gnn, nlp): store, device, runtimes and batching."""

    model_store: Path = Field(Path("var/models"), description="Root of the model store.")
    store_poll_s: float = Field(
        30.0,
        description="How often the store is re-read for new versions and default pins, as a fallback for model "
        "events missed while Redis was away; 0 turns it off.",
    )
    events_redis_url: str | None = Field(
        None,
        description="The Redis whose channel carries model events (new versions, loads, pins); make run and the "
        "manifests use the job queue's. Unset: the store poll alone.",
    )
    inference_threads: int = Field(2, description="Threads that run model compute off the event loop.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="'auto' uses the GPU when one works, else the CPU (saying why); 'cuda' stops the service at "
        "start when no GPU can run it; 'cpu'.",
    )
    device_index: int = Field(0, description="Which GPU, when several are visible.")
    gpu_memory_limit_mb: int = Field(
        0,
        description="GPU memory cap for this service: ONNX Runtime's gpu_mem_limit, and torch's "
        "per-process memory fraction; 0 leaves it uncapped. Lets several services share one GPU. "
        "With several workers, each gets an equal share.",
    )
    onnx_providers: list[str] = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime providers in order of preference; add TensorrtExecutionProvider first "
        "to use TensorRT. Unusable ones are skipped, and the CPU is always the last resort.",
    )
    onnx_graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level."
    )
    onnx_cuda_options: dict[str, str | int] = Field(
        default_factory=dict,
        description="CUDA provider options over the serving defaults (cudnn_conv_algo_search=HEURISTIC), as "
        'JSON: {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": 1}.',
    )
    gpu_pad_batches: bool = Field(
        True,
        description="On a GPU, pad dense batches to powers of two up to max_batch_size and warm each size up "
        "at load, so no live request pays for a new shape.",
    )
    onnx_intra_op_threads: int = Field(1, description="Threads inside one ONNX Runtime call; 0 lets ORT choose.")
    onnx_inter_op_threads: int = Field(1, description="Threads across independent ONNX graph nodes.")
    torch_threads: int = Field(1, description="Intra-op threads of torch models.")
    batching: bool = Field(True, description="Dynamic batching of concurrent requests to the same model version.")
    max_batch_size: int = Field(64, description="Most rows (dense), graphs' nodes (gnn) or texts (nlp) in one batch.")
    max_queue_delay_us: int = Field(
        0,
        description="Longest a request waits for others to join its batch, in microseconds. With 0 (as in "
        "Triton) a batch takes whatever queued while the model was busy: no added latency when idle.",
    )
    max_queue_size: int = Field(
        1024, description="Requests waiting per model version; beyond it, calls get RESOURCE_EXHAUSTED."
    )
    max_concurrent_batches: int = Field(
        1,
        description="Batches of one model version that may run at once (at most inference_threads). One measured "
        "best on 2 cores (make bench): requests that wait form bigger batches. More can keep many cores busy "
        "when batches are small; run a worker per core first (workers).",
    )
    explain_threads: int = Field(
        1, description="Threads that compute explanations, apart from the ones that serve Predict."
    )
    max_explain_rows: int = Field(64, description="Most rows (dense) or nodes (gnn) one Explain call explains.")
    max_explain_steps: int = Field(
        1024, description="Most integration steps, optimisation epochs or samples one Explain call may ask for."
    )


class TrainerSettings(EncryptionSettings):
    """Settings of a trainer process; each family's trainer has its own prefix (MAAS_DENSE_TRAINER_, ...)."""

    model_config = SettingsConfigDict(extra="ignore")

    queue_redis_url: str = Field("redis://127.0.0.1:6391/0", description="The job queue's Redis.")
    model_store: Path = Field(Path("var/models"), description="Where trained versions are written.")
    dataset_dir: Path = Field(Path("var/datasets"), description="Where uploaded data sets are read from.")
    checkpoint_dir: Path = Field(Path("var/checkpoints"), description="Per-epoch checkpoints, by job id.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device: 'auto', 'cpu' or 'cuda'.")
    device_index: int = Field(0, description="Which GPU, when several are visible.")
    gpu_memory_limit_mb: int = Field(0, description="GPU memory cap for this trainer; 0 leaves it uncapped.")
    torch_threads: int = Field(1, description="Intra-op threads for training.")
    claim_idle_ms: int = Field(
        30_000, description="A job whose trainer went silent this long is taken over by another trainer."
    )
    max_attempts: int = Field(
        3,
        description="Attempts a job gets (each one that failed, or whose trainer died mid-job) before it is moved "
        "to the dead-letter stream. A trainer that is shut down hands its job back without spending one.",
    )
    job_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Training time a job may use, over all its attempts; past it, the job fails with "
        "DEADLINE_EXCEEDED at its next epoch boundary, and is not retried.",
    )
    max_parameters: int = Field(
        50_000_000, description="Largest network a job may build, in trainable parameters (weights and biases)."
    )
    max_hidden_layers: int = Field(32, description="Most entries a job's hidden_sizes may have.")
    max_epoch_rows: int = Field(
        100_000_000,
        description="Most examples a job may train on in all: epochs x rows of its data set (x (k_folds + 1) with "
        "cross-validation).",
    )
    max_world_size: int = Field(
        4,
        ge=1,
        description="Most data-parallel workers (world_size) one job may ask for; the gateway refuses more.",
    )
    rendezvous_timeout_s: float = Field(
        120.0,
        gt=0,
        description="How long a distributed job's workers may take to meet (torchrun's rendezvous); past it, the "
        "attempt fails saying so instead of waiting on.",
    )
    max_worker_restarts: int = Field(
        3,
        ge=0,
        description="Restarts torchrun gives a distributed job's workers when one dies (each resumes from the "
        "last checkpoint) before the attempt fails and the queue's retry takes over.",
    )
    distributed_launcher: Literal["torchrun", "kubernetes"] = Field(
        "torchrun",
        description="How distributed jobs start their workers: torchrun on this trainer's machine, or a Kubeflow "
        "PyTorchJob created in the trainer's namespace (MAAS_<FAMILY>_TRAINER_KUBERNETES_* settings).",
    )
    kubernetes_namespace: str = Field("maas", description="Namespace of the PyTorchJobs (the trainer's own).")
    kubernetes_image: str = Field("maas-trainer:0.1.0", description="Image of a PyTorchJob's workers (the trainer's).")
    kubernetes_checkpoints_claim: str = Field(
        "maas-checkpoints", description="The PVC (ReadWriteMany) the trainer's checkpoint_dir is, mounted by workers."
    )
    kubernetes_models_claim: str = Field(
        "maas-models", description="The model store's PVC, mounted read-only by workers (its KEK policy record)."
    )
    kubernetes_keys_secret: str = Field(
        "", description="Secret holding the KEKs, mounted by workers at keys_dir when the stores are encrypted."
    )
    kubernetes_worker_cpu: str = Field("2", description="CPU request and limit of each PyTorchJob worker.")
    kubernetes_worker_memory: str = Field("4Gi", description="Memory request and limit of each PyTorchJob worker.")
    kubernetes_worker_gpus: int = Field(0, ge=0, description="GPUs (nvidia.com/gpu) of each worker; 0: gloo on CPU.")
    liveness_timeout_s: float = Field(
        600.0,
        description="/healthz on the metrics port answers 503 once the trainer's loop, or the job it runs, has "
        "shown no progress (a queue read, an epoch, a fold) for this long; raise it if one epoch can take longer.",
    )
    max_dataset_bytes: int = Field(
        512 * 1024 * 1024, description="Largest uploaded data set this trainer reads and parses."
    )
    block_ms: int = Field(1000, description="How long one read of the queue waits for a job.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["json", "text"] = Field("json", description="JSON lines, or text.")
    metrics_port: int = Field(0, description="Prometheus /metrics and the /healthz liveness probe; 0 turns it off.")


def encryption_settings(process: str) -> EncryptionSettings:
    """The KEK settings of a command-line process that writes the model store, read from MAAS_<PROCESS>_KEYS_DIR
    and MAAS_<PROCESS>_KEK_ID (MAAS_DEFAULTS_ for `python -m services.defaults`, MAAS_QUANTIZE_ for quantize)."""

    class ProcessEncryptionSettings(EncryptionSettings):
        model_config = SettingsConfigDict(env_prefix=f"MAAS_{process.upper()}_", extra="ignore")

    return ProcessEncryptionSettings()


def trainer_settings(family: str) -> TrainerSettings:
    """The trainer settings of one family, read from MAAS_<FAMILY>_TRAINER_* variables."""

    prefix = f"MAAS_{family.upper()}_TRAINER_"

    class FamilyTrainerSettings(TrainerSettings):
        model_config = SettingsConfigDict(env_prefix=prefix, extra="ignore")

        queue_redis_url: str = Field(
            "redis://127.0.0.1:6391/0",
            validation_alias=AliasChoices(f"{prefix}QUEUE_REDIS_URL", "QUEUE_REDIS_URL"),
            description="The job queue's Redis (AOF, noeviction).",
        )

    return FamilyTrainerSettings()
