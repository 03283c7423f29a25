"""Routes each family's Predict to its model service, caching results.

Requests are parsed once, for routing and the cache key; the bytes the caller sent go to the
backend unchanged, and the backend's response bytes go back to the caller and into the cache
as they are.

Versions travel in one direction. The model service decides which version a request without
`model_version` gets (its store pin, else its latest ready version). The gateway looks the
cache up under the version its catalog last heard was the default, and stores a fresh result
under the version the response says ran, so an entry always belongs to the version its key
names. The two views differ only until a model event reaches the catalog (milliseconds), or
for one catalog refresh interval when Redis is down: in that window a hit may still return
the previous default's cached result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from functools import partial

import grpc
from google.protobuf.message import DecodeError

from gateway.auth import current_principal, current_tenant
from gateway.backends import Backend
from gateway.cache import CACHE_RESULTS, ResultCache
from gateway.cache_key import request_digest, result_key
from gateway.canary import CANDIDATE, choose, record, record_labels
from gateway.catalog import ModelCatalog
from gateway.graph_catalog import GraphCatalog
from gateway.hop_batching import HopBatcher
from gateway.limits import RequestLimits
from gateway.model_stats import ModelStats
from gateway.payloads import PAYLOADS, PayloadLog, Record, cloud_event, message_json, sampled
from gateway.settings import GatewaySettings
from gateway.shadow import Copy, ShadowSender, shadow_share
from shared.errors import DeadlineExceededError, InvalidArgumentError, MaasError, PermissionDeniedError, UpstreamError
from shared.families import FAMILIES
from shared.observability import add_trailing_metadata, current_request_id, metadata_value
from shared.stored_graphs import TENANT_METADATA
from shared.tensors import to_numpy

log = logging.getLogger(__name__)

CACHE_CONTROL = "cache-control"  # request metadata: "no-cache" skips the read, "no-store" both
CACHE_OUTCOME = "maas-cache"  # trailing metadata: hit, miss, coalesced, bypass, off or error
OFF_LOOP_BYTES = 256 * 1024
SHADOWED = frozenset({"Predict", "PredictLinks", "ClassifyGraphs"})  # the rpcs whose calls a shadow gets copies of


@dataclass(frozen=True)
class FamilyRoute:
    """One unary rpc of a family's data plane: Predict, Explain, Similarity, ..."""

    family: str
    service: str
    predict_request: type
    predict_response: type
    method: str = "Predict"

    # Worked out once per route, not on every call.
    @functools.cached_property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @functools.cached_property
    def scope(self) -> str:
        return self.family if self.method == "Predict" else f"{self.family}/{self.method}"

    @functools.cached_property
    def _graph_fields(self) -> tuple[bool, bool]:
        fields = self.predict_request.DESCRIPTOR.fields_by_name
        return "graph_version" in fields, "graph" in fields

    def digest(self, request) -> str:
        return request_digest(self.scope, request)

    def floating_graph(self, request) -> bool:
        """A query on a stored graph's latest version: which version answers is known only afterwards."""
        versioned, inline = self._graph_fields
        if not versioned or request.graph_version:
            return False
        # A request with no inline graph to send (Recommend, SimilarItems) always reads the graph store.
        return bool(request.stored_graph) or not inline


def _route(family, method: str) -> FamilyRoute:
    pb2 = family.pb2()
    return FamilyRoute(family.name, family.service, getattr(pb2, f"{method}Request"), getattr(pb2, f"{method}Response"),
                       method)  # fmt: skip


# Each family's Predict; then every query rpc, and every update rpc, of every family.
ROUTES = [_route(f, "Predict") for f in FAMILIES]
ROUTE_BY_FAMILY = {route.family: route for route in ROUTES}
QUERY_ROUTES = [_route(f, method) for f in FAMILIES for method in f.queries]
QUERY_ROUTE = {(route.family, route.method): route for route in QUERY_ROUTES}
UPDATE_ROUTES = [_route(f, method) for f in FAMILIES for method in f.updates]


