"""Envelope encryption of the stores: the sealed formats, KEKs and their policy, the model store and the
data-set store sealed, re-wrapped and read back, checkpoints, in-memory quantization, and CSV columns a
job drops or masks."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from services.dense.datasets import ColumnFilter, parse, parse_csv
from services.dense.quantize import quantize_dynamic_bytes
from services.dense.training import build_network
from shared.datasets import DatasetStore
from shared.envelope import (
    CHUNK_BYTES,
    ENVELOPE_MAGIC,
    RECORD_OVERHEAD,
    SEALED_MAGIC,
    STREAM_HEAD,
    SealedWriter,
    is_envelope,
    new_data_key,
    open_sealed,
    open_stream,
    plaintext_size,
    split_envelope,
)
from shared.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError
from shared.keyring import MARKER, KekPolicy, Keyring, KeyUnavailableError, check_kek_id, create_kek
from shared.model_store import INDEX, MANIFEST, ModelStore

CHUNK = 64  # small chunks, so that a few bytes make many


def sealed(data: bytes, key: bytes, context: bytes = b"test", pieces: int = 1) -> bytes:
    out = io.BytesIO()
    writer = SealedWriter(out, key, context, CHUNK)
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        writer.write(data[start : start + step])
    writer.close()
    return out.getvalue()


def records(blob: bytes) -> list[bytes]:
    body = blob[STREAM_HEAD:]
    size = CHUNK + RECORD_OVERHEAD
    return [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("length", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_a_sealed_stream_opens_to_what_was_written_however_it_was_cut(length, pieces):
    key, data = new_data_key(), os.urandom(length)
    blob = sealed(data, key, pieces=pieces)
    assert blob.startswith(SEALED_MAGIC)
    assert length < 8 or data[:8] not in blob
    assert open_sealed(blob, key, b"test") == data
    assert b"".join(open_stream(io.BytesIO(blob), key, b"test")) == data
    assert plaintext_size(len(blob), CHUNK) == length
    # Every chunk but the last holds a whole chunk; the last holds less (and is there even when empty).
    assert len(records(blob)) == length // CHUNK + 1


def test_each_chunk_has_its_own_nonce():
    blob = sealed(b"\0" * (5 * CHUNK), new_data_key())
    nonces = [record[:12] for record in records(blob)]
    assert len(set(nonces)) == len(nonces)
    assert len({record[12:] for record in records(blob)[:-1]}) == 5  # same plaintext, different ciphertexts


def refusals(blob: bytes, key: bytes) -> list[str]:
    messages = []
    whole = lambda: open_sealed(blob, key, b"test")  # noqa: E731
    streamed = lambda: b"".join(open_stream(io.BytesIO(blob), key, b"test"))  # noqa: E731
    for opener in (whole, streamed):
        with pytest.raises(IntegrityError) as err:
            opener()
        messages.append(err.value.message)
    return messages


def test_a_flipped_byte_anywhere_in_the_ciphertext_is_refused():
    key, data = new_data_key(), os.urandom(3 * CHUNK + 10)
    blob = sealed(data, key)
    for position in range(STREAM_HEAD, len(blob), 7):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        assert all("does not authenticate" in m or "cut short" in m for m in refusals(bytes(tampered), key))


def test_chunks_cannot_be_reordered_dropped_truncated_or_extended():
    key = new_data_key()
    blob = sealed(os.urandom(3 * CHUNK + 10), key)
    head, parts = blob[:STREAM_HEAD], records(blob)
    for altered in (
        head + parts[1] + parts[0] + parts[2] + parts[3],  # reordered
        head + parts[0] + parts[2] + parts[3],  # a chunk dropped
        head + b"".join(parts[:3]),  # the final chunk dropped: cut at a chunk boundary
        blob[:-5],  # cut inside the final chunk
        blob + parts[3],  # a chunk appended after the final one
    ):
        refusals(altered, key)


def test_a_chunk_cannot_move_to_another_file_or_open_under_another_key():
    key = new_data_key()
    blob = sealed(b"weights", key, b"artifact:model.onnx")
    with pytest.raises(IntegrityError):
        open_sealed(blob, key, b"artifact:tokenizer.json")
    with pytest.raises(IntegrityError):
        open_sealed(blob, new_data_key(), b"artifact:model.onnx")


def keys_dir(tmp_path: Path, *ids: str) -> Path:
    directory = tmp_path / "keys"
    for kek_id in ids:
        create_kek(directory, kek_id)
    return directory


def test_a_kek_file_is_32_random_bytes_or_their_base64_and_is_never_overwritten(tmp_path):
    directory = keys_dir(tmp_path, "a")
    assert (directory / "a").stat().st_mode & 0o777 == 0o600 and len((directory / "a").read_bytes()) == 32
    assert not create_kek(directory, "a")
    (directory / "b64").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    (directory / "short").write_bytes(b"too short")
    keyring = Keyring(directory, "a")
    for kek_id in ("a", "b64"):
        header = keyring.wrap(kek_id, b"k" * 32)
        assert keyring.unwrap(header) == b"k" * 32
    with pytest.raises(KeyUnavailableError, match="holds 9 bytes; a KEK is 32 random bytes"):
        keyring.wrap("short", b"k" * 32)
    # Kubernetes mounts a Secret with its own '..data' entries beside the keys.
    (directory / "..data").mkdir()
    assert keyring.ids() == ["a", "b64", "short"]
    with pytest.raises(InvalidArgumentError, match="is not a KEK id"):
        check_kek_id("../etc/passwd")


def test_a_missing_or_wrong_kek_says_which_and_why(tmp_path):
    directory = keys_dir(tmp_path, "a", "b")
    keyring = Keyring(directory, "a")
    header = keyring.wrap("a", new_data_key())
    (directory / "a").unlink()
    with pytest.raises(KeyUnavailableError, match=r"KEK 'a', which is not in the keys directory .* \['b'\]"):
        keyring.unwrap(header)
    shutil.copy(directory / "b", directory / "a")  # another key under the same name
    with pytest.raises(KeyUnavailableError, match="does not open this data key: it is not the KEK"):
        keyring.unwrap(header)
    with pytest.raises(KeyUnavailableError, match="this process has no keys directory"):
        Keyring().unwrap(header)


def test_the_policy_prefers_a_tenants_own_kek_and_follows_rotation(tmp_path):
    directory = keys_dir(tmp_path, "shared-1", "shared-2", "tenant-acme", "tenant-acme-2")
    policy = KekPolicy(tmp_path / "store", Keyring(directory, "shared-1"))
    assert policy.for_owner("") == "shared-1"
    assert policy.for_owner("acme") == "tenant-acme"  # its own KEK, found by its name
    assert policy.for_owner("globex") == "shared-1"  # none of its own
    policy.record("shared-2")
    policy.record("tenant-acme-2", tenant="acme")
    assert (policy.for_owner(""), policy.for_owner("acme"), policy.for_owner("globex")) == (
        "shared-2", "tenant-acme-2", "shared-2")  # fmt: skip
    marker = (tmp_path / "store" / MARKER).read_text()
    assert marker == "active-kek shared-2\ntenant-kek tenant-acme-2 acme\n"
    with pytest.raises(ValueError):
        json.loads(marker)


RECORD = {
    "family": "dense",
    "framework": "onnx",
    "inputs": [{"name": "x", "dtype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "dtype": "FP32", "shape": [-1, 2]}],
    "metrics": {"accuracy": 0.5},
    "class_names": ["secret-class-a", "secret-class-b"],
}


def publish(store: ModelStore, name: str = "m", owner: str = "", content: bytes = b"weights " * 1000):
    return store.publish({**RECORD, "name": name, "owner": owner}, {"model.onnx": content, "vocab.json": b'{"a": 1}'})


def test_a_sealed_version_reads_back_as_published_and_nothing_stored_is_plain(tmp_path):
    store = ModelStore(tmp_path / "models", Keyring(keys_dir(tmp_path, "k1"), "k1"))
    manifest = publish(store)
    assert manifest.sealed and manifest.kek_id == "k1" and manifest.encryption["cipher"] == "AES-256-GCM"
    reread = store.manifest("m", 1)
    assert reread.class_names == RECORD["class_names"] and reread.kek_id == "k1"
    artifacts = store.artifacts(reread).check_all()
    assert artifacts.read("model.onnx") == b"weights " * 1000 and artifacts.read("vocab.json") == b'{"a": 1}'
    for path in (tmp_path / "models").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"weights" not in content and b"secret-class" not in content and b"accuracy" not in content
            if path.name not in (INDEX, ".index.lock"):
                assert content.startswith((SEALED_MAGIC, ENVELOPE_MAGIC)), path
    # The manifest's header names the KEK and holds the wrapped key; the index names only the family.
    header, _ = split_envelope((store.version_dir("m", 1) / MANIFEST).read_bytes())
    assert header.kek_id == "k1" and len(header.wrapped_key) == 40
    assert (tmp_path / "models" / "m" / INDEX).read_text().splitlines()[0] == "family dense"


def test_the_sha256_of_a_sealed_artifact_is_checked_over_the_ciphertext_before_it_is_decrypted(tmp_path):
    store = ModelStore(tmp_path / "models", Keyring(keys_dir(tmp_path, "k1"), "k1"))
    manifest = publish(store)
    path = store.version_dir("m", 1) / "model.onnx"
    tampered = bytearray(path.read_bytes())
    tampered[STREAM_HEAD + 40] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(IntegrityError, match="model.onnx has sha256 .* refusing to load it"):
        store.artifacts(store.manifest("m", 1)).check_all()
    assert manifest.files["model.onnx"] != manifest.files["vocab.json"]


def test_a_missing_or_wrong_kek_leaves_a_version_described_but_unreadable(tmp_path):
    directory = keys_dir(tmp_path, "k1", "other")
    store = ModelStore(tmp_path / "models", Keyring(directory, "k1"))
    publish(store, owner="acme")
    os.replace(directory / "other", directory / "k1")  # the wrong key under the right name
    stub = ModelStore(tmp_path / "models", Keyring(directory, "k1")).manifest("m", 1)
    assert (stub.family, stub.owner, stub.promotable, stub.files) == ("dense", "acme", False, {})
    assert "does not open this data key" in stub.unreadable
    with pytest.raises(KeyUnavailableError, match="m v1: the KEK 'k1' .* does not open this data key"):
        store.artifacts(stub).check_all()
    (directory / "k1").unlink()
    stub = ModelStore(tmp_path / "models", Keyring(directory, "k1")).manifest("m", 1)
    assert "which is not in the keys directory" in stub.unreadable


def test_another_tenants_kek_does_not_open_a_tenants_private_version(tmp_path):
    directory = keys_dir(tmp_path, "shared", "tenant-acme", "tenant-globex")
    store = ModelStore(tmp_path / "models", Keyring(directory, "shared"))
    assert publish(store, "acme-model", owner="acme").kek_id == "tenant-acme"
    assert publish(store, "globex-model", owner="globex").kek_id == "tenant-globex"
    assert publish(store, "public-model").kek_id == "shared"
    # globex holds only its own key (and the shared one): acme's version stays closed to it.
    globex_only = tmp_path / "globex-keys"
    globex_only.mkdir()
    shutil.copy(directory / "tenant-globex", globex_only / "tenant-globex")
    shutil.copy(directory / "tenant-globex", globex_only / "tenant-acme")  # even under acme's name
    view = ModelStore(tmp_path / "models", Keyring(globex_only))
    assert view.manifest("globex-model", 1).unreadable == ""
    assert "does not open this data key" in view.manifest("acme-model", 1).unreadable
    assert "not in the keys directory" in view.manifest("public-model", 1).unreadable


def test_rotation_rewraps_headers_only_and_the_old_kek_can_then_be_deleted(tmp_path):
    directory = keys_dir(tmp_path, "k1", "k2", "tenant-acme")
    store = ModelStore(tmp_path / "models", Keyring(directory, "k1"))
    publish(store, "a")
    publish(store, "a", content=b"second")
    publish(store, "b", owner="acme")
    before = {p: p.read_bytes() for p in (tmp_path / "models").rglob("*") if p.is_file()}
    report = store.rewrap("k2")
    assert (report.rewrapped, report.unchanged, report.plain, report.errors) == (2, 1, 0, [])  # acme keeps its own
    after = {p: p.read_bytes() for p in (tmp_path / "models").rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(tmp_path / "models")) for p in before if before[p] != after[p])
    assert changed == ["a/1/manifest.json", "a/2/manifest.json"]  # artifacts and the index untouched
    assert store.rewrap("k2").rewrapped == 0  # idempotent
    assert publish(store, "a", content=b"third").kek_id == "k2"  # new versions follow the rotation
    (directory / "k1").unlink()
    fresh = ModelStore(tmp_path / "models", Keyring(directory, "k1"))  # the setting still names k1: the store wins
    for name in ("a", "b"):
        for version in fresh.versions(name):
            manifest = fresh.manifest(name, version)
            assert not manifest.unreadable and fresh.artifacts(manifest).check_all().read("vocab.json") == b'{"a": 1}'
    usage = fresh.key_usage()
    assert (usage.active_kek_id, dict(usage.by_kek), usage.plain) == ("k2", {"k2": 3, "tenant-acme": 1}, 0)


def test_rotating_one_tenant_moves_only_its_versions(tmp_path):
    directory = keys_dir(tmp_path, "k1", "tenant-acme", "tenant-acme-2")
    store = ModelStore(tmp_path / "models", Keyring(directory, "k1"))
    publish(store, "public")
    publish(store, "mine", owner="acme")
    report = store.rewrap("tenant-acme-2", tenant="acme")
    assert (report.rewrapped, report.unchanged) == (1, 0)
    assert store.manifest("mine", 1).kek_id == "tenant-acme-2" and store.manifest("public", 1).kek_id == "k1"
    assert publish(store, "mine", owner="acme").kek_id == "tenant-acme-2"


def test_rotation_needs_encryption_and_the_new_kek(tmp_path):
    with pytest.raises(FailedPreconditionError, match="not encrypted"):
        ModelStore(tmp_path / "plain").rewrap("k2")
    store = ModelStore(tmp_path / "models", Keyring(keys_dir(tmp_path, "k1"), "k1"))
    with pytest.raises(KeyUnavailableError, match=r"KEK 'k2' is not in the keys directory .* \['k1'\]"):
        store.rewrap("k2")


def test_a_plain_store_keeps_working_beside_sealed_versions_and_the_log_says_so(tmp_path, caplog):
    plain = ModelStore(tmp_path / "models")
    publish(plain)
    sealed_store = ModelStore(tmp_path / "models", Keyring(keys_dir(tmp_path, "k1"), "k1"))
    publish(sealed_store)
    with caplog.at_level(logging.WARNING, logger="shared.model_store"):
        old, new = sealed_store.manifest("m", 1), sealed_store.manifest("m", 2)
        sealed_store.manifest("m", 1)
    assert not old.sealed and new.sealed
    assert sealed_store.artifacts(old).check_all().read("model.onnx") == b"weights " * 1000
    notes = [r.message for r in caplog.records if "stored unencrypted" in r.message]
    assert notes == ["m v1 is stored unencrypted (written before encryption was on); reading it as it is"]
    report = sealed_store.rewrap("k1")
    assert (report.plain, report.unchanged) == (1, 1)
    # Copied into an encrypted store, a plain version is sealed.
    copy = ModelStore(tmp_path / "copy", Keyring(tmp_path / "keys", "k1"))
    assert copy.copy_version(plain, "m", 1).sealed


def upload(store: DatasetStore, data: bytes, tenant: str = "", fmt: str = "csv", pieces: int = 7) -> dict:
    writer = store.writer(1 << 30)
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        writer.write(data[start : start + step])
    return writer.commit("set", "dense", fmt, tenant)


CSV = b"name,email,f1,label\n" + b"".join(
    b"Ann %d,ann%d@example.com,%d.5,%d\n" % (i, i, i, i % 2) for i in range(60_000)
)


def test_an_upload_is_sealed_as_it_streams_and_the_trainer_reads_it_back(tmp_path):
    store = DatasetStore(tmp_path / "datasets", Keyring(keys_dir(tmp_path, "k1", "tenant-acme"), "k1"))
    assert len(CSV) > 2 * CHUNK_BYTES
    meta = upload(store, CSV, tenant="acme")
    assert meta["columns"] == ["name", "email", "f1", "label"]
    directory = tmp_path / "datasets" / meta["dataset_id"]
    for path in directory.iterdir():
        content = path.read_bytes()
        assert b"example.com" not in content and b"label" not in content
        with pytest.raises(ValueError):
            json.loads(content)
    assert split_envelope((directory / "meta.json").read_bytes())[0].kek_id == "tenant-acme"
    assert store.read(meta["dataset_id"], 1 << 30) == (meta, CSV)
    assert store.check(meta["dataset_id"], "acme") == meta
    store.describe(meta["dataset_id"], {"task": "classification"})
    assert store.meta(meta["dataset_id"], "acme")["task"] == "classification"
    assert [m["dataset_id"] for m in store.list("acme")] == [meta["dataset_id"]] and store.list("") == []


def test_a_flipped_byte_in_a_sealed_data_set_is_refused(tmp_path):
    store = DatasetStore(tmp_path / "datasets", Keyring(keys_dir(tmp_path, "k1"), "k1"))
    meta = upload(store, CSV)
    path = store.data_path(meta)
    tampered = bytearray(path.read_bytes())
    tampered[len(tampered) // 2] ^= 0x80
    path.write_bytes(bytes(tampered))
    with pytest.raises(IntegrityError, match=f"dataset {meta['dataset_id']}: data: chunk 1 does not authenticate"):
        store.read(meta["dataset_id"], 1 << 30)


def test_data_set_rotation_rewraps_meta_headers_and_survives_the_old_kek(tmp_path):
    directory = keys_dir(tmp_path, "k1", "k2")
    store = DatasetStore(tmp_path / "datasets", Keyring(directory, "k1"))
    first, second = upload(store, CSV[:5000]), upload(store, CSV[:7000], tenant="acme")
    data_before = store.data_path(first).read_bytes()
    report = store.rewrap("k2")
    assert (report.rewrapped, report.unchanged, report.errors) == (2, 0, [])
    assert store.data_path(first).read_bytes() == data_before
    (directory / "k1").unlink()
    fresh = DatasetStore(tmp_path / "datasets", Keyring(directory, "k1"))
    assert fresh.read(first["dataset_id"], 1 << 30)[1] == CSV[:5000]
    assert fresh.read(second["dataset_id"], 1 << 30)[1] == CSV[:7000]
    assert upload(fresh, CSV[:100]) and dict(fresh.key_usage().by_kek) == {"k2": 3}


def test_a_sealed_checkpoint_holds_no_plain_weights_and_loads_back(tmp_path):
    from shared.training_worker import JobContext

    store = ModelStore(tmp_path / "models", Keyring(keys_dir(tmp_path, "k1"), "k1"))
    context = JobContext.__new__(JobContext)  # only what checkpoints use
    context.job_id, context.spec, context.store, context.checkpoint_dir = "job-1", {}, store, tmp_path / "checkpoints"
    weights = torch.full((64,), 1234.5)
    context.save_checkpoint({"model": {"w": weights}, "epoch": 3})
    raw = context.checkpoint_path.read_bytes()
    assert is_envelope(raw) and struct.pack("<f", 1234.5) * 4 not in raw and b"PK" not in raw[:4]
    state = context.load_checkpoint()
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], weights)
    (tmp_path / "keys" / "k1").unlink()
    assert context.load_checkpoint() is None  # its KEK gone: the job starts over, and says why


def test_quantizing_in_memory_gives_what_quantize_dynamic_writes(model_store):
    manifest = model_store.manifest("digits-mlp", model_store.default_version("digits-mlp"))
    fp32 = model_store.artifacts(manifest).read(manifest.config["onnx_file"])
    with tempfile.TemporaryDirectory() as tmp:  # the reference only: public test weights
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        source.write_bytes(fp32)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        assert quantize_dynamic_bytes(fp32) == target.read_bytes()


def test_dropped_and_masked_columns_are_never_parsed():
    data = b"id,comment,f1,f2,label\n" + b"u-1,loved it,1.0,2.0,1\nu-2,\"hated, it\",3.0,4.0,0\n" * 3
    with pytest.raises(InvalidArgumentError, match="'u-1' is not a number"):
        parse_csv(data)
    parsed = parse_csv(data, ColumnFilter(drop=("comment",), mask=("id",)))
    assert parsed.x.tolist() == [[0.0, 1.0, 2.0], [0.0, 3.0, 4.0]] * 3
    assert parsed.masked_features == [0] and parsed.y.tolist() == [1, 0] * 3
    with pytest.raises(InvalidArgumentError, match=r"drop_columns: \['nope'\] are not columns of the data set"):
        parse_csv(data, ColumnFilter(drop=("nope",)))
    with pytest.raises(InvalidArgumentError, match="mask_columns: 'label' is the label or target column"):
        parse_csv(data, ColumnFilter(mask=("label",)))
    with pytest.raises(InvalidArgumentError, match="apply to CSV data sets; this one is npz"):
        parse("npz", b"PK", ColumnFilter(drop=("id",)))


def test_a_masked_column_is_ignored_by_the_trained_network():
    spec = {"architecture": "mlp", "hidden_sizes": [8]}
    net = build_network(spec, [3], 2, np.zeros(3), np.ones(3), masked=[0]).eval()
    rows = torch.tensor([[0.0, 1.0, 2.0], [1e6, 1.0, 2.0], [-42.0, 1.0, 2.0]])
    with torch.no_grad():
        out = net(rows)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
