import json
import shutil

import pytest

from shared.errors import IntegrityError, InvalidArgumentError, NotFoundError
from shared.model_store import ModelStore


def publish(store, tmp_path, content=b"weights"):
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(content)
    return store.publish(
        {
            "name": "m",
            "family": "dense",
            "framework": "onnx",
            "inputs": [{"name": "x", "dtype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "dtype": "FP32", "shape": [-1, 2]}],
            "metrics": {"accuracy": 0.5},
        },
        {"model.onnx": artifact},
    )


def test_versions_count_up_and_the_latest_is_default(tmp_path):
    store = ModelStore(tmp_path / "store")
    assert publish(store, tmp_path).version == 1
    assert publish(store, tmp_path, b"v2").version == 2
    assert store.versions("m") == [1, 2]
    assert store.default_version("m") == 2
    assert store.model_names() == ["m"]
    assert store.model_names("gnn") == []


def test_manifest_records_signature_sha256_metrics_and_time(tmp_path):
    store = ModelStore(tmp_path / "store")
    manifest = publish(store, tmp_path)
    reread = store.manifest("m", 1)
    assert reread == manifest
    assert len(reread.files["model.onnx"]) == 64
    assert reread.metrics == {"accuracy": 0.5}
    assert reread.inputs[0].shape == [-1, 4]
    assert reread.created_at


def test_a_pinned_default_wins_over_the_latest(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, tmp_path)
    publish(store, tmp_path)
    store.pin_default("m", 1)
    assert store.default_version("m") == 1
    with pytest.raises(NotFoundError):
        store.pin_default("m", 7)


def test_a_tampered_file_fails_verification(tmp_path):
    store = ModelStore(tmp_path / "store")
    manifest = publish(store, tmp_path)
    store.verify(manifest)
    (store.version_dir("m", 1) / "model.onnx").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="model.onnx has sha256"):
        store.verify(manifest)


def test_unknown_model_and_version_are_not_found(tmp_path):
    store = ModelStore(tmp_path / "store")
    with pytest.raises(NotFoundError):
        store.default_version("nope")
    publish(store, tmp_path)
    with pytest.raises(NotFoundError, match="no version 9"):
        store.manifest("m", 9)


def test_a_manifest_edited_after_publication_is_refused(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, tmp_path)
    path = store.version_dir("m", 1) / "manifest.json"
    path.write_text(path.read_text().replace('"accuracy": 0.5', '"accuracy": 0.99'))
    with pytest.raises(IntegrityError, match="manifest.json does not match the sha256 the store's index recorded"):
        store.manifest("m", 1)


def test_a_version_directory_the_index_does_not_list_does_not_exist(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, tmp_path)
    shutil.copytree(store.version_dir("m", 1), store.model_dir("m") / "2")  # planted beside the store's back
    assert store.versions("m") == [1]
    with pytest.raises(NotFoundError):
        store.manifest("m", 2)
    assert publish(store, tmp_path).version == 3  # never reuses a number a directory holds


def test_a_store_without_an_index_is_indexed_once_as_it_is(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, tmp_path)
    (store.model_dir("m") / "INDEX").unlink()
    assert store.versions("m") == [1]
    assert (store.model_dir("m") / "INDEX").read_text().splitlines()[0] == "family dense"


def test_an_index_and_a_pin_written_before_encryption_are_read_and_the_next_publish_converts_the_index(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, tmp_path)
    model_dir = store.model_dir("m")
    digest = (model_dir / "INDEX").read_text().splitlines()[-1].split()[1]
    (model_dir / "INDEX").unlink()
    (model_dir / "INDEX.json").write_text(json.dumps({"versions": {"1": digest}}))
    (model_dir / "DEFAULT").write_text("1\n")
    assert store.versions("m") == [1] and store.model_names("dense") == ["m"]
    assert store.pinned_version("m") == 1 and store.manifest("m", 1).metrics == {"accuracy": 0.5}
    assert publish(store, tmp_path).version == 2
    assert not (model_dir / "INDEX.json").exists()
    lines = (model_dir / "INDEX").read_text().splitlines()
    assert lines[:2] == ["family dense", f"1 {digest}"] and lines[2].startswith("2 ") and len(lines) == 3


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "UPPER", "x" * 64, "²", "a\x00b"])
def test_names_that_are_not_one_safe_directory_are_refused(tmp_path, name):
    store = ModelStore(tmp_path / "store")
    for call in (store.versions, store.pinned_version, store.model_dir):
        with pytest.raises(InvalidArgumentError, match="is not a model name"):
            call(name)


def test_loaders_open_only_files_the_manifest_lists(tmp_path):
    store = ModelStore(tmp_path / "store")
    manifest = publish(store, tmp_path)
    directory = store.verify(manifest)
    assert manifest.artifact(directory, "model.onnx") == directory / "model.onnx"
    for name in ("manifest.json", "../../etc/passwd", "other.onnx"):
        with pytest.raises(IntegrityError, match="is not one of the version's files"):
            manifest.artifact(directory, name)
