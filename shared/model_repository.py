"""The model versions a service has loaded, their state, their batchers and the default version.

Knows nothing of gRPC: it raises `MaasError`s and returns plain objects and messages.

Hot swap: a version becomes visible to requests only once it is loaded and warmed up, and the
default moves to it in one step on the event loop; requests already running keep the
predictor they resolved, so loading, unloading or switching the default fails none of them.

This repository decides each model's default version: the store's pin, else the latest ready
version that passed its gate. It hears of changes made elsewhere (a trainer's new version,
another replica's pin) through model events, and polls the store as a fallback. Store reads,
checksums and loads run on the executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from maas.common.v1 import model_pb2
from shared.batching import BatchPolicy, DynamicBatcher
from shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from shared.model_events import GRAPH_CHANGED, ModelEvent, ModelEvents
from shared.model_info import to_model_version
from shared.model_store import Artifacts, Manifest, ModelStore
from shared.observability import MODEL_STATE

if TYPE_CHECKING:
    from shared.server import GrpcServer

log = logging.getLogger(__name__)

State = model_pb2.ModelState
T = TypeVar("T")


class Predictor(Protocol):
    """A loaded model version. Its methods block; they run on the repository's executor."""

    device: str

    def warm_up(self, max_batch_size: int) -> None:
        """Runs the model once (or once per batch shape it will see), so no request pays for a first run."""

    def run_batch(self, items: list[Any]) -> Sequence[Any]:
        """Runs validated items as one batch; returns one result per item, in order."""

    def item_size(self, item: Any) -> int:
        """What an item counts against max_batch_size: rows, nodes or texts."""


Loader = Callable[[Manifest, Artifacts], Predictor]


@dataclass
class Prediction:
    """What a runtime returns: the version that ran and its outputs by name."""

    manifest: Manifest
    outputs: dict[str, Any]


@dataclass
class ModelEntry:
    manifest: Manifest
    state: int = State.MODEL_STATE_LOADING
    reason: str = ""
    predictor: Any = None
    batcher: DynamicBatcher | None = None

    def describe(self) -> model_pb2.ModelVersion:
        device = self.predictor.device if self.predictor is not None else ""
        described = to_model_version(self.manifest, self.state, self.reason, device)
        if self.batcher is not None and self.batcher.policy.enabled:
            described.max_queue_delay_us = self.batcher.policy.max_queue_delay_us
        return described


