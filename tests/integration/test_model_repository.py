"""The repository loads real default models from a copy of the store and refuses tampered files."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.dense.runtime import DenseRuntime, onnx_loader
from shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from shared.model_repository import ModelRepository, State
from shared.model_store import ModelStore
from shared.onnx_session import OnnxConfig


@pytest.fixture
def store_copy(model_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(model_store.root / "digits-mlp", root / "digits-mlp")
    store = ModelStore(root)
    # A second version: same model, so it must load just like v1.
    first = store.manifest("digits-mlp", 1)
    record = first.model_dump(exclude={"version", "files", "size_bytes", "created_at"})
    store.publish(record, {name: store.version_dir("digits-mlp", 1) / name for name in first.files})
    return store


def repository(store):
    return ModelRepository(store, "dense", onnx_loader(OnnxConfig(device="cpu")), ThreadPoolExecutor(1))


async def test_versions_load_ready_and_run_on_the_cpu(store_copy):
    repo = repository(store_copy)
    await repo.sync_with_store()
    model = repo.describe("digits-mlp")
    assert model.default_version == 2
    assert [v.state for v in model.versions] == [State.MODEL_STATE_READY] * 2
    assert model.versions[0].device == "CPUExecutionProvider"
    assert model.versions[0].metrics["accuracy"] >= 0.9
    prediction = await DenseRuntime(repo).predict("digits-mlp", 1, {"pixels": np.zeros((3, 64), np.float32)})
    assert prediction.outputs["probabilities"].shape == (3, 10)
    assert prediction.manifest.version == 1


async def test_tampered_version_is_refused_and_the_other_keeps_serving(store_copy):
    with (store_copy.version_dir("digits-mlp", 2) / "model.onnx").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    repo = repository(store_copy)
    await repo.sync_with_store()
    failed = repo.describe("digits-mlp").versions[1]
    assert failed.state == State.MODEL_STATE_FAILED
    assert "sha256" in failed.state_reason
    with pytest.raises(UnavailableError, match="MODEL_STATE_FAILED"):
        repo.resolve("digits-mlp", 2)
    assert repo.resolve("digits-mlp", 1).state == State.MODEL_STATE_READY


async def test_resolve_errors_name_what_exists(store_copy):
    repo = repository(store_copy)
    await repo.sync_with_store()
    with pytest.raises(NotFoundError, match=r"^model 'nope' not found$"):  # names no other model
        repo.resolve("nope")
    with pytest.raises(NotFoundError, match=r"has no version 5; it has \[1, 2\]"):
        repo.resolve("digits-mlp", 5)
    with pytest.raises(InvalidArgumentError, match="model_name: required"):
        repo.resolve("")


async def test_a_service_lists_versions_of_its_own_family_only(store_copy):
    # The store is shared: a gnn service must not answer for the dense digits-mlp.
    gnn = ModelRepository(store_copy, "gnn", onnx_loader(OnnxConfig(device="cpu")), ThreadPoolExecutor(1))
    with pytest.raises(NotFoundError, match="model 'digits-mlp' not found"):
        await gnn.list_versions("digits-mlp")
    _, _, versions = await repository(store_copy).list_versions("digits-mlp")  # unloaded, listed from the store
    assert [v.version for v in versions] == [1, 2]


async def test_a_canary_pins_the_default_is_kept_in_the_store_and_ends_with_a_new_default(store_copy):
    repo = repository(store_copy)
    await repo.sync_with_store()
    assert repo.describe("digits-mlp").default_version == 2  # the latest, unpinned
    with pytest.raises(InvalidArgumentError, match="already the default"):
        await repo.set_canary("digits-mlp", 2, 10)
    await repo.set_default("digits-mlp", 1)
    model = await repo.set_canary("digits-mlp", 2, 10)
    assert (model.default_version, model.canary.model_version, model.canary.percent) == (1, 2, 10)
    assert store_copy.canary("digits-mlp") == (2, 10)
    # Another replica on the same store follows it.
    other = repository(store_copy)
    await other.sync_with_store()
    assert other.describe("digits-mlp").canary.percent == 10
    # Promotion (or rollback) ends the split, in the store too.
    model = await repo.set_default("digits-mlp", 2)
    assert not model.HasField("canary") and store_copy.canary("digits-mlp") is None
    await other.sync_model("digits-mlp")
    assert not other.describe("digits-mlp").HasField("canary")


async def test_a_canary_on_an_unpinned_default_pins_it_so_a_new_version_takes_no_share(store_copy):
    repo = repository(store_copy)
    await repo.sync_with_store()
    assert store_copy.pinned_version("digits-mlp") is None
    model = await repo.set_canary("digits-mlp", 1, 20)  # v2 is the default as the latest version
    assert (model.default_version, model.canary.model_version) == (2, 1)
    assert store_copy.pinned_version("digits-mlp") == 2
    # A version published meanwhile (a training job's) loads, but the split stays v2 / v1.
    first = store_copy.manifest("digits-mlp", 1)
    record = first.model_dump(exclude={"version", "files", "size_bytes", "created_at"})
    store_copy.publish(record, {name: store_copy.version_dir("digits-mlp", 1) / name for name in first.files})
    await repo.sync_with_store()
    model = repo.describe("digits-mlp")
    assert [v.version for v in model.versions] == [1, 2, 3]
    assert (model.default_version, model.canary.model_version, model.canary.percent) == (2, 1, 20)
    await repo.set_canary("digits-mlp", 0, 0)  # ends it; the pin stays
    assert not repo.describe("digits-mlp").HasField("canary") and store_copy.canary("digits-mlp") is None
    assert repo.describe("digits-mlp").default_version == 2


async def test_a_canary_is_refused_for_what_cannot_take_traffic(store_copy):
    repo = repository(store_copy)
    await repo.sync_with_store()
    await repo.set_default("digits-mlp", 1)
    with pytest.raises(InvalidArgumentError, match="percent: must be 1 to 99"):
        await repo.set_canary("digits-mlp", 2, 100)
    with pytest.raises(InvalidArgumentError, match="percent: must be 1 to 99"):
        await repo.set_canary("digits-mlp", 2, -1)
    with pytest.raises(NotFoundError, match="has no version 7"):
        await repo.set_canary("digits-mlp", 7, 10)
    with pytest.raises(NotFoundError, match="'nope' not found"):
        await repo.set_canary("nope", 2, 10)
    await repo.unload("digits-mlp", 2)
    with pytest.raises(FailedPreconditionError, match="not loaded; only a READY version can be a canary"):
        await repo.set_canary("digits-mlp", 2, 10)
    await repo.load("digits-mlp", 2)
    await repo.set_canary("digits-mlp", 2, 10)
    await repo.unload("digits-mlp", 2)  # the candidate goes: so does the split
    assert store_copy.canary("digits-mlp") is None and not repo.describe("digits-mlp").HasField("canary")
