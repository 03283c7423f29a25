"""The interceptor maps maas errors to their status and hides unexpected ones behind INTERNAL."""

import grpc
import pytest

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.error_interceptor import INTERNAL_MESSAGE
from shared.errors import InvalidArgumentError, NotFoundError
from shared.server import GrpcServer
from shared.settings import ServerSettings


class FailingServicer(dense_pb2_grpc.DenseServiceServicer):
    async def Predict(self, request, context):
        if request.model_name == "bad":
            raise InvalidArgumentError("inputs['x']: dtype must be FP32, got FP64")
        if request.model_name == "missing":
            raise NotFoundError("model 'missing' not found")
        if request.model_name == "boom":
            raise RuntimeError("secret internal detail")
        return dense_pb2.PredictResponse(model_name=request.model_name)


@pytest.fixture
async def server():
    server = GrpcServer(
        ServerSettings(port=0),
        lambda s: dense_pb2_grpc.add_DenseServiceServicer_to_server(FailingServicer(), s),
        ["maas.dense.v1.DenseService"],
    )
    await server.start()
    yield server
    await server.server.stop(0)


@pytest.mark.parametrize(
    ("model", "code", "details"),
    [
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, "inputs['x']: dtype must be FP32, got FP64"),
        ("missing", grpc.StatusCode.NOT_FOUND, "model 'missing' not found"),
        ("boom", grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE),
    ],
)
async def test_status_and_message(server, model, code, details):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = dense_pb2_grpc.DenseServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(dense_pb2.PredictRequest(model_name=model), timeout=5)
        assert err.value.code() == code
        assert err.value.details() == details
        # The server keeps serving after every failure.
        reply = await stub.Predict(dense_pb2.PredictRequest(model_name="fine"), timeout=5)
        assert reply.model_name == "fine"


async def test_bytes_that_are_not_the_request_message_are_invalid_argument_not_unknown(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary("/maas.dense.v1.DenseService/Predict")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\xff\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message for /maas.dense.v1.DenseService/Predict" in err.value.details()
        reply = await dense_pb2_grpc.DenseServiceStub(channel).Predict(dense_pb2.PredictRequest(model_name="ok"))
        assert reply.model_name == "ok"
