"""Which version of each model is the default, as the model services report it.

The gateway needs this to build a cache key before it calls a backend; it re-reads the
backends' ListModels every few seconds and at once when it meets a model it does not know.
"""

from __future__ import annotations

import asyncio
import logging
import time

from maas.common.v1 import model_pb2
from maas.dense.v1 import dense_pb2
from maas.gnn.v1 import gnn_pb2
from maas.nlp.v1 import nlp_pb2
from gateway.backends import Backend
from shared.errors import MaasError

log = logging.getLogger(__name__)

LIST_RESPONSES = {
    "dense": dense_pb2.ListModelsResponse,
    "gnn": gnn_pb2.ListModelsResponse,
    "nlp": nlp_pb2.ListModelsResponse,
}
READY = model_pb2.ModelState.MODEL_STATE_READY


class ModelCatalog:
    def __init__(self, backends: dict[str, Backend], refresh_s: float, call_timeout_s: float = 2.0) -> None:
        self.backends = backends
        self.refresh_s = refresh_s
        self.call_timeout_s = call_timeout_s
        self._defaults: dict[str, dict[str, int]] = {family: {} for family in backends}
        self._last_refresh: dict[str, float] = {family: 0.0 for family in backends}
        self._refreshing: dict[str, asyncio.Task] = {}

    def default_version(self, family: str, model: str) -> int | None:
        version = self._defaults[family].get(model)
        if version is None:
            self.refresh_soon(family)
        return version

    async def refresh(self, family: str) -> None:
        backend = self.backends[family]
        self._last_refresh[family] = time.monotonic()
        try:
            raw = await backend.call("ListModels", b"", timeout=self.call_timeout_s)
        except MaasError as exc:
            log.debug("catalog refresh of %s failed: %s", family, exc.message)
            return
        models = LIST_RESPONSES[family].FromString(raw).models
        self._defaults[family] = {
            model.name: model.default_version
            for model in models
            if any(v.version == model.default_version and v.state == READY for v in model.versions)
        }

    def refresh_soon(self, family: str) -> None:
        """Refreshes in the background, at most once a second per family."""
        task = self._refreshing.get(family)
        if (task is None or task.done()) and time.monotonic() - self._last_refresh[family] > 1.0:
            self._refreshing[family] = asyncio.get_running_loop().create_task(self.refresh(family))

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self.refresh(family) for family in self.backends))
            await asyncio.sleep(self.refresh_s)
