"""Who may see a stored graph, said once for the gnn service and the gateway that enforces it.

A graph published by a tenant (UpdateGraph with new_graph_name, through the gateway) is private
to that tenant, as a private model is: its manifest names the owner, the gateway learns
owners from GnnService.ListGraphs, and another tenant gets exactly the NOT_FOUND a graph that
does not exist gets. Graphs without an owner (the default ones) are public.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.errors import NotFoundError

# Call metadata the gateway sets on UpdateGraph: the tenant a new graph will belong to.
TENANT_METADATA = "maas-tenant"


def visible(owner: str, tenant: str) -> bool:
    return owner in ("", tenant)


def missing_graph(name: str, model_graphs: Iterable[str] = (), graph_version: int = 0) -> NotFoundError:
    """The NOT_FOUND for a stored graph that does not exist, or that is another tenant's: the same words,
    naming no other graph of the store (which might be private), only the graphs stored with the model."""
    message = f"stored_graph: no stored graph {name!r}"
    held = sorted(model_graphs)
    if held and not graph_version:
        message += f"; the model itself holds {held}"
    return NotFoundError(message)
