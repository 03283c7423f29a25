"""What the HTTP front hands the gateway's gRPC-shaped objects: a call context, and errors as HTTP statuses.

The proxy, the model service and the training servicer take a grpc context for three things: the
time left (`time_remaining`), the caller's metadata (`cache-control`, `x-request-id`) and the
trailing metadata they add (`maas-cache`). `HttpCallContext` gives them those from the HTTP request,
so an HTTP call runs through exactly the code a gRPC call runs through.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import grpc
from starlette.requests import Request

from shared.errors import InvalidArgumentError, MaasError, ResourceExhaustedError

# Request header: the caller's deadline, in seconds (a decimal number). Without it, the gateway's
# default deadline (MAAS_GATEWAY_DEFAULT_DEADLINE_S) applies, as for a gRPC call without one.
TIMEOUT_HEADER = "x-request-timeout"
MAX_TIMEOUT_S = 3600.0
# Request headers passed on as call metadata, under the same names.
FORWARDED_HEADERS = ("cache-control", "x-request-id")

# gRPC status -> HTTP status. Anything else is a 500.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
INTERNAL_MESSAGE = "internal error; the server logged the details"


class TooLargeError(ResourceExhaustedError):
    """A request body over the gateway's limit: HTTP 413 rather than the 429 of other exhaustion."""


def http_status(error: MaasError) -> int:
    if isinstance(error, TooLargeError):
        return 413
    return HTTP_STATUS.get(error.code, 500)


class HttpCallContext:
    """The parts of `grpc.aio.ServicerContext` the gateway's servicers use, for one HTTP request."""

    protocol = "rest"  # how the call came, for payload records

    def __init__(self, metadata: Iterable[tuple[str, str]], timeout_s: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._trailing: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_request(cls, request: Request) -> HttpCallContext:
        metadata = [(name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers]
        return cls(metadata, request_timeout(request))

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    def trailing(self, key: str) -> str | None:
        return next((value for name, value in self._trailing if name == key), None)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        error = MaasError(details or code.name)
        error.code = code
        raise error


def request_timeout(request: Request) -> float | None:
    """The `x-request-timeout` header in seconds, or None; a value that is no positive number is refused."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_TIMEOUT_S):
        raise InvalidArgumentError(
            f"{TIMEOUT_HEADER}: must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {raw[:40]!r}"
        )
    return value
