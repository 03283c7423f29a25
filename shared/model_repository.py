"""The models a service has loaded, by name and version, with their serving state.

Knows nothing of gRPC: it raises `MaasError`s and returns plain objects and messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from maas.common.v1 import model_pb2
from shared.errors import InvalidArgumentError, NotFoundError, UnavailableError
from shared.model_info import to_model_version
from shared.model_store import Manifest, ModelStore

if TYPE_CHECKING:
    from shared.server import GrpcServer

log = logging.getLogger(__name__)

State = model_pb2.ModelState
T = TypeVar("T")


class Predictor(Protocol):
    """A loaded model version. `predict` is blocking and runs on the repository's executor."""

    device: str

    def warm_up(self) -> None: ...


Loader = Callable[[Manifest, Path], Predictor]


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


class ModelRepository:
    def __init__(self, store: ModelStore, family: str, loader: Loader, executor: Executor) -> None:
        self.store = store
        self.family = family
        self.loader = loader
        self.executor = executor
        self._entries: dict[str, dict[int, ModelEntry]] = {}
        self._defaults: dict[str, int] = {}

    async def serve(self, server: GrpcServer) -> None:
        """Serves until SIGTERM; health turns SERVING once the models have loaded."""
        await server.run(self.load_for_serving)

    async def load_for_serving(self) -> bool:
        await self.load_all()
        if not self.ready():
            log.error("no %s model could be loaded from %s; health stays NOT_SERVING", self.family, self.store.root)
        return self.ready()

    async def load_all(self) -> None:
        """Loads every version of every model of this family; a failure is recorded, not raised."""
        for name in self.store.model_names(self.family):
            for version in self.store.versions(name):
                await self.load(name, version)
            self._defaults[name] = self.store.default_version(name)

    async def load(self, name: str, version: int) -> ModelEntry:
        entry = ModelEntry(self.store.manifest(name, version))
        self._entries.setdefault(name, {})[version] = entry
        try:
            directory = self.store.verify(entry.manifest)
            entry.predictor = await self.run(self._load_and_warm, entry.manifest, directory)
            entry.state = State.MODEL_STATE_READY
            log.info("loaded %s v%d on %s", name, version, entry.predictor.device)
        except Exception as exc:  # noqa: BLE001 - a bad version must not stop the others loading
            entry.state, entry.reason = State.MODEL_STATE_FAILED, str(exc)
            log.error("could not load %s v%d: %s", name, version, exc)
        return entry

    def _load_and_warm(self, manifest: Manifest, directory: Path) -> Predictor:
        predictor = self.loader(manifest, directory)
        predictor.warm_up()
        return predictor

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking model code on the executor, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def ready(self) -> bool:
        return any(
            entry.state == State.MODEL_STATE_READY for versions in self._entries.values() for entry in versions.values()
        )

    def resolve(self, name: str, version: int = 0) -> ModelEntry:
        """The entry serving (name, version); version 0 means the model's default."""
        if not name:
            raise InvalidArgumentError("model_name: required; call ListModels to see the models")
        versions = self._entries.get(name)
        if versions is None:
            raise NotFoundError(f"model {name!r} not found; this {self.family} service serves {sorted(self._entries)}")
        if version < 0:
            raise InvalidArgumentError(f"model_version: must be 0 (default) or positive, got {version}")
        version = version or self._defaults[name]
        entry = versions.get(version)
        if entry is None:
            raise NotFoundError(f"model {name!r} has no version {version}; it has {sorted(versions)}")
        if entry.state != State.MODEL_STATE_READY:
            raise UnavailableError(
                f"model {name!r} version {version} is {State.Name(entry.state)}"
                + (f": {entry.reason}" if entry.reason else "")
            )
        return entry

    def describe(self, name: str) -> model_pb2.Model:
        if not name:
            raise InvalidArgumentError("model_name: required")
        versions = self._entries.get(name)
        if versions is None:
            raise NotFoundError(f"model {name!r} not found; this service serves {sorted(self._entries)}")
        return model_pb2.Model(
            name=name,
            default_version=self._defaults.get(name, 0),
            versions=[
                to_model_version(
                    entry.manifest,
                    entry.state,
                    entry.reason,
                    entry.predictor.device if entry.predictor is not None else "",
                )
                for _, entry in sorted(versions.items())
            ],
        )

    def describe_all(self) -> list[model_pb2.Model]:
        return [self.describe(name) for name in sorted(self._entries)]
