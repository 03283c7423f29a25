"""The HTTP front's own metrics, and the snapshot of the gateway's counters the console charts.

Labels stay bounded: a request is counted under its route template (`/v2/models/{model_name}/infer`),
never its raw path; paths no route serves count as `unmatched`.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from shared.workers import MULTIPROC_ENV

HTTP_REQUESTS = Counter(
    "maas_http_requests_total", "HTTP requests by route template, method and status", ["route", "method", "code"]
)
HTTP_LATENCY = Histogram(
    "maas_http_request_seconds", "HTTP request latency by route template (event streams: their whole life)",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
UNMATCHED = "unmatched"
STATIC = "/console/static/{path}"


def route_template(scope) -> str:
    """The template of the route that served the request, as FastAPI matched it."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if template:
        return template
    if scope.get("path", "").startswith("/console/static/"):
        return STATIC
    return UNMATCHED


def observe(route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH") else "OTHER"
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_LATENCY.labels(route, method).observe(seconds)


def _registry():
    """Every worker's counters when the workers share a multiprocess directory, else this process's."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return REGISTRY, 1
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    workers = len({p.name.rsplit("_", 1)[-1] for p in Path(path).glob("counter_*.db")}) or 1
    return registry, workers


def snapshot() -> dict:
    """Cache outcomes and request counts, summed over the gateway's workers (blocking: file reads)."""
    registry, workers = _registry()
    cache: dict[str, float] = defaultdict(float)
    grpc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    http: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "maas_gateway_cache_total":
                cache[sample.labels.get("outcome", "")] += sample.value
            elif sample.name == "maas_requests_total":
                rpc = f"{sample.labels.get('service', '')}/{sample.labels.get('method', '')}"
                grpc[rpc][sample.labels.get("code", "")] += sample.value
            elif sample.name == "maas_http_requests_total":
                http[sample.labels.get("route", "")][sample.labels.get("code", "")] += sample.value
    return {
        "time": time.time(),
        "workers": workers,
        "cache": dict(cache),
        "grpc_requests": {k: dict(v) for k, v in grpc.items()},
        "http_requests": {k: dict(v) for k, v in http.items()},
    }
