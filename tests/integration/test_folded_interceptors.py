"""Folded interceptors wrap each method once and still act on every call's own metadata."""

import grpc
import pytest

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.handler_wrapping import FoldedInterceptor, MethodInterceptor, fold, wrap_handler
from shared.server import GrpcServer
from shared.settings import ServerSettings


class Tagging(MethodInterceptor):
    """Appends its name and the call's `who` metadata to the response's model name; counts its wraps."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wraps = 0

    def wrap(self, handler, method):
        self.wraps += 1
        name = self.name

        def unary(behavior):
            async def wrapped(request, context):
                response = await behavior(request, context)
                who = dict(context.invocation_metadata()).get("who", "")
                response.model_name += f"{name}:{who};"
                return response

            return wrapped

        return wrap_handler(handler, unary, unary)


class PerCall(grpc.aio.ServerInterceptor):
    """A plain interceptor that hands out a new handler on every call."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        return handler._replace(unary_unary=_passing(handler.unary_unary))


def _passing(behavior):
    async def wrapped(request, context):
        return await behavior(request, context)

    return wrapped


class Echo(dense_pb2_grpc.DenseServiceServicer):
    async def Predict(self, request, context):
        return dense_pb2.PredictResponse(model_name="")


def test_fold_joins_runs_of_method_interceptors_and_keeps_the_others_in_place():
    a, b, c = Tagging("a"), Tagging("b"), Tagging("c")
    plain = PerCall()
    folded = fold([a, b, plain, c])
    assert [type(i) for i in folded] == [FoldedInterceptor, PerCall, FoldedInterceptor]
    assert folded[0].layers == [a, b] and not folded[0].innermost
    assert folded[2].layers == [c] and folded[2].innermost


@pytest.fixture
async def stub_for():
    servers, channels = [], []

    async def start(interceptors):
        server = GrpcServer(
            ServerSettings(port=0),
            lambda s: dense_pb2_grpc.add_DenseServiceServicer_to_server(Echo(), s),
            ["maas.dense.v1.DenseService"],
            interceptors=interceptors,
        )
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return dense_pb2_grpc.DenseServiceStub(channel)

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.server.stop(0)


async def test_each_method_is_wrapped_once_and_each_call_sees_its_own_metadata(stub_for):
    outer, inner = Tagging("outer"), Tagging("inner")
    stub = await stub_for([outer, inner])
    for who in ["x", "y", "x", "z"]:
        response = await stub.Predict(dense_pb2.PredictRequest(), metadata=(("who", who),))
        # inner wraps closer to the servicer, so it appends first
        assert response.model_name == f"inner:{who};outer:{who};"
    assert (outer.wraps, inner.wraps) == (1, 1)


async def test_a_run_followed_by_a_per_call_interceptor_wraps_each_new_handler(stub_for):
    outer = Tagging("outer")
    stub = await stub_for([outer, PerCall()])
    for who in ["x", "y"]:
        response = await stub.Predict(dense_pb2.PredictRequest(), metadata=(("who", who),))
        assert response.model_name == f"outer:{who};"
    assert outer.wraps == 2  # the handler below it changed on each call, so it was wrapped anew
