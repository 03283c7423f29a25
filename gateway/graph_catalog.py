"""Which tenant each of the gnn service's stored graphs belongs to, so the gateway keeps private graphs private.

A graph a tenant published (UpdateGraph with new_graph_name) is that tenant's; the default graphs,
and the graphs stored with a model, are public. The gateway enforces it as it enforces model
ownership, before the cache: another tenant's query, update or explanation naming the graph gets
the NOT_FOUND a graph that does not exist gets. Owners come from GnnService.ListGraphs; a graph's
owner never changes, so what was read stays true.

It fails closed. A query naming a graph the catalog does not know (published a moment ago through
another gateway worker, or no graph at all) waits for a fresh read (one at a time, shared by the
callers waiting) and is decided on it: a graph still unknown is NOT_FOUND here, never forwarded on
the chance that the service holds it, and a read that fails is UNAVAILABLE. So a private graph is
never served to another tenant in the moment before this worker learns its owner.

Versions too: a query naming a graph version the catalog does not hold is decided on a fresh read, and
the gnn service says (a model event, GRAPH_CHANGED) when a graph's versions change, so a version
deleted by DeleteGraphVersion or by retention is NOT_FOUND here at once, before the result cache,
which still holds answers computed on it.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.backends import Backend
from maas.gnn.v1 import gnn_pb2
from shared.errors import MaasError, NotFoundError, UnavailableError
from shared.families import family
from shared.model_events import ModelEvent
from shared.stored_graphs import missing_graph, visible

log = logging.getLogger(__name__)

LIST_GRAPHS = f"/{family('gnn').service}/ListGraphs"


class GraphCatalog:
    def __init__(self, backend: Backend | None, call_timeout_s: float = 2.0) -> None:
        self.backend = backend
        self.call_timeout_s = call_timeout_s
        self.owners: dict[str, str] = {}  # stored graph -> owner ("" public)
        self.model_graphs: dict[str, set[str]] = {}  # model -> the graphs stored with it
        self.versions: dict[str, list[int]] = {}  # stored graph -> the versions the store holds
        self._refreshing: asyncio.Task | None = None
        self._listed = False  # whether the latest read succeeded

    async def refresh(self) -> None:
        """Reads the stored graphs and their owners from the gnn service (one read at a time)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        try:
            raw = await self.backend.call(LIST_GRAPHS, gnn_pb2.ListGraphsRequest().SerializeToString(),
                                          self.call_timeout_s)  # fmt: skip
        except MaasError as exc:
            log.warning("stored graphs could not be listed: %s", exc.message)
            self._listed = False
            return  # what was read before stays true
        self._listed = True
        model_graphs: dict[str, set[str]] = {}
        versions: dict[str, list[int]] = {}
        for graph in gnn_pb2.ListGraphsResponse.FromString(raw).graphs:
            if graph.model_name:
                model_graphs.setdefault(graph.model_name, set()).add(graph.name)
            else:
                self.owners[graph.name] = graph.owner
                versions[graph.name] = list(graph.versions)
        self.model_graphs = model_graphs
        self.versions = versions

    def owner(self, name: str) -> str | None:
        """The graph's owner ("" public), or None when the catalog does not know it."""
        return self.owners.get(name)

    def learned(self, name: str, owner: str) -> None:
        """A graph this gateway just published or updated."""
        self.owners[name] = owner

    def deleted(self, name: str, response: bytes) -> None:
        """The versions left after a DeleteGraphVersion this gateway forwarded (its response)."""
        self.versions[name] = list(gnn_pb2.DeleteGraphVersionResponse.FromString(response).graph_versions)

    async def changed(self, event: ModelEvent) -> None:
        """The gnn service says a graph's versions changed: read them again."""
        await self.refresh()

    async def check_visible(self, name: str, tenant: str, model_name: str = "", graph_version: int = 0) -> None:
        """NOT_FOUND, in the words a missing graph gets, when `name` is another tenant's stored graph."""
        if self.backend is None or not name or name in self.model_graphs.get(model_name, ()):
            return  # a graph stored with the model comes first, whatever the store holds
        if name not in self.owners:
            await self.refresh()
            if name in self.model_graphs.get(model_name, ()):
                return
            if name not in self.owners:
                if not self._listed:
                    raise UnavailableError(f"stored_graph: could not learn who may read {name!r} from the gnn "
                                           "service; retry shortly")  # fmt: skip
                raise missing_graph(name, self.model_graphs.get(model_name, ()), graph_version)
        if not visible(self.owners[name], tenant):
            raise missing_graph(name, self.model_graphs.get(model_name, ()), graph_version)
        if graph_version > 0 and graph_version not in self.versions.get(name, ()):
            await self.refresh()  # made since the last read, or deleted: the fresh read decides
            if graph_version not in self.versions.get(name, ()):
                if not self._listed:
                    raise UnavailableError(f"graph_version: could not learn the versions of {name!r} from the gnn "
                                           "service; retry shortly")  # fmt: skip
                raise NotFoundError(f"graph_version: graph {name!r} has no version {graph_version}; "
                                    f"it has {self.versions.get(name, [])}")  # fmt: skip
