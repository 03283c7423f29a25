"""A call's invocation metadata is read from grpc once, by the observability interceptor, and every
later reader (the cache-control look-ups, the API-key check, ModelStreamInfer's calls) gets that copy:
grpc.aio builds a new tuple of entries each time `invocation_metadata()` is called."""

from __future__ import annotations

import grpc
import pytest

from shared.handler_wrapping import fold
from shared.observability import ObservabilityInterceptor, call_metadata, metadata_value

METHOD = "/test.Metadata/Read"


@pytest.fixture
async def server():
    seen: list[dict] = []

    async def read(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append({
            "shared": call_metadata(context) is call_metadata(context),
            "grpc": context.invocation_metadata() is context.invocation_metadata(),
            "control": metadata_value(context, "cache-control"),
            "missing": metadata_value(context, "x-none", "default"),
            "entries": [(key, value) for key, value in call_metadata(context) if key.startswith("x-test")],
        })  # fmt: skip
        return request

    handler = grpc.method_handlers_generic_handler("test.Metadata", {"Read": grpc.unary_unary_rpc_method_handler(read)})
    aio = grpc.aio.server(interceptors=fold([ObservabilityInterceptor()]))
    aio.add_generic_rpc_handlers((handler,))
    port = aio.add_insecure_port("127.0.0.1:0")
    await aio.start()
    yield f"127.0.0.1:{port}", seen
    await aio.stop(0)


async def test_a_call_reads_its_metadata_once_and_every_reader_shares_it(server):
    target, seen = server
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        metadata = (("cache-control", "no-store"), ("x-test-a", "1"), ("x-test-b", "2"), ("x-test-a", "3"))
        assert await call(b"ping", metadata=metadata, timeout=10) == b"ping"
        await call(b"ping", timeout=10)
    first, second = seen
    assert first["shared"] and not first["grpc"]  # one tuple for the call, where grpc makes a new one each time
    assert first["control"] == "no-store" and first["missing"] == "default"
    assert sorted(first["entries"]) == [("x-test-a", "1"), ("x-test-a", "3"), ("x-test-b", "2")]  # repeats kept
    assert second["control"] == "" and second["entries"] == []  # the next call's own, not the last one's


def test_outside_a_served_call_the_context_is_asked():
    class Context:  # what the HTTP routes and ModelStreamInfer's per-message contexts hand on
        def invocation_metadata(self):
            return (("cache-control", "no-cache"),)

    assert metadata_value(Context(), "cache-control") == "no-cache"
    assert call_metadata(Context()) == (("cache-control", "no-cache"),)
