"""Wrapping a gRPC method handler's behaviour, whatever its streaming kind, for server interceptors."""

from __future__ import annotations

from collections.abc import Callable
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
