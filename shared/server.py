"""gRPC server plumbing shared by the gateway and the model services.

Every server gets the error interceptor, message-size limits, connection ageing, the
standard health service and reflection. Health stays NOT_SERVING until the caller says the
process is ready, and SIGTERM flips it back before draining. Until its start-up has finished
(models loaded, backends found), other calls get UNAVAILABLE, which clients retry, rather
than a NOT_FOUND for a model that is still loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import tracing
from shared.error_interceptor import ErrorInterceptor
from shared.errors import UnavailableError
from shared.handler_wrapping import MethodInterceptor, fold, wrap_handler
from shared.observability import ObservabilityInterceptor, start_metrics_server
from shared.settings import ServerSettings
from shared.workers import ready_file, worker_index

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    age_ms = int(settings.max_connection_age_s * 1000)
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_connection_age_ms", age_ms),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_s * 1000)),
        # Clients ping every 30 s; allow that without answering GOAWAY "too_many_pings".
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Several worker processes may serve this port; the kernel spreads connections over them.
        ("grpc.so_reuseport", 1),
    ]


class StartupGate(MethodInterceptor):
    """UNAVAILABLE for every call but health and reflection until `open()`: a caller retries
    instead of acting on an answer from a process that has not finished starting."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.is_open = True  # `GrpcServer.run` closes it until start-up has finished

    def open(self) -> None:
        self.is_open = True

    def close(self) -> None:
        self.is_open = False

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith("/grpc."):
            return handler
        return wrap_handler(handler, self._refuse_unary, self._refuse_stream)

    def _refuse_unary(self, behavior):
        async def refuse(request, context):
            if not self.is_open:
                raise UnavailableError(f"{self.what} is starting; retry shortly")
            return await behavior(request, context)

        return refuse

    def _refuse_stream(self, behavior):
        async def refuse(request, context):
            if not self.is_open:
                raise UnavailableError(f"{self.what} is starting; retry shortly")
            async for item in behavior(request, context):
                yield item

        return refuse


class GrpcServer:
    """A started aio server with its health servicer; `port` is the port really bound."""

    def __init__(
        self,
        settings: ServerSettings,
        register: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
        health_port: int = 0,
        known_model: Callable[[str], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.tls = credentials is not None
        self.service_names = list(service_names)
        self.gate = StartupGate("this server")
        # Outermost first: observability sees every call's final status, auth failures included.
        self.server = grpc.aio.server(
            interceptors=fold(
                [
                    *tracing.server_interceptors(),
                    ObservabilityInterceptor(known_model),
                    *interceptors,
                    ErrorInterceptor(),
                    self.gate,
                ]
            ),
            options=server_options(settings),
        )
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        address = f"{settings.host}:{settings.port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        # Probes cannot speak TLS or send keys: health alone on its own plaintext port.
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if health_port:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{settings.host}:{health_port}")

    async def start(self) -> None:
        start_metrics_server(self.settings.metrics_port, self.settings.host)
        await self.set_health(NOT_SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
            log.info("health on plaintext port %d", self.health_port)
        log.info("listening on %s:%d%s", self.settings.host, self.port, " (TLS)" if self.tls else "")

    async def set_health(self, status: int, services: Sequence[str] | None = None) -> None:
        """Sets the status of the given services, or of the server and all its services."""
        for name in ["", *self.service_names] if services is None else services:
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Health first says NOT_SERVING, so balancers stop sending; then in-flight calls drain."""
        self._mark_ready(False)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        log.info("stopped")

    async def run(self, become_ready: Callable[[], Awaitable[bool]]) -> None:
        """Serves until SIGTERM or SIGINT; health turns SERVING once `become_ready()` returns True.

        Signals are handled from the start, so a process still loading stops cleanly too.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.gate.close()
        await self.start()
        readiness = asyncio.create_task(self._serve_when_ready(become_ready))
        try:
            await stop.wait()
        finally:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness
            await self.stop()

    async def _serve_when_ready(self, become_ready: Callable[[], Awaitable[bool]]) -> None:
        ready = await become_ready()
        self.gate.open()
        if ready:
            await self.set_health(SERVING)
            self._mark_ready(True)
            log.info("serving %s", ", ".join(self.service_names))

    def _mark_ready(self, ready: bool) -> None:
        """A worker's readiness file, so its supervisor's caller can tell that every worker serves."""
        index = worker_index()
        run_dir = getattr(self.settings, "run_dir", None)
        if index is None or run_dir is None:
            return
        path = ready_file(run_dir, index)
        if ready:
            path.touch()
        else:
            path.unlink(missing_ok=True)
