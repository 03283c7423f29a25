"""OpenTelemetry tracing, off by default: the gateway's span for a call is the parent of the
model service's, through W3C `traceparent` metadata.

`MAAS_<PROCESS>_TRACING` chooses the exporter: `off`, `console`, `otlp` (to
`MAAS_<PROCESS>_OTLP_ENDPOINT`, gRPC) or `file:<path>` (JSON lines, one span each).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import propagate, trace
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


def extract(metadata) -> object:
    """The trace context a caller sent in its metadata."""
    return propagate.extract({key: value for key, value in metadata or () if isinstance(value, str)})


def inject() -> tuple[tuple[str, str], ...]:
    """Metadata carrying the current trace context to the next hop."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())
