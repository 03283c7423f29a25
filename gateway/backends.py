"""One pooled channel per model service, with calls that pass request and response bytes through.

The gateway never decodes a backend's response: bytes come back from the backend and go
to the caller (and the cache) unchanged.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import grpc

from maas.models.v1 import models_pb2
from shared import tracing
from shared.errors import UpstreamError
from shared.observability import REQUEST_ID_KEY, current_request_id

MODEL_SERVICE = models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name

# Queries that change nothing, so a call the service cancelled without running may go again.
READ_ONLY_METHODS = {
    "maas.dense.v1.DenseService": ("Predict", "Explain"),
    "maas.gnn.v1.GnnService": ("Predict", "PredictLinks", "ClassifyGraphs", "ListGraphs", "Explain", "Recommend",
                               "SimilarItems"),
    "maas.nlp.v1.NlpService": ("Predict", "Explain", "Similarity"),
}  # fmt: skip


def _retry_policy(codes: list[str]) -> dict:
    return {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
            "retryableStatusCodes": codes}  # fmt: skip


# UNAVAILABLE is retried by the channel itself; the call's deadline covers every attempt. A read-only
# query is also retried on CANCELLED: a server shutting down cancels the calls it has taken in but not
# yet handed to a handler (grpc/grpc#41785), so a replica's SIGTERM drain would fail them otherwise.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        # With a dns:/// target naming a headless Service, calls spread over every replica;
        # a replica that fails drops out of the rotation and rejoins once it reconnects.
        "loadBalancingConfig": [{"round_robin": {}}],
        # The retry budget: retries stop while more than half the recent calls failed.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        "methodConfig": [
            {
                "name": [{"service": service, "method": method}
                         for service, methods in READ_ONLY_METHODS.items() for method in methods],
                "retryPolicy": _retry_policy(["UNAVAILABLE", "CANCELLED"]),
            },
            {"name": [{}], "retryPolicy": _retry_policy(["UNAVAILABLE"])},
        ],
    }  # fmt: skip
)


def channel_options(max_message_bytes: int) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", RETRY_SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # A restarted backend is found again within a second or two, not after minutes of backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def _identity(value: bytes) -> bytes:
    return value


# How often a backend named by DNS is looked up again for its replica count (a headless Service's
# ready pods, compose's containers): scaling shows within this long.
RESOLVE_EVERY_S = 10.0


def listed_replicas(target: str) -> int | None:
    """The addresses a target lists itself (`ipv4:a:p,b:p`, `unix:path`); None for a name DNS resolves."""
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return max(1, len([address for address in rest.split(",") if address]))
    if scheme in ("unix", "unix-abstract", "vsock"):
        return 1
    return None


def dns_host_port(target: str) -> tuple[str, str]:
    """The host and port of a DNS target: `host:port`, `dns:host:port`, `dns:///host:port`, `[v6]:port`."""
    name = target
    if name.startswith("dns:"):
        name = name[len("dns:") :]
        if name.startswith("//"):  # dns://authority/host:port
            name = name[2:].partition("/")[2]
    if name.startswith("["):
        host, _, port = name[1:].partition("]")
        return host, port.lstrip(":") or "443"
    host, _, port = name.rpartition(":")
    return (host, port) if host else (port, "443")


async def resolve_replicas(target: str) -> int:
    """How many replicas a target names: its listed addresses, or the distinct addresses DNS gives
    for it (the channel balances round robin over the same ones). ValueError if DNS cannot say."""
    listed = listed_replicas(target)
    if listed is not None:
        return listed
    host, port = dns_host_port(target)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot resolve {target!r}: {exc}") from None
    return max(1, len({address[4][0] for address in found}))


class Backend:
    """A model service: its channel, and pass-through callables for its data plane and ModelService."""

    def __init__(self, family: str, service: str, target: str, max_message_bytes: int) -> None:
        self.family = family
        self.service = service
        self.target = target
        self.channel = grpc.aio.insecure_channel(
            target, options=channel_options(max_message_bytes), interceptors=tracing.client_interceptors()
        )
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        listed = listed_replicas(target)
        # Replicas behind the target: listed ones, or a DNS name's addresses, looked up again now and then.
        self._replicas = listed or 1
        self._resolve_at = float("inf") if listed else 0.0
        self._resolving: asyncio.Task | None = None

    def replica_count(self) -> int:
        """The replicas the channel balances over, as last found (1 until a DNS name is first resolved);
        a DNS name is looked up again, in the background, when the last look-up is old."""
        now = time.monotonic()
        if now >= self._resolve_at and (self._resolving is None or self._resolving.done()):
            # One look-up at a time: a resolver that hangs holds one thread, not one more every 10 s.
            self._resolve_at = now + RESOLVE_EVERY_S
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())
        return self._replicas

    async def _resolve(self) -> None:
        try:
            self._replicas = await resolve_replicas(self.target)
        except ValueError:  # DNS failing for a moment: the last count stands
            pass

    def method(self, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        if path not in self._methods:
            self._methods[path] = self.channel.unary_unary(
                path, request_serializer=_identity, response_deserializer=_identity
            )
        return self._methods[path]

    async def predict(self, request: bytes, timeout: float) -> bytes:
        return await self.call(f"/{self.service}/Predict", request, timeout)

    async def models(self, method: str, request: bytes, timeout: float) -> bytes:
        """A maas.models.v1.ModelService rpc, on this family's service."""
        return await self.call(f"/{MODEL_SERVICE}/{method}", request, timeout)

    async def call(self, path: str, request: bytes, timeout: float,
                   metadata: tuple[tuple[str, str], ...] = ()) -> bytes:  # fmt: skip
        # The request id travels on (and the trace context, through the channel's interceptors),
        # so the backend's logs and spans join the caller's.
        request_id = current_request_id()
        sent = (*metadata, *(((REQUEST_ID_KEY, request_id),) if request_id else ()))
        return await self._call(path, request, timeout, sent or None)

    async def wait_ready(self, within_s: float) -> bool:
        """Waits up to `within_s` for the channel to connect, as it does again after the service restarted
        (within its reconnect backoff); whether it did. Calls fail at once while it is not connected."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), within_s)
            return True
        except TimeoutError:
            return False

    async def _call(self, path: str, request: bytes, timeout: float, metadata) -> bytes:
        try:
            return await self.method(path)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._upstream_error(exc) from None

    def _upstream_error(self, exc: grpc.aio.AioRpcError) -> UpstreamError:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return UpstreamError(code, f"{self.family} service at {self.target} is unavailable: {exc.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return UpstreamError(code, f"deadline exceeded waiting for the {self.family} service")
        if code == grpc.StatusCode.INTERNAL:
            return UpstreamError(code, f"{self.family} service failed: {exc.details()}")
        return UpstreamError(code, exc.details() or code.name)

    async def close(self) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
        await self.channel.close()
