"""A liveness probe for processes without a gRPC server (the trainers): GET /healthz beside /metrics.

The process beats a `Heartbeat` whenever it makes progress; /healthz answers 200 while the last
beat is recent and 503 once it is older than the allowed silence, so Kubernetes restarts a
process that hangs. Everything else on the port is prometheus_client's /metrics.
"""

from __future__ import annotations

import socketserver
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

HEALTH_PATH = "/healthz"


class Heartbeat:
    """When the process last made progress; beaten from any thread."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def silence_s(self) -> float:
        return time.monotonic() - self._last


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Probes and scrapes are not logged."""


def health_app(heartbeat: Heartbeat, max_silence_s: float):
    metrics = make_wsgi_app()

    def app(environ, start_response):
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return metrics(environ, start_response)
        silence = heartbeat.silence_s()
        if silence <= max_silence_s:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [f"ok: last progress {silence:.1f} s ago\n".encode()]
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"no progress for {silence:.1f} s (liveness_timeout_s is {max_silence_s:g})\n".encode()]

    return app


def start_metrics_and_health_server(port: int, heartbeat: Heartbeat, max_silence_s: float,
                                    host: str = "0.0.0.0") -> WSGIServer | None:  # fmt: skip
    """Serves /metrics and /healthz on one port from a daemon thread; port 0 serves nothing."""
    if not port:
        return None
    server = make_server(host, port, health_app(heartbeat, max_silence_s), _ThreadingServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-and-health", daemon=True).start()
    return server
