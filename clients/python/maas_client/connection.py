"""How both clients connect: target, credentials, call metadata, and gRPC's retry policy."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0


def retry_service_config(max_attempts: int) -> str:
    """gRPC's retry policy for every method: UNAVAILABLE is retried with exponential backoff.

    Only UNAVAILABLE is retried: the call did not reach a server that could act on it. SubmitJob
    is safe to retry because the SDK always sends an idempotency key. WatchJob is left out:
    the clients reopen it themselves, also after events have arrived, which gRPC cannot.
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


class ConnectionSettings(TypedDict, total=False):
    """What `Client(target, **settings)` and `AsyncClient(target, **settings)` take; see Connection."""

    api_key: str | None
    tls: bool
    root_certificates: bytes | str | os.PathLike | None
    certificate_chain: bytes | str | os.PathLike | None
    private_key: bytes | str | os.PathLike | None
    server_name: str | None
    timeout: float
    max_attempts: int
    max_message_bytes: int
    metadata: Sequence[tuple[str, str]]
    channel_options: Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Connection:
    """Everything a channel and its calls need, checked once.

    target: host:port; defaults to $MAAS_TARGET, then localhost:50051.
    api_key: sent as `authorization: Bearer <key>`; defaults to $MAAS_API_KEY.
    tls: use TLS; `root_certificates` (PEM bytes or a path) trusts a private CA, and
        `certificate_chain` with `private_key` present a client certificate for mutual TLS.
    timeout: the deadline, in seconds, of every call that does not pass its own.
    max_attempts: attempts per call when the gateway answers UNAVAILABLE (1 turns retries off).
    metadata: headers sent with every call; channel_options: extra gRPC channel arguments.
    """

    target: str
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None
    timeout: float
    max_attempts: int

    @classmethod
    def of(
        cls,
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
    ) -> Connection:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its private key")
        api_key = api_key if api_key is not None else os.environ.get("MAAS_API_KEY")
        key = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        options = [
            ("grpc.service_config", retry_service_config(max_attempts)),
            ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        options.extend(channel_options)  # e.g. keepalive or compression settings
        credentials = None
        if tls or root_certificates or certificate_chain:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates),
                private_key=_pem(private_key),
                certificate_chain=_pem(certificate_chain),
            )
        return cls(
            target=target or os.environ.get("MAAS_TARGET") or DEFAULT_TARGET,
            metadata=(*metadata, *key),
            options=tuple(options),
            credentials=credentials,
            timeout=timeout,
            max_attempts=max_attempts,
        )

    def timeout_of(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
