"""`python -m gateway`: the public endpoint of the cluster."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import start_http_server

from gateway.backends import Backend
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.proxy import ROUTES, GatewayProxy
from shared.logs import configure_logging
from shared.server import GrpcServer
from shared.settings import GatewaySettings


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
    )
    catalog = ModelCatalog(backends, settings.catalog_refresh_s)
    proxy = GatewayProxy(backends, cache, catalog, settings)
    server = GrpcServer(
        settings, lambda s: s.add_generic_rpc_handlers(proxy.handlers()), [route.service for route in ROUTES]
    )
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
    await server.start()
    refresher = asyncio.create_task(catalog.run())
    await server.mark_serving()
    try:
        await server.serve_until_signalled()
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await cache.close()
        for backend in backends.values():
            await backend.close()


def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
