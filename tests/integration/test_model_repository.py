"""The repository loads real default models from a copy of the store and refuses tampered files."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.dense.runtime import DenseRuntime, onnx_loader
from shared.errors import InvalidArgumentError, NotFoundError, UnavailableError
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
