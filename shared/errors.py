"""One error hierarchy for the whole cluster; each class carries the gRPC status it maps to.

Raise these from any layer; `ErrorInterceptor` turns them into statuses, so servicers hold no
status-code logic. Messages go to callers verbatim: say which field was wrong, what was
expected and what was got.
"""

from __future__ import annotations

import grpc


class MaasError(Exception):
    """Base of every error a caller may see. Unknown exceptions become INTERNAL instead."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(MaasError):
    """The request itself is wrong; retrying it unchanged can never succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(MaasError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(MaasError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(MaasError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(MaasError):
    """A backend or model is not ready; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(MaasError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(MaasError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(MaasError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(MaasError):
    code = grpc.StatusCode.PERMISSION_DENIED


class IntegrityError(FailedPreconditionError):
    """An artifact's sha256 does not match its manifest; it is never loaded."""


class UpstreamError(MaasError):
    """A backend answered with a status; the gateway passes it on with the backend's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DeviceUnavailableError(RuntimeError):
    """A service was told to run on a device it cannot use. Raised at start, so the process
    stops with the reason instead of serving on a device nobody asked for."""
