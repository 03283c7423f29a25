"""Maps the `MaasError` hierarchy to gRPC statuses for every handler of an aio server.

Requests whose bytes are not a valid message get INVALID_ARGUMENT too: gRPC itself would answer
UNKNOWN for a request its deserializer cannot parse, before any handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from shared.errors import InvalidArgumentError, MaasError
from shared.handler_wrapping import MethodInterceptor, wrap_handler

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"


class ErrorInterceptor(MethodInterceptor):
    """Turns `MaasError` into its status and anything unexpected into a generic INTERNAL.

    The traceback of an unexpected error goes to the log, never to the caller.
    """

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        handler = handler._replace(request_deserializer=_lenient(handler.request_deserializer))
        return wrap_handler(
            handler, lambda behavior: _wrap_unary(behavior, method), lambda behavior: _wrap_stream(behavior, method)
        )


class _Malformed:
    """Stands for a request whose bytes did not parse, so the handler's wrapper can say so."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the request is malformed
            return _Malformed(exc)

    return parse


def _refuse_malformed(request: Any, method: str) -> Any:
    """The request, or its stream of requests, with malformed messages turned into INVALID_ARGUMENT."""
    if isinstance(request, _Malformed):
        raise InvalidArgumentError(f"the request is not a valid message for {method}: {request.error}")
    if hasattr(request, "__aiter__"):
        return _checked_stream(request, method)
    return request


async def _checked_stream(requests: Any, method: str) -> Any:
    async for request in requests:
        yield _refuse_malformed(request, method)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, MaasError):
        await context.abort(exc.code, exc.message)
    log.exception("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def _wrap_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(_refuse_malformed(request, method), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps every error
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in behavior(_refuse_malformed(request, method), context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, method)

    return wrapped
