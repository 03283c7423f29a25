"""uvicorn on the gateway worker's own event loop, on a port every worker shares.

Each worker binds the HTTP port itself with SO_REUSEPORT, like its gRPC port, so the kernel spreads
HTTP connections over the workers too, and hands the socket to uvicorn. uvicorn's own signal
handling is off: the gRPC server's SIGTERM handling stops both, and both drain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator

import redis.asyncio as redis
import uvicorn

from gateway.auth import KeysFile
from gateway.http.app import HttpFront, create_app
from gateway.open_inference import OpenInferenceServicer
from gateway.rate_limit import RateLimiter
from gateway.settings import GatewaySettings
from shared.server import GrpcServer

log = logging.getLogger(__name__)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, listening: every worker binds the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the process's server owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """An ASGI app served by uvicorn on this event loop, from a socket bound with SO_REUSEPORT."""

    def __init__(self, app: Callable, settings: GatewaySettings, on_stop: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_stop = on_stop
        self.socket = listening_socket(settings.host, settings.http_port)
        self.port = self.socket.getsockname()[1]
        tls = {}
        if settings.tls_cert_file and settings.tls_key_file:
            tls = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
            if settings.tls_client_ca_file:  # mutual TLS, as on the gRPC port
                tls |= {"ssl_ca_certs": str(settings.tls_client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.tls = bool(tls)
        config = uvicorn.Config(
            app,
            lifespan="off",
            http="h11",
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
            timeout_keep_alive=30,
            **tls,
        )
        self.server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]), name="http-front")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP on %s:%d%s", self.settings.host, self.port, " (TLS)" if self.tls else "")

    async def stop(self) -> None:
        """Stops accepting, ends event streams, and waits up to the shutdown grace for requests in flight."""
        if self._task is None:
            return
        if self.on_stop is not None:
            self.on_stop()
        self.server.should_exit = True
        await self._task
        self._task = None
        log.info("HTTP stopped")


class GatewayServer(GrpcServer):
    """The gateway's gRPC server with its HTTP front beside it: they start together, open to calls
    together (the HTTP front follows the gRPC start-up gate) and drain together on SIGTERM."""

    http: HttpServer | None = None

    async def start(self) -> None:
        await super().start()
        if self.http is not None:
            await self.http.start()

    async def stop(self) -> None:
        if self.http is None:
            await super().stop()
            return
        await asyncio.gather(super().stop(), self.http.stop())


def attach_http(server: GatewayServer, settings: GatewaySettings, proxy, catalog, models, training, jobs) -> None:
    """Gives the gateway's server its HTTP front, over the same proxy, catalog, model service and training
    servicer as gRPC; with the same keys file and per-tenant rate limits (the same Redis buckets)."""
    limiter = None
    if settings.redis_url and (settings.rate_limit_per_s or settings.rate_limits):
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.cache_timeout_s,
                                      socket_connect_timeout=settings.cache_timeout_s)  # fmt: skip
        limiter = RateLimiter(client, settings.rate_limit_per_s, settings.rate_limit_burst, settings.rate_limits)
    front = HttpFront(
        settings, proxy, catalog, models, OpenInferenceServicer(proxy, catalog, models), training, jobs,
        keys=KeysFile(settings.api_keys_file) if settings.api_keys_file else None,
        limiter=limiter,
        is_open=lambda: server.gate.is_open,
    )  # fmt: skip
    server.http = HttpServer(create_app(front), settings, on_stop=front.closing.set)
