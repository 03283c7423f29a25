"""Which gateway → model service calls the channel retries, and on which statuses.

A read-only query is retried on CANCELLED as well as UNAVAILABLE (a replica shutting down cancels
calls it took in but never handed to a handler); a call that changes something is retried on
UNAVAILABLE only. A misspelt name in the service config would silently drop a method back to the
catch-all, so every name must be a real rpc."""

from __future__ import annotations

import json

from google.protobuf import descriptor_pool

import gateway.proxy  # noqa: F401 - imports every family's protos into the default pool
from gateway.backends import READ_ONLY_METHODS, RETRY_SERVICE_CONFIG
from gateway.proxy import QUERY_ROUTES, UPDATE_ROUTES


def policies() -> dict[tuple[str, str], list[str]]:
    """(service, method) → retried codes; ("", "") for the catch-all."""
    config = json.loads(RETRY_SERVICE_CONFIG)
    return {(name.get("service", ""), name.get("method", "")): entry["retryPolicy"]["retryableStatusCodes"]
            for entry in config["methodConfig"] for name in entry["name"]}  # fmt: skip


def test_every_read_only_method_is_a_real_rpc():
    pool = descriptor_pool.Default()
    for service, methods in READ_ONLY_METHODS.items():
        rpcs = {method.name for method in pool.FindServiceByName(service).methods}
        assert set(methods) <= rpcs, f"{service}: {set(methods) - rpcs} are not rpcs of it"


def test_queries_are_retried_on_cancelled_and_updates_only_on_unavailable():
    retried = policies()
    assert retried["", ""] == ["UNAVAILABLE"]
    for route in QUERY_ROUTES:
        assert sorted(retried[route.service, route.method]) == ["CANCELLED", "UNAVAILABLE"], route.path
    for route in UPDATE_ROUTES:
        assert (route.service, route.method) not in retried, route.path
    # Model management (LoadModel, UnloadModel, ...) changes state: never named, so the catch-all's.
    assert not any(service == "maas.models.v1.ModelService" for service, _ in retried)
