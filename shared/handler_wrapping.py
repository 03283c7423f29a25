"""Wrapping gRPC method handlers once per method, and folding several such wrappers into one interceptor.

A grpc.aio server runs every interceptor's `intercept_service` coroutine on every call, and the
interceptors that wrapped each call's handler anew paid for closures and a new handler per call.
A `MethodInterceptor` wraps a method's handler once, the first time the method is called; what it
does per call it does inside the wrapped behaviour, from that call's context (its metadata, its
deadline). `FoldedInterceptor` applies several of them as one interceptor, so a call pays one
`intercept_service` and one dict look-up however many layers the server has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

Behavior = Callable[..., Any]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    around_unary: Callable[[Behavior], Behavior],
    around_stream: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler:
    """`around_unary` wraps behaviours that return one response (unary-unary, stream-unary),
    `around_stream` those that yield responses (unary-stream, stream-stream)."""
    if handler.unary_unary:
        return handler._replace(unary_unary=around_unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=around_unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=around_stream(handler.unary_stream))
    return handler._replace(stream_stream=around_stream(handler.stream_stream))


class MethodInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor whose wrapping depends on the method alone; subclasses implement `wrap`."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        folded = self.__dict__.get("_alone")
        if folded is None:  # used on its own, not folded with others
            folded = self.__dict__["_alone"] = FoldedInterceptor([self], innermost=False)
        return await folded.intercept_service(continuation, details)


class FoldedInterceptor(grpc.aio.ServerInterceptor):
    """Several `MethodInterceptor`s (outermost first) as one interceptor; each method is wrapped once.

    `innermost` says that no interceptor follows, so the server's handler for a method never changes
    and a call that finds its method wrapped need not look the handler up at all. Otherwise the
    handler is looked up on every call and wrapped again whenever it is not the one last wrapped.
    """

    def __init__(self, layers: Sequence[MethodInterceptor], innermost: bool = True) -> None:
        self.layers = list(layers)
        self.innermost = innermost
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrapped(self, handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
        """`handler` (the method's own) inside every layer; cached per method."""
        if handler is None:
            return None
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = handler
        for layer in reversed(self.layers):
            wrapped = layer.wrap(wrapped, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self.innermost:
            cached = self._wrapped.get(details.method)
            if cached is not None:
                return cached[1]
        return self.wrapped(await continuation(details), details.method)


def fold(interceptors: Sequence[grpc.aio.ServerInterceptor]) -> list[grpc.aio.ServerInterceptor]:
    """The same interceptors with each run of consecutive `MethodInterceptor`s folded into one."""
    folded: list[grpc.aio.ServerInterceptor] = []
    run: list[MethodInterceptor] = []
    for interceptor in [*interceptors, None]:
        if isinstance(interceptor, MethodInterceptor):
            run.append(interceptor)
            continue
        if run:
            folded.append(FoldedInterceptor(run, innermost=interceptor is None))
            run = []
        if interceptor is not None:
            folded.append(interceptor)
    return folded
