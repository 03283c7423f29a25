"""Settings of the gateway, read from MAAS_GATEWAY_* variables in `main()`."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.families import FAMILIES
from shared.settings import ServerSettings


class GatewaySettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_GATEWAY_", extra="ignore")

    port: int = Field(50051, description="gRPC port of the public endpoint (every worker binds it).")
    workers: int = Field(
        0,
        description="Gateway processes sharing the port (SO_REUSEPORT); 0 means one per usable core, at most 8. "
        "The Kubernetes manifests set it from the pod's CPU limit.",
    )
    targets: dict[str, str] = Field(
        default_factory=dict,
        description='gRPC target of each family\'s service, as JSON: {"dense": "dns:///maas-dense:50061"}. '
        "MAAS_GATEWAY_<FAMILY>_TARGET sets one family's; unset, 127.0.0.1 and the family's default port.",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MAAS_GATEWAY_REDIS_URL", "REDIS_URL"),
        description="Cache Redis; unset disables the result cache.",
    )
    cache_ttl_s: float = Field(300.0, description="Lifetime of a cached result.")
    cache_policy: dict[str, dict[str, float | bool]] = Field(
        default_factory=dict,
        description="Per-model cache settings, as JSON: "
        '{"sentiment": {"enabled": false}, "minilm-l6-v2": {"ttl_s": 3600}}.',
    )
    rate_limit_per_s: float = Field(0.0, description="Calls per second each tenant may make; 0 turns limits off.")
    rate_limit_burst: int = Field(0, description="Calls a tenant may make at once; 0 means one second's worth.")
    rate_limits: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description='Per-tenant overrides, as JSON: {"batch-jobs": {"rate_per_s": 5, "burst": 10}}.',
    )
    cache_ttl_jitter: float = Field(
        0.1, description="Fraction of the TTL added at random, so entries don't expire together."
    )
    cache_timeout_s: float = Field(
        0.25, description="Longest a cache read or write may take before the call goes uncached."
    )
    cache_retry_after_s: float = Field(1.0, description="After a Redis failure, how long the cache stays bypassed.")
    local_cache_mb: int = Field(
        64,
        description="Each worker's in-memory cache in front of Redis, in MiB; a hit there never leaves the process. "
        "0 turns it off.",
    )
    default_deadline_s: float = Field(30.0, description="Deadline for backend calls when the caller sets none.")
    deadline_margin_s: float = Field(
        0.005, description="Taken off the caller's remaining time for the gateway's own work."
    )
    catalog_refresh_s: float = Field(
        30.0,
        description="How often the model catalog is re-read from the backends, as a fallback for model events "
        "(the queue Redis's channel) missed while Redis was away.",
    )
    queue_redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MAAS_GATEWAY_QUEUE_REDIS_URL", "QUEUE_REDIS_URL"),
        description="The job queue's Redis (AOF, noeviction); unset turns the training API off.",
    )
    explanation_result_ttl_s: float = Field(
        24 * 3600.0,
        description="How long a finished explanation job (its record and result) is kept in the queue's Redis; "
        "then it expires and GetExplanation answers NOT_FOUND. 0 keeps them forever. Training jobs are always kept.",
    )
    dataset_dir: Path = Field(Path("var/datasets"), description="Where uploaded data sets are stored.")
    tls_cert_file: Path | None = Field(None, description="PEM server certificate chain; with the key, turns TLS on.")
    tls_key_file: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."
    )
    health_port: int = Field(
        0, description="Plaintext port serving only grpc.health.v1, for probes when TLS is on; 0: none."
    )
    api_keys_file: Path | None = Field(
        None, description="JSON file of sha256-hashed API keys and their tenants; when set, every call needs a key."
    )
    max_dataset_bytes: int = Field(512 * 1024 * 1024, description="Largest data set UploadDataset accepts.")
    max_watch_streams_per_tenant: int = Field(
        16,
        description="WatchJob streams one tenant may have open at once on each gateway worker; beyond it, "
        "RESOURCE_EXHAUSTED. All of a worker's streams share one Redis connection.",
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024, description="Largest Predict request, checked before it is parsed (RESOURCE_EXHAUSTED)."
    )
    max_repeated: int = Field(
        65_536, description="Most entries of any repeated field of a request: texts, node ids, output names."
    )
    max_tensor_elements: int = Field(1 << 24, description="Most elements of any tensor of a request.")
    hop_batching: bool = Field(
        True,
        description="Merge concurrent dense Predicts for one model, version and input signature into one call to the "
        "dense service while that lane's call slots are busy; a request that finds a slot free goes alone.",
    )
    hop_max_in_flight: int = Field(
        1,
        ge=1,
        description="Calls each lane (model, version, input signature) may have in flight to each replica of the "
        "dense service (the replicas its target lists, or DNS finds for it)",
    )
    hop_max_rows: int = Field(64, ge=1, description="Most rows one merged call to the dense service carries.")
    payload_logging: dict[str, float] = Field(
        default_factory=dict,
        description='Share of calls (0 to 1) recorded in payload logs per model, "*" for the rest, e.g. '
        '{"digits-mlp": 0.1, "*": 0.01}; empty (the default): none. Needs the queue Redis.',
    )
    payload_log_max_len: int = Field(10_000, ge=1, description="Records kept per tenant and model; older ones go.")
    shadow_queue_size: int = Field(
        256, ge=1, description="Copies of calls waiting for a shadow version; past that, copies are dropped (counted)."
    )
    shadow_workers: int = Field(4, ge=1, description="Copies sent to shadow versions at once, per gateway worker.")
    http_port: int = Field(
        0,
        description="HTTP port (KServe v2 REST, OpenAI-compatible embeddings, the console, /openapi.json), served "
        "by every worker beside gRPC (SO_REUSEPORT); 0 turns HTTP off. make run and the manifests use 8080.",
    )

    @model_validator(mode="before")
    @classmethod
    def _family_targets(cls, values: dict) -> dict:
        """MAAS_GATEWAY_<FAMILY>_TARGET for each family of the registry."""
        targets = dict(values.get("targets") or {})
        for family in FAMILIES:
            target = os.environ.get(f"MAAS_GATEWAY_{family.name.upper()}_TARGET")
            if target and family.name not in targets:
                targets[family.name] = target
        return {**values, "targets": targets}

    def backend_targets(self) -> dict[str, str]:
        return {family.name: self.targets.get(family.name, f"127.0.0.1:{family.port}") for family in FAMILIES}
