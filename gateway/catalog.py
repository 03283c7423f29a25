"""What each family's service has loaded: models, their owners and default versions.

The gateway uses it to route model-management calls by name, to hide other tenants' private
models, and to name the version in a cache key before it calls a backend. The model services
decide; the catalog follows. It re-reads a family when a model event says something changed
there (the job queue Redis's channel), when a call meets a name it does not know (at most once
a second per family), and every `refresh_s` as a fallback for events missed while Redis was away.
A call naming a model it still does not know is NOT_FOUND: it fails closed (`check_visible`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.auth import current_principal
from gateway.backends import Backend
from maas.common.v1 import model_pb2
from maas.models.v1 import models_pb2
from shared.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    MaasError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from shared.model_events import GRAPH_CHANGED, ModelEvent, ModelEvents

log = logging.getLogger(__name__)

READY = model_pb2.ModelState.MODEL_STATE_READY
# A name nobody has loaded makes the catalog look again at most this often per family.
MISS_REFRESH_S = 1.0
MAX_REMEMBERED_OWNERS = 4096  # models whose owner is remembered; beyond, the memo starts again


class ModelCatalog:
    def __init__(
        self,
        backends: dict[str, Backend],
        refresh_s: float,
        on_reachability: Callable[[str, bool], Awaitable[None]] | None = None,
        call_timeout_s: float = 2.0,
        events: ModelEvents | None = None,
    ) -> None:
        self.backends = backends
        self.on_reachability = on_reachability
        self.reachable: dict[str, bool] = {}
        self.refresh_s = refresh_s
        self.call_timeout_s = call_timeout_s
        self.events = events or ModelEvents(None)
        self._defaults: dict[str, dict[str, int]] = {family: {} for family in backends}
        self.models: dict[str, dict[str, model_pb2.Model]] = {family: {} for family in backends}
        self._last_refresh: dict[str, float] = {family: 0.0 for family in backends}
        self._refreshing: dict[str, asyncio.Task] = {}
        # Told of GRAPH_CHANGED events, which travel on the same channel (the gateway's graph catalog).
        self.on_graph_change: Callable[[ModelEvent], Awaitable[None]] | None = None
        self._owners: dict[str, tuple[model_pb2.Model, str]] = {}  # name: (the message read, its owner)

    def default_version(self, family: str, model: str) -> int | None:
        """The default version the family's service last reported, or None for a model it has not."""
        return self._defaults[family].get(model)

    async def refresh(self, family: str) -> None:
        """Reads the family's models from its service now (one read at a time per family)."""
        task = self._refreshing.get(family)
        if task is None or task.done():
            task = self._refreshing[family] = asyncio.get_running_loop().create_task(self._refresh(family))
        await asyncio.shield(task)

    async def _refresh(self, family: str) -> None:
        backend = self.backends[family]
        self._last_refresh[family] = time.monotonic()
        request = models_pb2.ListModelsRequest(family=family).SerializeToString()
        try:
            raw = await backend.models("ListModels", request, timeout=self.call_timeout_s)
        except MaasError as exc:
            await self._set_reachable(family, False, exc.message)
            return
        await self._set_reachable(family, True)
        models = models_pb2.ListModelsResponse.FromString(raw).models
        self.models[family] = {model.name: model for model in models}
        self._defaults[family] = {
            model.name: model.default_version
            for model in models
            if any(v.version == model.default_version and v.state == READY for v in model.versions)
        }

    async def refresh_if_stale(self, family: str, min_age_s: float = MISS_REFRESH_S) -> None:
        """Refreshes unless the family was read within `min_age_s`: unknown names cannot flood a backend."""
        if time.monotonic() - self._last_refresh[family] >= min_age_s:
            await self.refresh(family)
        elif (task := self._refreshing.get(family)) is not None and not task.done():
            await asyncio.shield(task)

    def refresh_soon(self, family: str) -> None:
        """Refreshes in the background, at most once a second per family."""
        if time.monotonic() - self._last_refresh[family] >= MISS_REFRESH_S:
            task = self._refreshing.get(family)
            if task is None or task.done():
                self._refreshing[family] = asyncio.get_running_loop().create_task(self._refresh(family))

    async def _set_reachable(self, family: str, reachable: bool, why: str = "") -> None:
        if self.reachable.get(family) == reachable:
            return
        self.reachable[family] = reachable
        if reachable:
            log.info("%s service at %s is reachable", family, self.backends[family].target)
        else:
            log.warning("%s service at %s is unreachable: %s", family, self.backends[family].target, why)
        if self.on_reachability is not None:
            await self.on_reachability(family, reachable)

    def all_reachable(self) -> bool:
        return all(self.reachable.get(family) for family in self.backends)

    async def find(self, name: str) -> tuple[str, model_pb2.Model]:
        """(family, model) for a loaded model's name; looks again at stale families before saying NOT_FOUND."""
        for attempt in range(2):
            for family, models in self.models.items():
                if name in models:
                    return family, models[name]
            if attempt == 0:
                await asyncio.gather(*(self.refresh_if_stale(family) for family in self.backends))
        raise NotFoundError(f"model {name!r} not found")

    def canary(self, family: str, name: str) -> model_pb2.Canary | None:
        """The model's canary as its service last reported it (candidate READY, not the default), or None."""
        model = self.models.get(family, {}).get(name)
        return model.canary if model is not None and model.HasField("canary") else None

    def version_of(self, family: str, name: str, version: int) -> model_pb2.ModelVersion | None:
        """The loaded version as its service last described it (0: the default), or None."""
        model = self.models.get(family, {}).get(name)
        if model is None:
            return None
        version = version or model.default_version
        return next((v for v in model.versions if v.version == version), None)

    def waits_for_batch(self, family: str, name: str, version: int) -> bool:
        """Whether the service's batcher waits for batch-mates for this version (0: the default)."""
        model = self.models.get(family, {}).get(name)
        if model is None:
            return False
        version = version or model.default_version
        return any(v.version == version and v.max_queue_delay_us > 0 for v in model.versions)

    def shadow(self, family: str, name: str) -> model_pb2.Shadow | None:
        """The model's shadow as its service last reported it (READY, not the default), or None."""
        model = self.models.get(family, {}).get(name)
        return model.shadow if model is not None and model.HasField("shadow") else None

    def knows(self, family: str, name: str) -> bool:
        return name in self.models.get(family, {})

    def knows_any(self, name: str) -> bool:
        """Whether any family's service holds `name` (asked once per call, for the metrics' model label)."""
        for models in self.models.values():
            if name in models:
                return True
        return False

    def owner_of(self, family: str, name: str) -> str:
        """The tenant owning a private model; "" for a public one, or one the catalog does not know."""
        model = self.models.get(family, {}).get(name)
        return self.owner(model) if model is not None else ""

    def owner(self, model: model_pb2.Model) -> str:
        """A private model's tenant; every version of a model has the same owner. Remembered per model
        message: a refresh or a model event replaces the message, so a new one is read again."""
        seen = self._owners.get(model.name)
        if seen is not None and seen[0] is model:
            return seen[1]
        owner = next((v.owner for v in model.versions if v.owner), "")
        if len(self._owners) >= MAX_REMEMBERED_OWNERS:
            self._owners.clear()
        self._owners[model.name] = (model, owner)
        return owner

    def visible(self, model: model_pb2.Model, tenant: str) -> bool:
        return self.owner(model) in ("", tenant)

    async def check_visible(self, family: str, name: str, tenant: str) -> None:
        """NOT_FOUND, exactly as for a model that does not exist, when the model is another tenant's.

        Fails closed: a name the catalog does not know, after the read a miss may make, is NOT_FOUND here and
        never forwarded on the chance that the service holds it. A private model loaded a moment ago, before
        this gateway worker has read it (its model event is on the way), is so never served to another tenant,
        nor cached under a public key; its owner's call in that moment is NOT_FOUND too, and a retry finds it.
        A family that could not be read is UNAVAILABLE. An empty name goes on: the service says what it needs.
        """
        if not name:
            return
        model = self.models[family].get(name)
        if model is None:
            await self.refresh_if_stale(family)
            model = self.models[family].get(name)
            if model is None and not self.reachable.get(family):
                raise UnavailableError(
                    f"could not learn which models the {family} service holds (it did not answer); retry shortly"
                )
        if model is None or not self.visible(model, tenant):
            raise NotFoundError(f"model {name!r} not found")

    async def find_visible(self, name: str, tenant: str) -> tuple[str, model_pb2.Model]:
        family, model = await self.find(name)
        if not self.visible(model, tenant):
            raise NotFoundError(f"model {name!r} not found")
        return family, model

    async def check_writable(self, name: str, family: str, tenant: str, private: bool) -> None:
        """A training job may add versions only to a model of its family that the same owner holds;
        a public model's versions (new or not) need the admin role."""
        if not private and not current_principal().admin:
            raise PermissionDeniedError(
                f"output_model: training into a public model ({name!r}) needs an API key with the admin role; "
                "set private=true to train a model of your own"
            )
        try:
            owned_by_family, model = await self.find(name)
        except NotFoundError:
            return  # a new model
        if not self.visible(model, tenant):
            raise FailedPreconditionError(f"output_model: {name!r} belongs to another tenant; choose another name")
        if owned_by_family != family:
            raise InvalidArgumentError(f"output_model: {name!r} is a {owned_by_family} model, not {family}")
        owner = self.owner(model)
        if owner != (tenant if private else ""):
            kind = "private to you" if owner else "public"
            raise FailedPreconditionError(
                f"output_model: {name!r} is {kind}; set private={str(not private).lower()} or choose another name"
            )

    async def run(self) -> None:
        """Follows model events, and reads every family again each `refresh_s` in case one was missed."""
        listener = asyncio.create_task(self.events.listen(self.on_event))
        try:
            while True:
                await asyncio.gather(*(self.refresh(family) for family in self.backends))
                # Until every backend has answered once, look again sooner.
                await asyncio.sleep(self.refresh_s if self.all_reachable() else min(self.refresh_s, 0.2))
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def on_event(self, event: ModelEvent) -> None:
        if event.kind == GRAPH_CHANGED:  # a stored graph's versions, not a model
            if self.on_graph_change is not None:
                await self.on_graph_change(event)
            return
        if event.family in self.backends:
            await self.refresh(event.family)

    async def wait_all_reachable(self) -> bool:
        while not self.all_reachable():
            await asyncio.sleep(0.1)
        return True