class ModelRepository:
    def __init__(
        self,
        store: ModelStore,
        family: str,
        loader: Loader,
        executor: Executor,
        batch_policy: Callable[[Manifest], BatchPolicy] = lambda manifest: BatchPolicy(),
        poll_s: float = 0.0,
        events: ModelEvents | None = None,
    ) -> None:
        self.store = store
        self.family = family
        self.loader = loader
        self.executor = executor
        self.batch_policy = batch_policy
        self.poll_s = poll_s
        self.events = events or ModelEvents(None)
        self._entries: dict[str, dict[int, ModelEntry]] = {}
        self._pins: dict[str, int] = {}
        self._canaries: dict[str, tuple[int, int]] = {}  # name: (candidate version, percent), as the store has them
        self._shadows: dict[str, tuple[int, int]] = {}  # name: (shadow version, percent), as the store has them
        # Versions an operator unloaded: the store poll must not load them back.
        self._unloaded: set[tuple[str, int]] = set()
        self._loading: dict[tuple[str, int], asyncio.Task] = {}

    # Serving life cycle

    async def serve(self, server: GrpcServer) -> None:
        """Serves until SIGTERM; health turns SERVING once the models have loaded."""
        watchers: list[asyncio.Task] = []

        async def become_ready() -> bool:
            watchers.append(asyncio.create_task(self.events.listen(self.on_event)))
            ready = await self.load_for_serving()
            if self.poll_s > 0:
                watchers.append(asyncio.create_task(self.poll_store()))
            return ready

        try:
            await server.run(become_ready)
        finally:
            for watcher in watchers:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await self.close()
            await self.events.close()

    async def close(self) -> None:
        """Lets every batcher finish what is queued, then stops their workers."""
        workers = []
        for versions in self._entries.values():
            for entry in versions.values():
                if entry.batcher is not None:
                    entry.batcher.close()
                    workers.append(entry.batcher.worker)
        await asyncio.gather(*(w for w in workers if w is not None), return_exceptions=True)

    async def load_for_serving(self) -> bool:
        await self.sync_with_store()
        if not self.ready():
            log.error("no %s model could be loaded from %s; health stays NOT_SERVING", self.family, self.store.root)
        return self.ready()

    async def sync_with_store(self) -> None:
        """Loads versions that appeared in the store and follows its default pins."""
        for name in await self.run(self.store.model_names, self.family):
            await self.sync_model(name)

    async def sync_model(self, name: str) -> None:
        """Loads a model's new versions and follows its pin, as the store has them now."""
        versions, pinned, canary, shadow = await self.run(
            lambda: (self.store.versions(name), self.store.pinned_version(name), self.store.canary(name),
                     self.store.shadow(name))  # fmt: skip
        )
        for version in versions:
            if version not in self._entries.get(name, {}) and (name, version) not in self._unloaded:
                await self.load(name, version)
        if pinned is None:
            self._pins.pop(name, None)
        else:
            self._pins[name] = pinned
        if canary is None:
            self._canaries.pop(name, None)
        else:
            self._canaries[name] = canary
        if shadow is None:
            self._shadows.pop(name, None)
        else:
            self._shadows[name] = shadow

    async def on_event(self, event: ModelEvent) -> None:
        """Another process changed a model: look at the store again now rather than at the next poll."""
        if event.family != self.family or event.kind == GRAPH_CHANGED:  # a stored graph, not a model
            return
        try:
            await self.sync_model(event.model)
        except Exception:  # noqa: BLE001 - a bad store entry must not stop the listener
            log.exception("could not follow %s", event)

    async def poll_store(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync_with_store()
            except Exception:  # noqa: BLE001 - a bad store entry must not stop the poll
                log.exception("model store poll failed")

    # Admin operations

    async def load(self, name: str, version: int = 0) -> ModelEntry:
        """Loads (name, version) unless it is already ready; version 0 is the store's latest."""
        if not name:
            raise InvalidArgumentError("model_name: required")
        if version == 0:
            versions = await self.run(self.store.versions, name)
            if not versions:
                raise NotFoundError(f"model {name!r} not found")
            version = versions[-1]
        current = self._entries.get(name, {}).get(version)
        if current is not None and current.state == State.MODEL_STATE_READY:
            return current
        key = (name, version)
        if key not in self._loading:
            self._loading[key] = asyncio.create_task(self._load(name, version))
        try:
            return await asyncio.shield(self._loading[key])
        finally:
            if self._loading.get(key) is not None and self._loading[key].done():
                self._loading.pop(key, None)

    async def _load(self, name: str, version: int) -> ModelEntry:
        manifest = await self.run(self.store.manifest, name, version)
        if manifest.family != self.family:
            raise InvalidArgumentError(
                f"model {name!r} is a {manifest.family} model; this is the {self.family} service"
            )
        versions = self._entries.setdefault(name, {})
        entry = ModelEntry(manifest)
        previous = versions.get(version)
        if previous is None:
            versions[version] = entry  # visible as LOADING; requests still go to ready versions
        try:
            predictor = await self.run(self._load_and_warm, manifest)
        except Exception as exc:  # noqa: BLE001 - a bad version must not stop the others loading
            entry.state, entry.reason = State.MODEL_STATE_FAILED, str(exc)
            log.error("could not load %s v%d: %s", name, version, exc)
            if previous is None or previous.state != State.MODEL_STATE_READY:
                versions[version] = entry
                _report_state(name, version, entry.state)
            return entry
        entry.predictor = predictor
        entry.batcher = DynamicBatcher(
            f"{name}:{version}", predictor.run_batch, predictor.item_size, self.batch_policy(manifest), self.executor
        )
        entry.state = State.MODEL_STATE_READY
        versions[version] = entry
        _report_state(name, version, entry.state)
        self._unloaded.discard((name, version))
        log.info("loaded %s v%d on %s", name, version, predictor.device)
        await self.events.publish(ModelEvent(self.family, name, "loaded", version))
        return entry

    def _load_and_warm(self, manifest: Manifest) -> Predictor:
        predictor = self.loader(manifest, self.store.artifacts(manifest).check_all())
        predictor.warm_up(self.batch_policy(manifest).max_batch_size)
        return predictor

    async def unload(self, name: str, version: int = 0) -> None:
        """Stops serving a version (0: every version). Requests already queued still run."""
        versions = self._entries.get(name)
        if not versions:
            raise NotFoundError(f"model {name!r} not found")
        targets = sorted(versions) if version == 0 else [version]
        if version and version not in versions:
            raise NotFoundError(f"model {name!r} has no loaded version {version}; loaded: {sorted(versions)}")
        pinned = self._pins.get(name)
        if version and version == pinned:
            raise FailedPreconditionError(
                f"{name!r} v{version} is the pinned default; set another default (or unpin) before unloading it"
            )
        canary = self._canaries.get(name)
        if canary is not None and (version == 0 or version == canary[0]):  # the candidate goes: the split ends
            await self.run(self.store.clear_canary, name)
            self._canaries.pop(name, None)
        shadow = self._shadows.get(name)
        if shadow is not None and (version == 0 or version == shadow[0]):  # the shadow goes: so do its copies
            await self.run(self.store.clear_shadow, name)
            self._shadows.pop(name, None)
        for target in targets:
            entry = versions.pop(target)
            self._unloaded.add((name, target))
            _report_state(name, target, State.MODEL_STATE_UNLOADED)
            if entry.batcher is not None:
                entry.batcher.close()
            log.info("unloaded %s v%d", name, target)
        if not versions:
            del self._entries[name]
        await self.events.publish(ModelEvent(self.family, name, "unloaded", version))

    async def set_default(self, name: str, version: int) -> model_pb2.Model:
        """Pins the default version in the store (0 unpins), ending any canary; every replica follows."""
        versions = self._entries.get(name)
        if versions is None:
            raise NotFoundError(f"model {name!r} not found")
        if version == 0:
            await self.run(self.store.unpin_default, name)
            self._pins.pop(name, None)
        else:
            entry = versions.get(version)
            stored = await self.run(self.store.versions, name)
            if entry is None and version not in stored:
                raise NotFoundError(f"model {name!r} has no version {version}; the store has {stored}")
            if entry is None or entry.state != State.MODEL_STATE_READY:
                state = "not loaded" if entry is None else State.Name(entry.state)
                raise FailedPreconditionError(
                    f"{name!r} v{version} is {state}; only a READY version can be the default "
                    f"(ready: {self._ready_versions(name)})"
                )
            await self.run(self.store.pin_default, name, version)
            self._pins[name] = version
        if name in self._canaries:  # promotion or rollback: the new default takes all the traffic
            await self.run(self.store.clear_canary, name)
            del self._canaries[name]
            log.info("canary of %s ended by the new default", name)
        if name in self._shadows and self._shadows[name][0] == self.default_version(name):  # the shadow promoted
            await self.run(self.store.clear_shadow, name)
            del self._shadows[name]
            log.info("shadow of %s ended: it is the default now", name)
        log.info("default of %s is now %s", name, f"v{version} (pinned)" if version else "the latest ready version")
        await self.events.publish(ModelEvent(self.family, name, "default", version))
        return self.describe(name)

    async def set_canary(self, name: str, version: int, percent: int) -> model_pb2.Model:
        """Sends `percent` of the default traffic to `version` at the gateway (percent 0 ends the split)."""
        versions = self._entries.get(name)
        if versions is None:
            raise NotFoundError(f"model {name!r} not found")
        if not 0 <= percent <= 99:
            raise InvalidArgumentError(f"percent: must be 1 to 99 (0 ends the canary), got {percent}")
        if percent == 0:
            await self.run(self.store.clear_canary, name)
            self._canaries.pop(name, None)
            log.info("canary of %s ended", name)
        else:
            entry = versions.get(version)
            if entry is None:
                stored = await self.run(self.store.versions, name)
                if version not in stored:
                    raise NotFoundError(f"model {name!r} has no version {version}; the store has {stored}")
            if entry is None or entry.state != State.MODEL_STATE_READY:
                state = "not loaded" if entry is None else State.Name(entry.state)
                raise FailedPreconditionError(
                    f"{name!r} v{version} is {state}; only a READY version can be a canary "
                    f"(ready: {self._ready_versions(name)})"
                )
            default = self.default_version(name)
            if version == default:
                raise InvalidArgumentError(
                    f"model_version: v{version} is already the default of {name!r}; pin the version that keeps "
                    "the rest of the traffic with SetDefaultVersion, then name the candidate"
                )
            if name not in self._pins and default:  # a version trained meanwhile must not take the default's share
                await self.run(self.store.pin_default, name, default)
                self._pins[name] = default
            await self.run(self.store.set_canary, name, version, percent)
            self._canaries[name] = (version, percent)
            log.info("canary of %s: v%d takes %d%% of the default traffic", name, version, percent)
        await self.events.publish(ModelEvent(self.family, name, "canary", version))
        return self.describe(name)

    async def set_shadow(self, name: str, version: int, percent: int) -> model_pb2.Model:
        """Copies `percent` of the default traffic to `version` at the gateway (percent 0 stops)."""
        versions = self._entries.get(name)
        if versions is None:
            raise NotFoundError(f"model {name!r} not found")
        if not 0 <= percent <= 100:
            raise InvalidArgumentError(f"percent: must be 1 to 100 (0 ends the shadow), got {percent}")
        if percent == 0:
            await self.run(self.store.clear_shadow, name)
            self._shadows.pop(name, None)
            log.info("shadow of %s ended", name)
        else:
            entry = versions.get(version)
            if entry is None:
                stored = await self.run(self.store.versions, name)
                if version not in stored:
                    raise NotFoundError(f"model {name!r} has no version {version}; the store has {stored}")
            if entry is None or entry.state != State.MODEL_STATE_READY:
                state = "not loaded" if entry is None else State.Name(entry.state)
                raise FailedPreconditionError(
                    f"{name!r} v{version} is {state}; only a READY version can be a shadow "
                    f"(ready: {self._ready_versions(name)})"
                )
            if version == self.default_version(name):
                raise InvalidArgumentError(
                    f"model_version: v{version} is the default of {name!r}; a shadow is another version"
                )
            await self.run(self.store.set_shadow, name, version, percent)
            self._shadows[name] = (version, percent)
            log.info("shadow of %s: v%d gets copies of %d%% of the default traffic", name, version, percent)
        await self.events.publish(ModelEvent(self.family, name, "shadow", version))
        return self.describe(name)

    def shadow(self, name: str) -> tuple[int, int] | None:
        """(version, percent) while the shadow version is READY and not the default; else None."""
        shadow = self._shadows.get(name)
        if shadow is None:
            return None
        entry = self._entries.get(name, {}).get(shadow[0])
        if entry is None or entry.state != State.MODEL_STATE_READY or shadow[0] == self.default_version(name):
            return None
        return shadow

    def canary(self, name: str) -> tuple[int, int] | None:
        """(candidate, percent) while the candidate is READY and not the default; else None."""
        canary = self._canaries.get(name)
        if canary is None:
            return None
        entry = self._entries.get(name, {}).get(canary[0])
        if entry is None or entry.state != State.MODEL_STATE_READY or canary[0] == self.default_version(name):
            return None
        return canary

    # Resolution

    def _ready_versions(self, name: str) -> list[int]:
        return sorted(v for v, e in self._entries.get(name, {}).items() if e.state == State.MODEL_STATE_READY)

    def default_version(self, name: str) -> int:
        """The pinned version, else the latest ready one that may be promoted; 0 when there is none.

        A version a training job's gate rejected is served by number but never by default.
        """
        pinned = self._pins.get(name)
        if pinned is not None and pinned in self._entries.get(name, {}):
            return pinned
        entries = self._entries.get(name, {})
        ready = [v for v in self._ready_versions(name) if entries[v].manifest.promotable]
        return ready[-1] if ready else 0

    def knows(self, name: str) -> bool:
        """Whether `name` is a model this service has (loaded, loading or failed)."""
        return name in self._entries

    def ready(self) -> bool:
        return any(self._ready_versions(name) for name in self._entries)

    def resolve(self, name: str, version: int = 0) -> ModelEntry:
        """The entry serving (name, version); version 0 means the model's default."""
        if not name:
            raise InvalidArgumentError("model_name: required; call ListModels to see the models")
        versions = self._entries.get(name)
        if versions is None:
            raise NotFoundError(f"model {name!r} not found")
        if version < 0:
            raise InvalidArgumentError(f"model_version: must be 0 (default) or positive, got {version}")
        if version == 0:
            version = self.default_version(name)
            if version == 0:
                raise UnavailableError(
                    f"model {name!r} has no default: no ready version that passed its gate; name a model_version"
                )
        entry = versions.get(version)
        if entry is None:
            raise NotFoundError(f"model {name!r} has no version {version}; it has {sorted(versions)}")
        if entry.state != State.MODEL_STATE_READY:
            raise UnavailableError(
                f"model {name!r} version {version} is {State.Name(entry.state)}"
                + (f": {entry.reason}" if entry.reason else "")
            )
        return entry

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking code on the executor, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # Descriptions

    def describe(self, name: str) -> model_pb2.Model:
        if not name:
            raise InvalidArgumentError("model_name: required")
        versions = self._entries.get(name)
        if versions is None:
            raise NotFoundError(f"model {name!r} not found")
        canary, shadow = self.canary(name), self.shadow(name)
        return model_pb2.Model(
            name=name,
            default_version=self.default_version(name),
            versions=[entry.describe() for _, entry in sorted(versions.items())],
            canary=model_pb2.Canary(model_version=canary[0], percent=canary[1]) if canary else None,
            shadow=model_pb2.Shadow(model_version=shadow[0], percent=shadow[1]) if shadow else None,
        )

    def describe_all(self) -> list[model_pb2.Model]:
        return [self.describe(name) for name in sorted(self._entries)]

    async def list_versions(self, name: str) -> tuple[int, bool, list[model_pb2.ModelVersion]]:
        """Every version in the store, loaded or not: (default, pinned?, versions)."""
        if not name:
            raise InvalidArgumentError("model_name: required")
        loaded = self._entries.get(name, {})
        stored = await self.run(self._stored_manifests, name, set(loaded))
        if not stored and not loaded:
            raise NotFoundError(f"model {name!r} not found")
        if stored and not loaded and next(reversed(stored.values())).family != self.family:
            # The store is shared by every family; each service answers for its own models only.
            raise NotFoundError(f"model {name!r} not found")
        described = []
        for version in sorted(set(stored) | set(loaded)):
            entry = loaded.get(version)
            if entry is not None:
                described.append(entry.describe())
            else:
                described.append(to_model_version(stored[version], State.MODEL_STATE_UNLOADED))
        return self.default_version(name), name in self._pins, described

    def _stored_manifests(self, name: str, skip: set[int]) -> dict[int, Manifest]:
        return {v: self.store.manifest(name, v) for v in self.store.versions(name) if v not in skip}


def _report_state(name: str, version: int, state: int) -> None:
    """maas_model_state: 1 for the version's current state, 0 for the others."""
    for candidate in (State.MODEL_STATE_LOADING, State.MODEL_STATE_READY, State.MODEL_STATE_FAILED,
                      State.MODEL_STATE_UNLOADED):  # fmt: skip
        label = State.Name(candidate).removeprefix("MODEL_STATE_")
        MODEL_STATE.labels(name, str(version), label).set(1 if candidate == state else 0)
