"""Versions, admin rpcs, hot swap and queue limits on a real dense service over a copy of the store."""

import asyncio
import shutil
import time

import grpc
import numpy as np
import pytest

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from services.dense.__main__ import FAMILY
from services.dense.datasets import digits_split
from services.dense.quantize import quantize_version
from services.dense.runtime import DenseRuntime, onnx_loader
from services.dense.servicer import DenseServicer
from services.dense.settings import DenseSettings
from shared.batching import BATCH_SIZE, SKIPPED
from shared.model_repository import State
from shared.model_service import build_repository
from shared.model_servicer import SERVICE_NAME as MODEL_SERVICE
from shared.model_servicer import ModelServicer
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig, cuda_usable
from shared.server import GrpcServer
from shared.tensors import from_numpy, to_numpy

_, X_TEST, _, Y_TEST = digits_split()


@pytest.fixture(scope="module")
def versioned_store(model_store, tmp_path_factory):
    """digits-mlp v1 (fp32) and v2 (INT8-quantized): two genuinely different versions."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(model_store.root / "digits-mlp", root / "digits-mlp")
    for stale in (root / "digits-mlp").glob("[!1]*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    store = ModelStore(root)
    quantize_version(store, "digits-mlp", 1)  # keeps v1 the (pinned) default
    return store


async def start_dense(store: ModelStore, **overrides):
    settings = DenseSettings(port=0, model_store=store.root, store_poll_s=0.2, **overrides)
    repository = build_repository(settings, "dense", onnx_loader(OnnxConfig.from_settings(settings)))
    def register(server: grpc.aio.Server) -> None:
        dense_pb2_grpc.add_DenseServiceServicer_to_server(DenseServicer(DenseRuntime(repository)), server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(repository), server)

    server = GrpcServer(settings, register, [FAMILY.service, MODEL_SERVICE])
    await server.start()
    assert await repository.load_for_serving()
    poller = asyncio.create_task(repository.poll_store())
    return server, repository, poller


@pytest.fixture
async def dense(versioned_store, tmp_path):
    store = ModelStore(tmp_path / "store")
    shutil.copytree(versioned_store.root, store.root)
    server, repository, poller = await start_dense(store)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Stubs(channel), store, repository
    poller.cancel()
    await server.server.stop(0)
    await repository.close()


class Stubs:
    """The dense data plane (Predict) and ModelService (the rest) of one server, as one stub."""

    def __init__(self, channel) -> None:
        self.dense = dense_pb2_grpc.DenseServiceStub(channel)
        self.models = models_pb2_grpc.ModelServiceStub(channel)

    def __getattr__(self, method: str):
        return getattr(self.dense if method == "Predict" else self.models, method)


def batches_run(model: str) -> float:
    for metric in BATCH_SIZE.collect():
        for sample in metric.samples:
            if sample.name == "maas_batch_size_count" and sample.labels == {"model": model}:
                return sample.value
    return 0.0


def digits_request(version=0, rows=slice(0, 4)):
    return dense_pb2.PredictRequest(
        model_name="digits-mlp", model_version=version, inputs={"pixels": from_numpy(X_TEST[rows])}
    )


async def versions(stub):
    reply = await stub.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name="digits-mlp"), timeout=10)
    return reply.default_version, reply.default_pinned, {v.version: v for v in reply.versions}


async def test_two_versions_side_by_side_then_switch_and_roll_back(dense):
    stub, _, _ = dense
    default, pinned, listed = await versions(stub)
    assert (default, pinned) == (1, True)
    assert {v: listed[v].state for v in listed} == {1: State.MODEL_STATE_READY, 2: State.MODEL_STATE_READY}
    assert listed[2].size_bytes < listed[1].size_bytes  # INT8 weights are smaller
    v1 = await stub.Predict(digits_request(1, slice(None)), timeout=10)
    v2 = await stub.Predict(digits_request(2, slice(None)), timeout=10)
    assert (v1.model_version, v2.model_version) == (1, 2)
    p1, p2 = to_numpy(v1.outputs["probabilities"], "p"), to_numpy(v2.outputs["probabilities"], "p")
    assert not np.array_equal(p1, p2)
    for reply in (v1, v2):
        assert (to_numpy(reply.outputs["label"], "label") == Y_TEST).mean() >= 0.9

    assert (await stub.Predict(digits_request(), timeout=10)).model_version == 1
    switched = await stub.SetDefaultVersion(
        models_pb2.SetDefaultVersionRequest(model_name="digits-mlp", model_version=2), timeout=10
    )
    assert switched.model.default_version == 2
    assert (await stub.Predict(digits_request(), timeout=10)).model_version == 2
    # Roll back.
    await stub.SetDefaultVersion(
        models_pb2.SetDefaultVersionRequest(model_name="digits-mlp", model_version=1), timeout=10
    )
    assert (await stub.Predict(digits_request(), timeout=10)).model_version == 1
    # Unpinned, the latest ready version is the default.
    await stub.SetDefaultVersion(models_pb2.SetDefaultVersionRequest(model_name="digits-mlp"), timeout=10)
    assert (await versions(stub))[:2] == (2, False)


async def test_unload_and_load_again(dense):
    stub, _, _ = dense
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UnloadModel(models_pb2.UnloadModelRequest(model_name="digits-mlp", model_version=1), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pinned default" in err.value.details()

    await stub.UnloadModel(models_pb2.UnloadModelRequest(model_name="digits-mlp", model_version=2), timeout=10)
    assert (await versions(stub))[2][2].state == State.MODEL_STATE_UNLOADED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(digits_request(2), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await asyncio.sleep(0.5)  # the store poll must not bring back a version an operator unloaded
    assert (await versions(stub))[2][2].state == State.MODEL_STATE_UNLOADED

    loaded = await stub.LoadModel(models_pb2.LoadModelRequest(model_name="digits-mlp", model_version=2), timeout=30)
    assert loaded.version.state == State.MODEL_STATE_READY
    assert (await stub.Predict(digits_request(2), timeout=10)).model_version == 2


async def test_a_tampered_version_is_refused_while_the_old_one_keeps_serving(dense):
    stub, store, _ = dense
    second = store.manifest("digits-mlp", 2)
    record = second.model_dump(exclude={"version", "files", "size_bytes", "created_at"})
    store.publish(record, {name: store.version_dir("digits-mlp", 2) / name for name in second.files})
    onnx_file = store.version_dir("digits-mlp", 3) / "model.onnx"  # changed after it was published
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.LoadModel(models_pb2.LoadModelRequest(model_name="digits-mlp", model_version=3), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model.onnx has sha256" in err.value.details()
    listed = (await versions(stub))[2]
    assert listed[3].state == State.MODEL_STATE_FAILED and "sha256" in listed[3].state_reason
    reply = await stub.Predict(digits_request(), timeout=10)
    assert reply.model_version == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetDefaultVersion(
            models_pb2.SetDefaultVersionRequest(model_name="digits-mlp", model_version=3), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_hot_swap_under_load_fails_no_request(dense):
    stub, store, _ = dense
    failures, served = [], []
    stop = asyncio.Event()

    async def caller():
        while not stop.is_set():
            try:
                reply = await stub.Predict(digits_request(), timeout=10)
                served.append(reply.model_version)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)

    callers = [asyncio.create_task(caller()) for _ in range(16)]
    await asyncio.sleep(0.3)
    # A new version published to the store is picked up by the poll while calls flow.
    quantize_version(store, "digits-mlp", 1)
    for _ in range(100):
        listed = (await versions(stub))[2]
        if 3 in listed and listed[3].state == State.MODEL_STATE_READY:
            break
        await asyncio.sleep(0.1)
    for version in (3, 2, 1, 3):
        await stub.SetDefaultVersion(
            models_pb2.SetDefaultVersionRequest(model_name="digits-mlp", model_version=version), timeout=10
        )
        await asyncio.sleep(0.2)
    await stub.UnloadModel(models_pb2.UnloadModelRequest(model_name="digits-mlp", model_version=2), timeout=10)
    await stub.LoadModel(models_pb2.LoadModelRequest(model_name="digits-mlp", model_version=2), timeout=30)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*callers)
    assert failures == []
    assert len(served) > 100
    assert {1, 3} <= set(served)


async def test_get_model_reports_the_provider_it_runs_on(dense):
    stub, _, _ = dense
    model = (await stub.GetModel(models_pb2.GetModelRequest(model_name="digits-mlp"), timeout=10)).model
    expected = "CUDAExecutionProvider" if cuda_usable() else "CPUExecutionProvider"
    assert {v.device for v in model.versions} == {expected}


async def test_a_full_queue_answers_resource_exhausted_and_expired_requests_are_skipped(versioned_store):
    # A long queue delay holds the first request in the queue, so the queue (size 1) is full.
    server, repository, poller = await start_dense(versioned_store, max_queue_size=1, max_queue_delay_us=1_000_000)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = dense_pb2_grpc.DenseServiceStub(channel)
            calls = [stub.Predict(digits_request(1), timeout=10) for _ in range(4)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(refused) == 3
            assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
            assert "queue is full" in refused[0].details() and "max_queue_size=1" in refused[0].details()
            assert sum(isinstance(r, dense_pb2.PredictResponse) for r in results) == 1

            expired = SKIPPED.labels("digits-mlp:1", "expired")
            expired_before = expired._value.get()
            batches_before = batches_run("digits-mlp:1")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(digits_request(1), timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The worker looks at the queue once the 1 s delay is over, and drops the request unrun.
            deadline = time.monotonic() + 10
            while expired._value.get() == expired_before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert expired._value.get() == expired_before + 1
            assert batches_run("digits-mlp:1") == batches_before
    finally:
        poller.cancel()
        await server.server.stop(0)
        await repository.close()
