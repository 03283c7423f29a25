"""The gateway's model catalog fails closed: a private model the catalog has not read yet is never
forwarded to another tenant, and a family it cannot read is UNAVAILABLE, not a guess."""

import asyncio

import grpc
import pytest

import gateway.catalog
from gateway.backends import Backend
from gateway.catalog import ModelCatalog
from maas.dense.v1 import dense_pb2
from shared.errors import NotFoundError, UnavailableError
from shared.families import family
from shared.model_store import ModelStore
from shared.tensors import from_numpy
from shared.workers import free_port
from tests.integration.test_dense_admin import X_TEST, Stubs, start_dense, versioned_store  # noqa: F401 - a fixture

DENSE = family("dense")


def publish_private_copy(store: ModelStore, name: str, owner: str) -> None:
    """digits-mlp v1 again, as `name`, private to `owner`: what a tenant's training job publishes."""
    manifest = store.manifest("digits-mlp", 1)
    record = manifest.model_dump(exclude={"version", "files", "size_bytes", "created_at", "encryption"})
    artifacts = store.artifacts(manifest).check_all()
    store.publish({**record, "name": name, "owner": owner}, {f: artifacts.read(f) for f in manifest.files})


@pytest.fixture
async def dense(versioned_store, tmp_path):  # noqa: F811 - the fixture imported above
    store = ModelStore(tmp_path / "store")
    store.copy_version(versioned_store, "digits-mlp", 1)
    server, repository, poller = await start_dense(store)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Stubs(channel), store, f"127.0.0.1:{server.port}"
    poller.cancel()
    await server.server.stop(0)
    await repository.close()


async def test_a_private_model_loaded_past_the_catalog_is_not_forwarded_to_another_tenant(dense, monkeypatch):
    stubs, store, target = dense
    # A miss would make the catalog read the family again at most once an hour: only explicit reads here.
    monkeypatch.setattr(gateway.catalog, "MISS_REFRESH_S", 3600.0)
    catalog = ModelCatalog({"dense": Backend("dense", DENSE.service, target, 1 << 20)}, refresh_s=3600.0)
    await catalog.check_visible("dense", "digits-mlp", "beta")  # the first miss reads the family
    publish_private_copy(store, "alpha-secret", "alpha")
    row = X_TEST[:1]
    for _ in range(100):  # the service loads it from the store within its poll interval
        try:
            await stubs.Predict(dense_pb2.PredictRequest(model_name="alpha-secret", inputs={"pixels": from_numpy(row)}))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the dense service did not load alpha-secret")
    assert not catalog.knows("dense", "alpha-secret")  # the service serves it; the catalog has not heard

    # Not heard of: NOT_FOUND for everyone, worded as for a model that does not exist, never forwarded.
    for tenant in ("beta", "alpha", ""):
        with pytest.raises(NotFoundError) as caught:
            await catalog.check_visible("dense", "alpha-secret", tenant)
        assert caught.value.message == "model 'alpha-secret' not found"
    # Once read, its owner passes and others still get NOT_FOUND.
    await catalog.refresh("dense")
    await catalog.check_visible("dense", "alpha-secret", "alpha")
    with pytest.raises(NotFoundError):
        await catalog.check_visible("dense", "alpha-secret", "beta")
    # An empty name goes on to the service, which says the name is required.
    await catalog.check_visible("dense", "", "beta")


async def test_a_family_the_catalog_cannot_read_is_unavailable_not_forwarded():
    nobody = f"127.0.0.1:{free_port()}"
    catalog = ModelCatalog({"dense": Backend("dense", DENSE.service, nobody, 1 << 20)}, 3600.0, call_timeout_s=0.5)
    with pytest.raises(UnavailableError) as caught:
        await catalog.check_visible("dense", "digits-mlp", "beta")
    assert "dense service" in caught.value.message and "retry" in caught.value.message
