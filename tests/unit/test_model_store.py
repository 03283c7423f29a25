import pytest

from shared.errors import IntegrityError, NotFoundError
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
