"""`python -m gateway`: the public endpoint of the cluster."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes

import grpc
import redis.asyncio as redis

from gateway.auth import AuthInterceptor, KeysFile, server_credentials
from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.explanation_jobs import ExplanationServicer
from gateway.fanout import FanoutServicer
from gateway.http.server import GatewayServer, attach_http
from gateway.keys import KEY_SERVICE, GatewayKeyService, dataset_store
from gateway.model_service import SERVICE_NAME as MODEL_SERVICE
from gateway.model_service import GatewayModelService
from gateway.open_inference import OPEN_INFERENCE_SERVICE, OpenInferenceServicer, add_open_inference_to_server
from gateway.proxy import ROUTES, GatewayProxy
from gateway.rate_limit import RateLimiter, RateLimitInterceptor
from gateway.settings import GatewaySettings
from gateway.training import TrainingServicer
from maas.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from maas.keys.v1 import keys_pb2_grpc
from maas.models.v1 import models_pb2_grpc
from maas.training.v1 import training_pb2, training_pb2_grpc
from shared.jobs import JobStore
from shared.model_events import ModelEvents
from shared.server import NOT_SERVING, SERVING
from shared.workers import run_server_process

TRAINING_SERVICE = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
EXPLANATION_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["ExplanationService"].full_name


async def serve(settings: GatewaySettings) -> None:
    targets = settings.backend_targets()
    backends = {
        route.family: Backend(route.family, route.service, targets[route.family], settings.max_message_bytes)
        for route in ROUTES
    }
    cache = ResultCache(
        settings.redis_url,
        settings.cache_ttl_s,
        settings.cache_ttl_jitter,
        settings.cache_timeout_s,
        settings.cache_retry_after_s,
        settings.local_cache_mb * 1024 * 1024,
    )
    services = {route.family: route.service for route in ROUTES}

    async def report(family: str, reachable: bool) -> None:
        # Each family's health name follows its backend; the gateway's own ("") stays up.
        await server.set_health(SERVING if reachable else NOT_SERVING, [services[family]])

    # Model events travel on the job queue's Redis (AOF, never evicted), beside the jobs that make versions.
    events = ModelEvents(settings.queue_redis_url)
    catalog = ModelCatalog(backends, settings.catalog_refresh_s, report, events=events)
    proxy = GatewayProxy(backends, cache, catalog, settings)
    model_service = GatewayModelService(backends, catalog, proxy.timeout)
    jobs = JobStore.from_url(settings.queue_redis_url) if settings.queue_redis_url else None
    # One training servicer for gRPC and HTTP (the console's job event streams share its watch limits).
    datasets = dataset_store(settings)  # sealed under the KEKs when encryption is on
    proxy.payloads.seal_with(datasets.keyring, datasets.policy)  # payload records too, each tenant's under its KEK
    training = None
    if jobs is not None:
        training = TrainingServicer(
            jobs, datasets, settings.max_dataset_bytes, catalog,
            settings.max_watch_streams_per_tenant,
        )  # fmt: skip

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(proxy.handlers())
        models_pb2_grpc.add_ModelServiceServicer_to_server(model_service, server)
        add_open_inference_to_server(OpenInferenceServicer(proxy, catalog, model_service, limiter), server)
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(FanoutServicer(proxy), server)
        keys_pb2_grpc.add_KeyServiceServicer_to_server(GatewayKeyService(datasets, backends, proxy.timeout), server)
        if training is not None:
            training_pb2_grpc.add_TrainingServiceServicer_to_server(training, server)
            gateway_pb2_grpc.add_ExplanationServiceServicer_to_server(
                ExplanationServicer(proxy, jobs, training, settings.explanation_result_ttl_s), server
            )

    names = [*services.values(), MODEL_SERVICE, OPEN_INFERENCE_SERVICE, GATEWAY_SERVICE, KEY_SERVICE] + (
        [TRAINING_SERVICE, EXPLANATION_SERVICE] if jobs is not None else []
    )
    interceptors: list[grpc.aio.ServerInterceptor] = []
    limiter = None
    if settings.api_keys_file:
        interceptors.append(AuthInterceptor(KeysFile(settings.api_keys_file)))
    if settings.redis_url and (settings.rate_limit_per_s or settings.rate_limits):
        limiter_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.cache_timeout_s,
                                             socket_connect_timeout=settings.cache_timeout_s)  # fmt: skip
        limiter = RateLimiter(limiter_redis, settings.rate_limit_per_s, settings.rate_limit_burst, settings.rate_limits)
        interceptors.append(RateLimitInterceptor(limiter))
    credentials = None
    if settings.tls_cert_file and settings.tls_key_file:
        credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    server = GatewayServer(
        settings, register, names, interceptors, credentials, settings.health_port,
        known_model=catalog.knows_any,
    )  # fmt: skip
    if settings.http_port:  # KServe v2 REST, OpenAI embeddings and the console, on this event loop
        attach_http(server, settings, proxy, catalog, model_service, training, jobs)
    refresher: asyncio.Task | None = None

    async def become_ready() -> bool:
        # Ready once every backend has answered, so the first routed call finds a live channel.
        nonlocal refresher
        refresher = asyncio.create_task(catalog.run())
        return await catalog.wait_all_reachable()

    try:
        await server.run(become_ready)
    finally:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await proxy.close()
        await cache.close()
        await events.close()
        if jobs is not None:
            await jobs.close()
        for backend in backends.values():
            await backend.close()


# glibc's mallopt parameters (malloc.h).
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8


def bound_malloc() -> None:
    """Keeps large transient buffers from pinning memory: the gateway streams uploads and big requests in
    megabyte messages through gRPC's threads and executor threads. By default glibc gives each such thread
    an arena and raises its mmap threshold after the first free, so freed megabytes stay in the arenas
    (a 200 MB upload grew a worker by up to 75 MiB). A fixed threshold returns every block of 256 KiB or
    more to the kernel when freed, and two arenas bound the rest. Elsewhere than glibc, nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)
        libc.mallopt(M_ARENA_MAX, 2)


def main() -> None:
    bound_malloc()
    run_server_process("gateway", "gateway", GatewaySettings(), serve)


if __name__ == "__main__":
    main()