class GatewayProxy:
    def __init__(
        self, backends: dict[str, Backend], cache: ResultCache, catalog: ModelCatalog, settings: GatewaySettings
    ) -> None:
        self.backends = backends
        self.cache = cache
        self.catalog = catalog
        self.settings = settings
        self.stats = ModelStats()
        self.limits = RequestLimits.from_settings(settings)
        self.graphs = GraphCatalog(backends.get("gnn"))
        catalog.on_graph_change = self.graphs.changed
        # Identical requests in flight share one backend call (single-flight), keyed like the cache.
        self._in_flight: dict[str, asyncio.Task] = {}
        self._flight_waiters: dict[asyncio.Task, int] = {}  # callers waiting on each in-flight call
        self.shadows = ShadowSender(settings.shadow_queue_size, settings.shadow_workers, settings.default_deadline_s)
        self.payloads = PayloadLog(settings.queue_redis_url, settings.payload_logging, settings.payload_log_max_len)
        # (model, version, stored graph) whose graph is stored with the model, unversioned: cacheable as is.
        self._unversioned_graphs: set[tuple[str, int, str]] = set()
        # Dense Predicts merged on the hop to the dense service while its call slots are busy.
        self._hop: HopBatcher | None = None
        if settings.hop_batching and "dense" in backends:
            max_bytes = min(settings.max_request_bytes, settings.max_message_bytes)
            self._hop = HopBatcher(backends["dense"], ROUTE_BY_FAMILY["dense"].path, settings.hop_max_in_flight,
                                   settings.hop_max_rows, max_bytes)  # fmt: skip

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """Each family's data plane; model management is the gateway's ModelService."""
        methods: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for route in QUERY_ROUTES:
            methods.setdefault(route.service, {})[route.method] = grpc.unary_unary_rpc_method_handler(
                partial(self.predict, route)
            )
        for route in UPDATE_ROUTES:
            methods.setdefault(route.service, {})[route.method] = grpc.unary_unary_rpc_method_handler(
                partial(self.update, route)
            )
        return [grpc.method_handlers_generic_handler(service, handlers) for service, handlers in methods.items()]

    async def update(self, route: FamilyRoute, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """An rpc that changes a stored graph (UpdateGraph, DeleteGraphVersion), never cached, passed on as it is.

        A tenant may publish a graph of its own (UpdateGraph's new_graph_name, private to it) from any graph
        it can see, and change its own graphs; changing a public graph needs the admin role; another
        tenant's graph is NOT_FOUND, for admins too. Cached results need no invalidation: they name the
        graph version they were computed on."""
        self.limits.check_size(raw)
        try:
            request = route.predict_request.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgumentError(
                f"request is not a valid {route.predict_request.DESCRIPTOR.full_name}: {exc}"
            ) from None
        self.limits.check(request)
        tenant = current_tenant()
        await self.graphs.check_visible(request.graph_name, tenant)
        owner = self.graphs.owner(request.graph_name)
        publishes = bool(getattr(request, "new_graph_name", ""))
        if not publishes and not owner and not current_principal().admin:
            # A public graph, or one the catalog does not know (the service then says whether it exists).
            publish = route.method == "UpdateGraph"
            hint = "; set new_graph_name to publish a graph of your own from it" if publish else ""
            raise PermissionDeniedError(f"graph_name: {route.method} on the public graph {request.graph_name!r} "
                                        f"needs an API key with the admin role{hint}")  # fmt: skip
        metadata = ((TENANT_METADATA, tenant),)
        response = await self.backends[route.family].call(route.path, raw, self.timeout(context), metadata)
        if publishes:
            self.graphs.learned(request.new_graph_name, tenant)
        if route.method == "DeleteGraphVersion":  # this worker refuses the deleted version from now on
            self.graphs.deleted(request.graph_name, response)
        return response

    def _count_arm(self, route: FamilyRoute, model: str, arm: str, response: bytes, started: int) -> None:
        answer = route.predict_response.FromString(response)
        record(model, arm, answer.model_version, "OK", (time.perf_counter_ns() - started) / 1e9)
        outputs = getattr(answer, "outputs", None)
        if outputs is not None and "label" in outputs:
            try:
                record_labels(model, arm, to_numpy(outputs["label"], "label"))
            except MaasError:  # not a tensor this gateway can read: no labels to count
                pass

    def _mirror(self, route: FamilyRoute, request, response: bytes, request_id: str) -> None:
        """Offers a copy of the call to the model's shadow, when it has one and the id falls in its share."""
        shadow = self.catalog.shadow(route.family, request.model_name)
        if shadow is None or shadow_share(request_id) >= shadow.percent:
            return
        copy = route.predict_request()
        copy.CopyFrom(request)
        copy.model_version = shadow.model_version
        self.shadows.offer(Copy(request.model_name, shadow.model_version, route.path, self.backends[route.family],
                                copy.SerializeToString(), response, route.predict_response))  # fmt: skip

    def log_payload(self, family: str, model: str, version: int, request_json, response_json, request_id: str,
                    protocol: str) -> None:  # fmt: skip
        """Records a call in the payload log when the model's rate samples it. `request_json(masked)` and
        `response_json()` make the JSON of each, only then; masked feature columns go in as null."""
        rate = self.payloads.rate(model)
        if not rate or not sampled(rate, request_id):
            return
        described = self.catalog.version_of(family, model, version)
        if described is None or described.no_payload_logging:
            return
        try:
            response = response_json()
            ran = response.get("model_version") or described.version
            event = cloud_event(request_id, current_tenant(), model, ran, protocol,
                                request_json(frozenset(described.masked_features)), response)  # fmt: skip
        except Exception:  # noqa: BLE001 - a record that cannot be made never fails the call it records
            log.exception("payload record for %s could not be made", model)
            PAYLOADS.labels(model, "error").inc()
            return
        self.payloads.offer(Record(current_tenant(), model, event))

    async def close(self) -> None:
        """Stops sending shadow copies (the ones still queued are dropped); writes the queued payload records."""
        await self.shadows.close()
        await self.payloads.drain()

    def timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's remaining time less a margin for our own work, or the default deadline."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.settings.default_deadline_s
        timeout = remaining - self.settings.deadline_margin_s
        if timeout <= 0:
            raise DeadlineExceededError("the deadline passed before the gateway could forward the call")
        return timeout

    async def predict(self, route: FamilyRoute, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.limits.check_size(raw)  # before parsing: nothing grows with a request past its limits
        try:
            request = route.predict_request.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgumentError(
                f"request is not a valid {route.predict_request.DESCRIPTOR.full_name}: {exc}"
            ) from None
        return await self.predict_message(route, request, raw, context)

    async def predict_message(self, route: FamilyRoute, request, raw: bytes, context, trailing: bool = True,
                              cache_outcome: str = "", arm: str | None = None,
                              request_id: str | None = None, protocol: str = "grpc") -> bytes:  # fmt: skip
        """Predict for a parsed request whose serialized form is `raw`; returns the response bytes.

        With `trailing`, the caller's trailing metadata says what the cache did. With `cache_outcome`,
        the caller keeps a cache of its own (the Open Inference path): this one is neither read nor
        written, identical calls in flight still share one backend call, and the statistics count
        `cache_outcome`. A call that names no version of a model with a canary goes to the arm its
        request id falls in; with `arm`, the caller has chosen it (and named the version) already.
        `request_id` splits the call, and picks the calls a shadow gets copies of (the current one
        by default). A shadow's copy is sent after the answer is ready, off the caller's path. The
        call goes into the payload log, if sampled, as a call over `protocol` ("": the caller logs it).
        """
        started = time.perf_counter_ns()
        known = False
        named = bool(request.model_version)
        request_id = current_request_id() if request_id is None else request_id
        try:
            self.limits.check(request)
            await self.catalog.check_visible(route.family, request.model_name, current_tenant())
            if getattr(request, "stored_graph", ""):  # a gnn query on a stored graph: another tenant's is NOT_FOUND
                await self.graphs.check_visible(request.stored_graph, current_tenant(), request.model_name,
                                                getattr(request, "graph_version", 0))  # fmt: skip
            known = self.catalog.knows(route.family, request.model_name)
            if arm is None:
                arm = ""
                if not request.model_version:
                    version, arm = choose(self.catalog.canary(route.family, request.model_name), request_id)
                    if version:  # the candidate's share: the call names it, for the cache key and the service
                        pinned = route.predict_request()
                        pinned.CopyFrom(request)
                        pinned.model_version = version
                        request, raw = pinned, pinned.SerializeToString()
            response, outcome = await self._predict(route, request, raw, context, not cache_outcome)
            outcome = cache_outcome or outcome
        except Exception as exc:
            if known:  # statistics only for models that exist: a caller's random names cost nothing
                self.stats.failed(request.model_name, time.perf_counter_ns() - started)
            if arm:
                code = exc.code if isinstance(exc, MaasError) else grpc.StatusCode.INTERNAL
                record(request.model_name, arm, request.model_version, code.name,
                       (time.perf_counter_ns() - started) / 1e9)  # fmt: skip
            raise
        if arm:
            self._count_arm(route, request.model_name, arm, response, started)
        if not named and arm != CANDIDATE and outcome not in ("hit", "coalesced") and route.method in SHADOWED:
            self._mirror(route, request, response, request_id)
        if protocol:
            self.log_payload(route.family, request.model_name, request.model_version,
                             lambda masked: message_json(request, masked),
                             lambda: message_json(route.predict_response.FromString(response)), request_id,
                             protocol)  # fmt: skip
        if known or self.catalog.knows(route.family, request.model_name):
            self.stats.succeeded(request.model_name, time.perf_counter_ns() - started, outcome)
        if trailing:
            add_trailing_metadata(context, CACHE_OUTCOME, outcome)
        return response

    async def _predict(self, route: FamilyRoute, request, raw: bytes, context,
                       cached: bool = True) -> tuple[bytes, str]:  # fmt: skip
        """The backend's response bytes, and what the cache did: hit, miss, coalesced, bypass, off or error
        (with `cached` false, the cache is the caller's: neither read nor written, and "passed")."""
        backend = self.backends[route.family]
        timeout = self.timeout(context)
        control = metadata_value(context, CACHE_CONTROL)
        # The version the key names: the one asked for, else the default the catalog last heard of.
        version = request.model_version or self.catalog.default_version(route.family, request.model_name)
        if version is None:
            self.catalog.refresh_soon(route.family)
        policy = self.settings.cache_policy.get(request.model_name, {})
        use_cache = cached and self.cache.enabled and policy.get("enabled", True) and control != "no-store"
        # Large requests are hashed off the event loop (hashlib releases the GIL on big buffers).
        digest = await asyncio.to_thread(route.digest, request) if len(raw) > OFF_LOOP_BYTES else route.digest(request)
        owner = self.catalog.owner_of(route.family, request.model_name)
        # A query on a stored graph's latest version is never read from the cache: the graph may have
        # changed since. Its result is stored under the version that answered, for queries naming it.
        floating = route.floating_graph(request) and (request.model_name, version, request.stored_graph) not in (
            self._unversioned_graphs)  # fmt: skip
        key = result_key(route.family, request.model_name, version, digest, owner) if version and not floating else None
        if use_cache and key and control != "no-cache" and (local := self.cache.get_local(route.family, key)):
            return local, "hit"

        if not cached:
            outcome = "passed"
        elif not use_cache:
            outcome = "off" if not self.cache.enabled or not policy.get("enabled", True) else "bypass"
        elif not self.cache.available():
            outcome = "error"  # Redis failed moments ago: serve uncached until the retry interval ends
        elif control == "no-cache" or key is None:
            outcome = "bypass"
        else:
            cached = await self.cache.get(route.family, key, policy.get("ttl_s"))
            if cached is not None:
                return cached, "hit"
            outcome = "miss" if self.cache.available() else "error"
        if outcome not in ("miss", "passed"):
            CACHE_RESULTS.labels(route.family, outcome).inc()

        # Identical calls in flight share one backend call; without a known version, they share
        # whatever the backend's default is. The call runs in its own task, under the first caller's
        # deadline: a follower survives that caller going away, and calls alone if that deadline,
        # shorter than its own, ran out. When every caller has gone, the call is cancelled.
        flight = key or result_key(route.family, request.model_name, 0, digest, owner)
        shared = self._in_flight.get(flight)
        if shared is not None:
            CACHE_RESULTS.labels(route.family, "coalesced").inc()
            try:
                return await self._join(flight, shared), "coalesced"
            except UpstreamError as exc:
                if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            timeout = self.timeout(context)
        if self._hop is not None and route.family == "dense" and route.method == "Predict":
            # A version whose batcher waits for batch-mates batches there: merged here too, a call would wait twice.
            alone = self.catalog.waits_for_batch(route.family, request.model_name, request.model_version)
            call = self._hop.call(request, raw, timeout, alone)
        else:
            call = backend.call(route.path, raw, timeout)
        response = await self._join(flight, self._share(flight, call))
        if use_cache and outcome in ("miss", "bypass"):
            answer = route.predict_response.FromString(response)
            ran = answer.model_version
            if not request.model_version and ran != version:
                self.catalog.refresh_soon(route.family)  # the default moved: the catalog is behind
            if floating:
                digest = self._pinned_digest(route, request, answer.graph_version, ran)
            if not await self.cache.put(route.family, result_key(route.family, request.model_name, ran, digest, owner),
                                        response, policy.get("ttl_s")):  # fmt: skip
                outcome = "error"
        return response, outcome

    def _pinned_digest(self, route: FamilyRoute, request, graph_version: int, model_version: int) -> str:
        """The digest of `request` as if it had named the graph version that answered it."""
        if not graph_version:  # a graph stored with the model: it has no versions, so it never floats
            self._unversioned_graphs.add((request.model_name, model_version, request.stored_graph))
            return route.digest(request)
        pinned = route.predict_request()
        pinned.CopyFrom(request)
        pinned.graph_version = graph_version
        return route.digest(pinned)

    async def _join(self, flight: str, task: asyncio.Task) -> bytes:
        """Waits for an in-flight call with the callers already waiting; the last caller to go away
        cancels it, so a call nobody waits for stops (a queued dense request never leaves the gateway)."""
        self._flight_waiters[task] = self._flight_waiters.get(task, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            left = self._flight_waiters.pop(task) - 1
            if left:
                self._flight_waiters[task] = left
            elif not task.done():
                if self._in_flight.get(flight) is task:
                    del self._in_flight[flight]  # a caller arriving now starts its own call
                task.cancel()

    def _share(self, flight: str, call) -> asyncio.Task:
        """Runs `call` as the one in-flight call for `flight`, until it ends."""
        task = asyncio.get_running_loop().create_task(call)
        self._in_flight[flight] = task

        def done(finished: asyncio.Task) -> None:
            if self._in_flight.get(flight) is finished:
                del self._in_flight[flight]
            if not finished.cancelled():
                finished.exception()  # retrieved: a call nobody waits for any more must not warn

        task.add_done_callback(done)
        return task
