"""Request ids, JSON logs and Prometheus metrics for every maas process.

One interceptor gives each call a request id (the caller's `x-request-id`, or a new one), puts
it in every log line written while serving the call and returns it in trailing metadata, and
counts the call by service, method, model, version and status code, with its latency.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from shared import tracing
from shared.handler_wrapping import MethodInterceptor, wrap_handler

log = logging.getLogger(__name__)

REQUEST_ID = contextvars.ContextVar("maas_request_id", default="")
REQUEST_ID_KEY = "x-request-id"
# The call being served and its invocation metadata: grpc.aio builds a new tuple of entries on every
# `invocation_metadata()`, so each call's is read once, by the interceptor, and shared from here.
CALL_METADATA: contextvars.ContextVar[tuple[Any, tuple]] = contextvars.ContextVar("maas_call_metadata",
                                                                                  default=(None, ()))  # fmt: skip

REQUESTS = Counter(
    "maas_requests_total", "gRPC calls by service, method, model, version and status code",
    ["service", "method", "model", "version", "code"],
)  # fmt: skip
LATENCY = Histogram(
    "maas_request_seconds", "gRPC call latency", ["service", "method", "model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
# With several workers (multiprocess metrics), memory adds up and a state is set when any worker is in it.
GPU_MEMORY = Gauge(
    "maas_gpu_memory_bytes", "GPU memory allocated by torch models", ["device"], multiprocess_mode="livesum"
)
MODEL_STATE = Gauge(
    "maas_model_state", "1 for the state each loaded model version is in", ["model", "version", "state"],
    multiprocess_mode="livemax",
)  # fmt: skip


def current_request_id() -> str:
    return REQUEST_ID.get()


def call_metadata(context) -> tuple:
    """`context`'s invocation metadata: the copy read when its call began, when it is the call being served."""
    served, metadata = CALL_METADATA.get()
    if served is context:
        return metadata
    return context.invocation_metadata() or ()


def metadata_value(context, key: str, default: str = "") -> str:
    """The first value of `key` in `context`'s invocation metadata, or `default`."""
    for name, value in call_metadata(context):
        if name == key:
            return value
    return default


_id_prefix: tuple[int, str] = (0, "")
_id_counter = itertools.count()


def new_request_id() -> str:
    """32 hex digits, as a uuid4's: 16 random ones drawn once per process, then a counter. Unique across
    processes and workers without reading the system's random source on every call (a forked child
    draws its own prefix)."""
    global _id_prefix
    pid, prefix = _id_prefix
    if pid != os.getpid():
        pid, prefix = _id_prefix = (os.getpid(), os.urandom(8).hex())
    return f"{prefix}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def add_trailing_metadata(context, key: str, value: str) -> None:
    """Adds one entry to the call's trailing metadata, keeping what is already there."""
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != key)
    context.set_trailing_metadata((*kept, (key, value)))


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    if port:
        start_http_server(port, addr=host)


def _model_and_version(request, response) -> tuple[str, str]:
    model = getattr(request, "model_name", "") or getattr(request, "name", "") if not isinstance(request, bytes) else ""
    version = getattr(response, "model_version", None) if response is not None else None
    if version in (None, 0, ""):
        version = getattr(request, "model_version", "") if not isinstance(request, bytes) else ""
    return model or "", str(version or "")


# The `model` label of a call naming no model this process has: labels are kept for models that
# exist, so a caller cycling through random names cannot grow the metrics without bound.
OTHER_MODEL = "other"


class ObservabilityInterceptor(MethodInterceptor):
    """Request id, log context, counts and latency for every call but health and reflection."""

    def __init__(self, known_model: Callable[[str], bool] | None = None) -> None:
        self.known_model = known_model
        # Label children by their label values: `labels()` hashes and locks on every call otherwise.
        self._counters: dict[tuple[str, ...], Any] = {}
        self._latencies: dict[tuple[str, ...], Any] = {}

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith("/grpc."):
            return handler
        service, _, name = method.strip("/").rpartition("/")
        return wrap_handler(
            handler,
            lambda behavior: self._observed(behavior, service, name),
            lambda behavior: self._observed_stream(behavior, service, name),
        )

    def record(self, service: str, method: str, request, response, context, started: float) -> None:
        model, version = _model_and_version(request, response)
        if model and self.known_model is not None and not self.known_model(model):
            model, version = OTHER_MODEL, ""
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else ("OK" if code in (None, 0) else str(code))
        elapsed = time.perf_counter() - started
        key = (service, method, model, version, name)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(*key)
        counter.inc()
        key = (service, method, model)
        latency = self._latencies.get(key)
        if latency is None:
            latency = self._latencies[key] = LATENCY.labels(*key)
        latency.observe(elapsed)
        if name != "OK":  # failed calls are logged (with the request id); successful ones only counted
            log.info("%s/%s model=%s failed: %s %s (%.1f ms)", service, method, model, name, context.details() or "",
                     elapsed * 1000)  # fmt: skip

    def _observed(self, behavior, service, method):
        record = self.record

        async def wrapped(request, context):
            tokens, started, response = begin_call(context), time.perf_counter(), None
            try:
                response = await behavior(request, context)
                return response
            finally:
                record(service, method, request, response, context, started)
                end_call(tokens)

        return wrapped

    def _observed_stream(self, behavior, service, method):
        record = self.record

        async def wrapped(request, context):
            tokens, started = begin_call(context), time.perf_counter()
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                record(service, method, request, None, context, started)
                end_call(tokens)

        return wrapped


def begin_call(context) -> tuple[contextvars.Token, contextvars.Token]:
    """Reads the call's metadata once (`call_metadata`), takes the caller's request id (or makes one),
    returns it in trailing metadata and logs under it. `end_call` undoes it."""
    metadata = context.invocation_metadata() or ()
    shared = CALL_METADATA.set((context, metadata))
    request_id = None
    for key, value in metadata:
        if key == REQUEST_ID_KEY:
            request_id = value
            break
    request_id = request_id or new_request_id()
    token = REQUEST_ID.set(request_id)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    if tracing.enabled():  # on the span opentelemetry-instrumentation-grpc opened for this call
        trace.get_current_span().set_attribute("maas.request_id", request_id)
    return token, shared


def end_call(tokens: tuple[contextvars.Token, contextvars.Token]) -> None:
    request_id, metadata = tokens
    REQUEST_ID.reset(request_id)
    CALL_METADATA.reset(metadata)
