"""API keys: roles reach the handler, and the keys file is read again when it changes (no restart)."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from gateway.auth import AuthInterceptor, KeysFile, current_principal, hash_key
from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from shared.server import GrpcServer
from shared.settings import ServerSettings


class WhoAmI(dense_pb2_grpc.DenseServiceServicer):
    """Answers with the caller's tenant and roles in model_name."""

    async def Predict(self, request, context):
        principal = current_principal()
        return dense_pb2.PredictResponse(model_name=f"{principal.tenant}:{','.join(sorted(principal.roles))}")


def write_keys(path, keys: dict[str, tuple[str, list[str]]]) -> None:
    entries = [{"tenant": tenant, "sha256": hash_key(key), "roles": roles} for key, (tenant, roles) in keys.items()]
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps({"keys": entries}))
    staging.replace(path)  # as a Kubernetes Secret update does: a new file in one step


@pytest.fixture
async def gateway(tmp_path):
    keys = tmp_path / "keys.json"
    write_keys(keys, {"alpha-key": ("alpha", []), "ops-key": ("ops", ["admin"])})
    server = GrpcServer(
        ServerSettings(port=0),
        lambda s: dense_pb2_grpc.add_DenseServiceServicer_to_server(WhoAmI(), s),
        ["maas.dense.v1.DenseService"],
        [AuthInterceptor(KeysFile(keys, check_every_s=0.1))],
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield dense_pb2_grpc.DenseServiceStub(channel), keys
    await server.server.stop(0)


async def who(stub, key: str) -> str:
    reply = await stub.Predict(dense_pb2.PredictRequest(), timeout=5, metadata=(("authorization", f"Bearer {key}"),))
    return reply.model_name


async def eventually_refused(stub, key: str) -> grpc.aio.AioRpcError:
    deadline = time.monotonic() + 10
    while True:
        try:
            await who(stub, key)
        except grpc.aio.AioRpcError as exc:
            return exc
        assert time.monotonic() < deadline, "the key still works"
        await asyncio.sleep(0.05)


async def test_roles_reach_the_handler(gateway):
    stub, _ = gateway
    assert await who(stub, "alpha-key") == "alpha:"
    assert await who(stub, "ops-key") == "ops:admin"


async def test_a_removed_key_is_refused_without_a_restart_and_a_new_one_works(gateway):
    stub, keys = gateway
    assert await who(stub, "alpha-key") == "alpha:"
    write_keys(keys, {"ops-key": ("ops", ["admin"]), "beta-key": ("beta", [])})
    refused = await eventually_refused(stub, "alpha-key")
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and refused.details() == "unknown API key"
    assert await who(stub, "beta-key") == "beta:"


async def test_a_broken_keys_file_keeps_the_keys_read_before(gateway):
    stub, keys = gateway
    keys.write_text("{not json")
    await asyncio.sleep(0.3)  # more than the check interval: the bad file has been read and refused
    assert await who(stub, "alpha-key") == "alpha:"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await who(stub, "no-such-key")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
