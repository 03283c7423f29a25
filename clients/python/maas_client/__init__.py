"""maas_client: the Python SDK for maas, and `maasctl`, its command line.

See `maas_client.client` for an example; `Client` is the entry point, and `AsyncClient` its
asyncio twin. Names are imported on
first use, so that `maasctl` can quiet gRPC's own logging before gRPC is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "FAMILIES",
    "TERMINAL_STATES",
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GraphPrediction",
    "GraphVersion",
    "InvalidArgument",
    "MaasError",
    "NotFound",
    "PermissionDenied",
    "Prediction",
    "Recommendations",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "family_name",
    "state_name",
]
_FROM_CLIENT = {"FAMILIES", "TERMINAL_STATES", "Client", "GraphPrediction", "GraphVersion", "Prediction",
                "Recommendations", "family_name", "state_name"}  # fmt: skip

if TYPE_CHECKING:
    from maas_client.aio import AsyncClient
    from maas_client.client import (
        FAMILIES,
        TERMINAL_STATES,
        Client,
        GraphPrediction,
        GraphVersion,
        Prediction,
        Recommendations,
        family_name,
        state_name,
    )
    from maas_client.errors import (
        AlreadyExists,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidArgument,
        MaasError,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'maas_client' has no attribute {name!r}")
    module = (
        "maas_client.aio"
        if name == "AsyncClient"
        else "maas_client.client"
        if name in _FROM_CLIENT
        else "maas_client.errors"
    )
    return getattr(importlib.import_module(module), name)
