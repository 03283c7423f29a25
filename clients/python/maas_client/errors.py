"""Errors the SDK raises: one class per gRPC status a caller may want to handle on its own."""

from __future__ import annotations

import grpc


class MaasError(Exception):
    """A call to maas failed. `code` is the gRPC status; `details` says what was wrong."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None, method: str = "") -> None:
        super().__init__(details)
        if code is not None:
            self.code = code
        self.details = details
        self.method = method

    def __str__(self) -> str:
        where = f" ({self.method})" if self.method else ""
        return f"{self.code.name}{where}: {self.details}"


class InvalidArgument(MaasError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MaasError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MaasError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MaasError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MaasError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(MaasError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MaasError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(MaasError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MaasError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
    )
}


def from_rpc_error(error: grpc.RpcError, method: str = "") -> MaasError:
    """The SDK error for a failed call, keeping the server's message."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    return _BY_CODE.get(code, MaasError)(details, code, method)
