"""OpenTelemetry tracing, off by default: the gateway's span for a call is the parent of the
model service's, through W3C `traceparent` metadata.

Spans and propagation come from opentelemetry-instrumentation-grpc's aio interceptors (server
and client); maas adds only its own attributes (the request id). With tracing off, no
interceptor is installed and calls pay nothing for it.

`MAAS_<PROCESS>_TRACING` chooses the exporter: `off`, `console`, `otlp` (to
`MAAS_<PROCESS>_OTLP_ENDPOINT`, gRPC) or `file:<path>` (JSON lines, one span each).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

tracer = trace.get_tracer("maas")
_enabled = False


def enabled() -> bool:
    """Whether this process exports spans; when not, calls skip span and context work entirely."""
    return _enabled


class FileSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock, self.path.open("a") as out:
            for span in spans:
                out.write(json.dumps(json.loads(span.to_json())) + "\n")
        return SpanExportResult.SUCCESS


def configure_tracing(process: str, exporter: str, otlp_endpoint: str = "localhost:4317") -> None:
    global _enabled
    if exporter == "off":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"maas-{process}"}))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    elif exporter.startswith("file:"):
        provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(Path(exporter.removeprefix("file:")))))
    else:
        raise ValueError(f"tracing: expected off, console, otlp or file:<path>, got {exporter!r}")
    trace.set_tracer_provider(provider)
    _enabled = True


def server_interceptors() -> list:
    """The OpenTelemetry server interceptor, outermost, when this process exports spans."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors() -> list | None:
    """OpenTelemetry client interceptors for an outgoing channel (they pass the trace context on)."""
    if not _enabled:
        return None
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors()
