"""Routes each family's rpcs to its model service, caching Predict results.

Requests are parsed once, for routing and the cache key; the bytes the caller sent are
forwarded unchanged (with the resolved version appended, which protobuf merges), and the
backend's response bytes go back to the caller and into the cache as they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import grpc
from google.protobuf.message import DecodeError

from gateway.auth import current_tenant
from gateway.backends import Backend
from gateway.cache import CACHE_RESULTS, ResultCache
from gateway.cache_key import dense_digest, gnn_digest, nlp_digest, result_key
from gateway.catalog import ModelCatalog
from gateway.model_stats import ModelStats
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2
from shared.errors import DeadlineExceededError, InvalidArgumentError, UpstreamError
from shared.observability import add_trailing_metadata
from shared.settings import GatewaySettings

log = logging.getLogger(__name__)

CACHE_CONTROL = "cache-control"  # request metadata: "no-cache" skips the read, "no-store" both
CACHE_OUTCOME = "maas-cache"  # trailing metadata: hit, miss, coalesced, bypass, off or error


@dataclass(frozen=True)
class FamilyRoute:
    family: str
    service: str
    family_pb2: ModuleType
    digest: Callable[[object], str]

    @property
    def predict_request(self) -> type:
        return self.family_pb2.PredictRequest

    @property
    def predict_response(self) -> type:
        return self.family_pb2.PredictResponse


ROUTES = [
    FamilyRoute("dense", "maas.dense.v1.DenseService", dense_pb2, dense_digest),
    FamilyRoute("gnn", "maas.gnn.v1.GnnService", gnn_pb2, gnn_digest),
    FamilyRoute("nlp", "maas.nlp.v1.NlpService", nlp_pb2, nlp_digest),
]
ROUTE_BY_FAMILY = {route.family: route for route in ROUTES}
PASS_THROUGH_METHODS = (
    "ListModels",
    "GetModel",
    "ListModelVersions",
    "LoadModel",
    "UnloadModel",
    "SetDefaultVersion",
)


class GatewayProxy:
    def __init__(
        self, backends: dict[str, Backend], cache: ResultCache, catalog: ModelCatalog, settings: GatewaySettings
    ) -> None:
        self.backends = backends
        self.cache = cache
        self.catalog = catalog
        self.settings = settings
        self.stats = ModelStats()
        # Identical requests in flight share one backend call (single-flight), keyed like the cache.
        self._in_flight: dict[str, asyncio.Future] = {}

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        handlers = []
        for route in ROUTES:
            methods = {"Predict": grpc.unary_unary_rpc_method_handler(partial(self.predict, route))}
            for name in PASS_THROUGH_METHODS:
                methods[name] = grpc.unary_unary_rpc_method_handler(partial(self.forward, route, name))
            handlers.append(grpc.method_handlers_generic_handler(route.service, methods))
        return handlers

    def timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's remaining time less a margin for our own work, or the default deadline."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.settings.default_deadline_s
        timeout = remaining - self.settings.deadline_margin_s
        if timeout <= 0:
            raise DeadlineExceededError("the deadline passed before the gateway could forward the call")
        return timeout

    async def forward(self, route: FamilyRoute, method: str, raw: bytes, context) -> bytes:
        """Model and admin rpcs, with other tenants' private models hidden."""
        tenant = current_tenant()
        if method == "ListModels":
            reply = route.family_pb2.ListModelsResponse.FromString(
                await self.backends[route.family].call(method, raw, self.timeout(context))
            )
            visible = [model for model in reply.models if self.catalog.visible(model, tenant)]
            return route.family_pb2.ListModelsResponse(models=visible).SerializeToString()
        request = getattr(route.family_pb2, f"{method}Request").FromString(raw)
        await self.catalog.check_visible(route.family, request.model_name, tenant)
        return await self.backends[route.family].call(method, raw, self.timeout(context))

    async def predict(self, route: FamilyRoute, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            request = route.predict_request.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgumentError(
                f"request is not a valid {route.predict_request.DESCRIPTOR.full_name}: {exc}"
            ) from None
        return await self.predict_message(route, request, raw, context)

    async def predict_message(self, route: FamilyRoute, request, raw: bytes, context, trailing: bool = True) -> bytes:
        """Predict for a parsed request whose serialized form is `raw`; returns the response bytes.

        With `trailing`, the caller's trailing metadata says what the cache did.
        """
        started = time.perf_counter_ns()
        try:
            await self.catalog.check_visible(route.family, request.model_name, current_tenant())
            response, outcome = await self._predict(route, request, raw, context)
        except Exception:
            self.stats.failed(request.model_name, time.perf_counter_ns() - started)
            raise
        self.stats.succeeded(request.model_name, time.perf_counter_ns() - started, outcome)
        if trailing:
            add_trailing_metadata(context, CACHE_OUTCOME, outcome)
        return response

    async def _predict(self, route: FamilyRoute, request, raw: bytes, context) -> tuple[bytes, str]:
        """The backend's response bytes, and what the cache did: hit, miss, coalesced, bypass, off or error."""
        backend = self.backends[route.family]
        timeout = self.timeout(context)
        control = dict(context.invocation_metadata() or ()).get(CACHE_CONTROL, "")
        version = request.model_version or self.catalog.default_version(route.family, request.model_name)
        if version is None:
            CACHE_RESULTS.labels(route.family, "off").inc()
            return await backend.call("Predict", raw, timeout), "off"
        key = result_key(route.family, request.model_name, version, route.digest(request))
        policy = self.settings.cache_policy.get(request.model_name, {})
        use_cache = self.cache.enabled and policy.get("enabled", True) and control != "no-store"
        if use_cache and control != "no-cache" and (local := self.cache.get_local(route.family, key)) is not None:
            return local, "hit"

        if not use_cache:
            outcome = "off" if not self.cache.enabled or not policy.get("enabled", True) else "bypass"
        elif not self.cache.available():
            outcome = "error"  # Redis failed moments ago: serve uncached until the retry interval ends
        elif control == "no-cache":
            outcome = "bypass"
        else:
            cached = await self.cache.get(route.family, key, policy.get("ttl_s"))
            if cached is not None:
                return cached, "hit"
            outcome = "miss" if self.cache.available() else "error"
        if outcome != "miss":
            CACHE_RESULTS.labels(route.family, outcome).inc()

        shared = self._in_flight.get(key)
        if shared is not None:
            CACHE_RESULTS.labels(route.family, "coalesced").inc()
            return await asyncio.shield(shared), "coalesced"
        shared = self._in_flight[key] = asyncio.get_running_loop().create_future()
        shared.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
        try:
            response, pinned = await self._call_pinned(route, request, raw, version, context, timeout)
            shared.set_result(response)
        except BaseException as exc:
            shared.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            raise
        finally:
            del self._in_flight[key]
        if not pinned:
            return response, "bypass"  # another version answered: it must not be cached under this key
        if outcome in ("miss", "bypass") and use_cache:
            if not await self.cache.put(route.family, key, response, policy.get("ttl_s")):
                outcome = "error"
        return response, outcome

    async def _call_pinned(self, route: FamilyRoute, request, raw: bytes, version: int, context, timeout):
        """(response, whether the pinned version answered)."""
        # Appending a message merges it: the backend runs exactly the version the key names.
        pinned = raw + route.predict_request(model_version=version).SerializeToString()
        try:
            return await self.backends[route.family].call("Predict", pinned, timeout), True
        except UpstreamError as exc:
            if request.model_version or exc.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            # The default moved since the catalog last looked: let the backend choose.
            self.catalog.refresh_soon(route.family)
            return await self.backends[route.family].call("Predict", raw, self.timeout(context)), False
