"""maas_client: the Python SDK for maas, and `maasctl`, its command line.

See `maas_client.client` for an example; `Client` is the entry point.
"""

from maas_client.client import (
    FAMILIES,
    TERMINAL_STATES,
    Client,
    GraphPrediction,
    Prediction,
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

__all__ = [
    "FAMILIES",
    "TERMINAL_STATES",
    "AlreadyExists",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GraphPrediction",
    "InvalidArgument",
    "MaasError",
    "NotFound",
    "PermissionDenied",
    "Prediction",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "family_name",
    "state_name",
]
