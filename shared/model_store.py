"""The model store on disk: `<root>/<model>/<version>/` with a manifest per version.

A version directory is immutable once published: it is written under a temporary name and
renamed into place, so readers never see half a version. The default version is the latest
one unless `<root>/<model>/DEFAULT` pins another.

`<root>/<model>/INDEX` lists the model's versions, each with the sha256 of its manifest (plain
text: the model's family and owner, then "<version> <sha256>" lines): a version exists once it
is in the index, and a manifest that no longer matches its recorded hash is refused, as an
artifact that no longer matches the manifest is. Model names are checked before they touch a path.

With a keyring (a KEK configured), every version is sealed (`shared.envelope`): its artifacts
under a fresh data key, its manifest as an envelope whose header names the KEK and holds the
wrapped data key. Every sha256 is over what is stored (the ciphertext), and is checked before
anything is decrypted; the index's hash of a sealed manifest covers its sealed body, which
rotation (`rewrap`, a new header renamed into place) never changes. Versions written in plain
(before encryption was on) are still read, and the log says so once per version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field, PrivateAttr

from shared.envelope import (
    SealedWriter,
    is_envelope,
    new_data_key,
    nonce_layout,
    open_sealed,
    split_envelope,
    whole_file_chunk,
)
from shared.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError, NotFoundError
from shared.keyring import KekPolicy, Keyring, KeyUnavailableError, KeyUsage, RewrapReport

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_PIN = "DEFAULT"
CANARY = "CANARY"
SHADOW = "SHADOW"
INDEX = "INDEX"
LEGACY_INDEX = "INDEX.json"  # written before INDEX; read, and replaced at the model's next publish
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MANIFEST_CONTEXT = b"manifest"
COPY_BLOCK = 1 << 20


def artifact_context(file_name: str) -> bytes:
    """What an artifact's chunks are bound to, besides the version's own data key: its file name."""
    return b"artifact:" + file_name.encode()


class Artifacts:
    """One version's files, each read whole into memory and checked against its sha256 in the same
    read: loaders build models from these bytes, never from paths, so what is checked is exactly
    what is loaded, and no file the manifest does not list is ever opened."""

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        self.manifest = manifest
        self.directory = Path(directory)
        self._read: dict[str, bytes] = {}

    def check_all(self) -> Artifacts:
        """Reads and checks every file now (and keeps them for the loader): a version with any
        tampered file fails whole, even if its loader would not read that file."""
        if self.manifest.unreadable:
            raise KeyUnavailableError(f"{self.manifest.name} v{self.manifest.version}: {self.manifest.unreadable}")
        for file_name in self.manifest.files:
            self._read[file_name] = self.read(file_name)
        return self

    def read(self, file_name: str) -> bytes:
        if file_name in self._read:
            return self._read.pop(file_name)  # handed over once: the loader keeps what it needs
        path = self.manifest.artifact(self.directory, file_name)
        label = f"{self.manifest.name} v{self.manifest.version}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{label}: {file_name} is missing") from None
        actual, expected = hashlib.sha256(data).hexdigest(), self.manifest.files[file_name]
        if actual != expected:
            raise IntegrityError(
                f"{label}: {file_name} has sha256 {actual[:12]}…, the manifest records {expected[:12]}…; "
                "refusing to load it"
            )
        if not self.manifest.sealed:
            return data
        # Checked over the ciphertext above; GCM's tags cover the plaintext. Decrypted in memory only.
        return open_sealed(data, self.manifest.data_key(), artifact_context(file_name), f"{label}: {file_name}")


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def check_model_name(name: str, field: str = "model_name") -> str:
    """A model name that is safe as one directory name: 1-63 of a-z, 0-9, '.', '_', '-'."""
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        shown = name if len(name) <= 80 else name[:80] + "…"
        raise InvalidArgumentError(
            f"{field}: {shown!r} is not a model name; expected 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class TensorSignature(BaseModel):
    name: str
    dtype: str  # "FP32", "INT64", ...; "STRING" for text inputs
    shape: list[int]  # -1 marks a dynamic dimension


class Manifest(BaseModel):
    """Everything needed to load, check and describe one model version."""

    name: str
    version: int
    family: Literal["dense", "gnn", "nlp"]
    # "numpy": a stored graph (services/gnn/graph_store.py), arrays memory-mapped by numpy.
    # "": a version whose sealed manifest this process cannot open.
    framework: Literal["onnx", "torch", "numpy", ""]
    files: dict[str, str] = Field(description="sha256 of every artifact file, by file name")
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    metrics: dict[str, float] = Field(default_factory=dict, description="on held-out data")
    class_names: list[str] = Field(default_factory=list)
    created_at: str = ""
    source: str = ""
    description: str = ""
    size_bytes: int = Field(0, description="total size of the artifact files")
    owner: str = Field("", description="the tenant a private version belongs to; empty: public")
    promotable: bool = Field(
        True, description="false when a training job's gate rejected it: never the default unless pinned"
    )
    # Architecture and pre-processing the loader needs, e.g. layer sizes or tokenizer limits.
    config: dict[str, Any] = Field(default_factory=dict)
    encryption: dict[str, Any] = Field(
        default_factory=dict,
        description="how the files are sealed (cipher, chunk size, nonce layout; the KEK id and the wrapped "
        "data key are in the manifest's envelope header); empty: stored in plain",
    )
    _data_key: bytes | None = PrivateAttr(None)
    _kek_id: str = PrivateAttr("")
    _unreadable: str = PrivateAttr("")

    @property
    def sealed(self) -> bool:
        return bool(self.encryption)

    @property
    def kek_id(self) -> str:
        """The KEK that wraps this version's data key ("" for a plain version)."""
        return self._kek_id

    @property
    def unreadable(self) -> str:
        """Why this version's sealed manifest could not be opened here (its KEK missing or wrong); "" when it was."""
        return self._unreadable

    def data_key(self) -> bytes:
        if self._data_key is None:
            raise KeyUnavailableError(f"{self.name} v{self.version}: its data key is not open in this process")
        return self._data_key

    def artifact(self, directory: Path, file_name: str) -> Path:
        """One of this version's files. Loaders open nothing else: a file the manifest does not
        list (and so whose sha256 nobody checked) is refused."""
        if file_name not in self.files or Path(file_name).name != file_name:
            raise IntegrityError(
                f"{self.name} v{self.version}: {file_name!r} is not one of the version's files {sorted(self.files)}"
            )
        return Path(directory) / file_name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(raw: bytes) -> str:
    """The sha256 the index records for a stored manifest: of a sealed one's body, which rotation keeps."""
    return hashlib.sha256(split_envelope(raw, MANIFEST)[1] if is_envelope(raw) else raw).hexdigest()


@dataclass
class ModelIndex:
    """What `<model>/INDEX` holds: the model's family and owner (nothing secret), and each version's
    manifest hash."""

    family: str = ""
    owner: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def encode(self) -> str:
        if "\n" in self.owner:
            raise InvalidArgumentError("owner: a tenant name may not hold a line break")
        lines = [f"family {self.family}"] if self.family else []
        lines += [f"owner {self.owner}"] if self.owner else []
        lines += [f"{version} {digest}" for version, digest in sorted(self.versions.items(), key=lambda v: int(v[0]))]
        return "\n".join(lines) + "\n"

    @classmethod
    def decode(cls, text: str) -> ModelIndex:
        index = cls()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "family":
                index.family = value
            elif key == "owner":
                index.owner = value
            elif _is_number(key) and len(value) == 64:
                index.versions[key] = value
            elif line.strip():
                raise ValueError(f"unexpected line {line[:80]!r}")
        return index


class _HashingSink:
    """A file that hashes what is written to it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.out.write(data)


def _store_artifact(source: Path | bytes, destination: Path, data_key: bytes | None, context: bytes) -> tuple[str, int]:
    """Writes one artifact (sealed under the data key, when there is one, as one chunk so that a load decrypts
    it in one call) from bytes or a file, a block at a time; returns (sha256 of what was stored, plaintext size)."""
    with destination.open("wb") as out:
        sink = _HashingSink(out)
        if data_key is None:
            writer = sink
        else:
            size = len(source) if isinstance(source, bytes | bytearray | memoryview) else Path(source).stat().st_size
            writer = SealedWriter(sink, data_key, context, whole_file_chunk(size))  # type: ignore[arg-type]
        if isinstance(source, bytes | bytearray | memoryview):
            writer.write(source)
            size = len(source)
        else:
            size = 0
            with Path(source).open("rb") as handle:
                for block in iter(lambda: handle.read(COPY_BLOCK), b""):
                    writer.write(block)
                    size += len(block)
        if isinstance(writer, SealedWriter):
            writer.close()
    return sink.digest.hexdigest(), size


class ModelStore:
    def __init__(self, root: Path | str, keyring: Keyring | None = None) -> None:
        self.root = Path(root)
        self.keyring = keyring or Keyring()
        self.policy = KekPolicy(self.root, self.keyring)
        self._plain_noted: set[tuple[str, int]] = set()

    @property
    def encrypted(self) -> bool:
        """Whether new versions are sealed."""
        return self.keyring.enabled

    def model_dir(self, name: str) -> Path:
        return self.root / check_model_name(name)

    def _model_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [e.name for e in sorted(self.root.iterdir()) if e.is_dir() and MODEL_NAME.match(e.name)]

    def model_names(self, family: str | None = None) -> list[str]:
        names = []
        for name in self._model_dirs():
            index = self._index(name)
            if index.versions and (family is None or self._family(name, index) == family):
                names.append(name)
        return names

    def family(self, name: str) -> str:
        """The model's family, from its index (no manifest needs opening); "" for a model the store lacks."""
        index = self._index(name)
        return self._family(name, index) if index.versions else ""

    def _family(self, name: str, index: ModelIndex) -> str:
        if index.family:
            return index.family
        return self.manifest(name, max(int(v) for v in index.versions)).family  # a legacy index names none

    def versions(self, name: str) -> list[int]:
        """The model's published versions: those its index lists."""
        return sorted(int(v) for v in self._index(name).versions)

    def _index(self, name: str) -> ModelIndex:
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            return ModelIndex()
        if (model_dir / INDEX).exists():
            return self._read_index(name)
        if (model_dir / LEGACY_INDEX).exists():
            with contextlib.suppress(FileNotFoundError):  # unless a publish converted it meanwhile
                return self._read_legacy_index(name)
            return self._read_index(name)
        with self._index_lock(name):
            return self._index_locked(name)

    def _index_locked(self, name: str) -> ModelIndex:
        """The index, read or made; called with the index lock held."""
        model_dir = self.model_dir(name)
        if (model_dir / INDEX).exists():
            return self._read_index(name)
        if (model_dir / LEGACY_INDEX).exists():
            return self._read_legacy_index(name)
        return self._adopt(name)

    def _read_index(self, name: str) -> ModelIndex:
        try:
            return ModelIndex.decode((self.model_dir(name) / INDEX).read_text())
        except (ValueError, OSError) as exc:
            raise IntegrityError(f"model {name!r}: its version index is unreadable ({exc})") from None

    def _read_legacy_index(self, name: str) -> ModelIndex:
        try:
            versions = json.loads((self.model_dir(name) / LEGACY_INDEX).read_text())["versions"]
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, OSError) as exc:
            raise IntegrityError(f"model {name!r}: its version index is unreadable ({exc})") from None
        return ModelIndex(versions=versions)

    def _write_index(self, name: str, index: ModelIndex) -> None:
        _write_atomically(self.model_dir(name) / INDEX, index.encode())
        (self.model_dir(name) / LEGACY_INDEX).unlink(missing_ok=True)

    def _adopt(self, name: str) -> ModelIndex:
        """Indexes a model written before the index existed, trusting its manifests as they are
        now (and saying so). Called with the index lock held."""
        model_dir = self.model_dir(name)
        found = {
            entry.name: manifest_digest((entry / MANIFEST).read_bytes())
            for entry in model_dir.iterdir()
            if _is_number(entry.name) and (entry / MANIFEST).is_file()
        }
        index = ModelIndex(versions=found)
        if found:
            log.warning("model %s had no version index; indexed versions %s as they are", name, sorted(found))
            latest = self.manifest(name, max(int(v) for v in found), index)
            index.family, index.owner = latest.family, latest.owner
            self._write_index(name, index)
        return index

    @contextlib.contextmanager
    def _index_lock(self, name: str):
        with (self.model_dir(name) / ".index.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def default_version(self, name: str) -> int:
        versions = self.versions(name)
        if not versions:
            raise NotFoundError(f"model {name!r} not found in the model store")
        pinned = self.pinned_version(name)
        if pinned in versions:
            return pinned
        promotable = [v for v in versions if self.manifest(name, v).promotable]
        if not promotable:
            raise NotFoundError(f"model {name!r} has no version that passed its gate; name a version")
        return promotable[-1]

    def pinned_version(self, name: str) -> int | None:
        pin = self.model_dir(name) / DEFAULT_PIN
        try:
            # "default-version 3"; a bare number in stores written before.
            return int(pin.read_text().strip().removeprefix("default-version").strip())
        except (FileNotFoundError, ValueError):
            return None

    def unpin_default(self, name: str) -> None:
        (self.model_dir(name) / DEFAULT_PIN).unlink(missing_ok=True)

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(int(version))

    def manifest(self, name: str, version: int, index: ModelIndex | None = None) -> Manifest:
        """The version's manifest, refused unless it matches the hash the index recorded for it.

        A sealed manifest whose KEK is missing here, or is not the KEK that wrapped its data key, is
        returned as far as the index describes it (name, version, family, owner), with `unreadable`
        saying why: loading it fails with that reason, and the other versions are not disturbed.
        """
        index = index or self._index(name)
        recorded = index.versions.get(str(int(version)))
        path = self.version_dir(name, version) / MANIFEST
        if recorded is None or not path.is_file():
            raise NotFoundError(f"model {name!r} has no version {version}")
        raw = path.read_bytes()
        label = f"{name} v{version}"
        if manifest_digest(raw) != recorded:
            raise IntegrityError(
                f"{label}: {MANIFEST} does not match the sha256 the store's index recorded; refusing it"
            )
        if not is_envelope(raw):
            if self.encrypted and (name, version) not in self._plain_noted:
                self._plain_noted.add((name, version))
                log.warning("%s is stored unencrypted (written before encryption was on); reading it as it is", label)
            return Manifest.model_validate_json(raw)
        try:
            plaintext, data_key, header = self.keyring.open(raw, MANIFEST_CONTEXT, f"{label}: {MANIFEST}")
        except KeyUnavailableError as exc:
            if not index.family:
                raise KeyUnavailableError(f"{label}: {exc.message}") from None
            stub = Manifest(name=name, version=int(version), family=index.family, framework="", files={}, inputs=[],
                            outputs=[], owner=index.owner, promotable=False)  # fmt: skip
            stub._unreadable = exc.message
            return stub
        manifest = Manifest.model_validate_json(plaintext)
        manifest._data_key, manifest._kek_id = data_key, header.kek_id
        return manifest

    def artifacts(self, manifest: Manifest) -> Artifacts:
        """The version's files, for a loader: each read whole and checked as it is read."""
        return Artifacts(manifest, self.version_dir(manifest.name, manifest.version))

    def verify(self, manifest: Manifest) -> Path:
        """Checks every file's sha256 against the manifest (and, sealed, that it decrypts); returns the
        version directory."""
        return self.artifacts(manifest).check_all().directory

    def pin_default(self, name: str, version: int) -> None:
        if version not in self.versions(name):
            raise NotFoundError(f"model {name!r} has no version {version}")
        _write_atomically(self.model_dir(name) / DEFAULT_PIN, f"default-version {version}\n")

    def canary(self, name: str) -> tuple[int, int] | None:
        """(candidate version, percent) of the model's canary, or None when it has none."""
        try:
            # "canary-version 3 percent 10"
            words = (self.model_dir(name) / CANARY).read_text().split()
            return int(words[1]), int(words[3])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def set_canary(self, name: str, version: int, percent: int) -> None:
        if version not in self.versions(name):
            raise NotFoundError(f"model {name!r} has no version {version}")
        _write_atomically(self.model_dir(name) / CANARY, f"canary-version {int(version)} percent {int(percent)}\n")

    def clear_canary(self, name: str) -> None:
        (self.model_dir(name) / CANARY).unlink(missing_ok=True)

    def shadow(self, name: str) -> tuple[int, int] | None:
        """(shadow version, percent) of the model's shadow, or None when it has none."""
        try:
            # "shadow-version 3 percent 100"
            words = (self.model_dir(name) / SHADOW).read_text().split()
            return int(words[1]), int(words[3])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def set_shadow(self, name: str, version: int, percent: int) -> None:
        if version not in self.versions(name):
            raise NotFoundError(f"model {name!r} has no version {version}")
        _write_atomically(self.model_dir(name) / SHADOW, f"shadow-version {int(version)} percent {int(percent)}\n")

    def clear_shadow(self, name: str) -> None:
        (self.model_dir(name) / SHADOW).unlink(missing_ok=True)

    def publish(
        self, manifest: dict[str, Any], artifacts: dict[str, Path | bytes], expected_latest: int | None = None
    ) -> Manifest:
        """Writes a new version from artifacts (bytes, or files); the version number is the next free one.

        With `expected_latest`, fails with FAILED_PRECONDITION unless that is still the latest
        version when the number is taken: a compare-and-swap for versions derived from the latest.

        `manifest` holds every Manifest field except name-derived ones filled here:
        version, files, created_at. With a keyring, every file is sealed under a new data key as it is
        written, and the manifest is an envelope whose header names the KEK that wraps it.
        """
        name = check_model_name(manifest["name"], "output_model")
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        staging.chmod(0o755)  # mkdtemp makes it private; other processes serve from it
        data_key = new_data_key() if self.encrypted else None
        try:
            files, size = {}, 0
            for file_name, source in artifacts.items():
                files[file_name], length = _store_artifact(
                    source, staging / file_name, data_key, artifact_context(file_name)
                )
                size += length
            # One publisher at a time per model: the number, the rename and the index move together, and
            # the KEK is chosen under the lock that rotation takes too, so no version escapes a rotation.
            with self._index_lock(name):
                index = self._index_locked(name)
                numbers = [int(v) for v in index.versions]
                numbers += [int(e.name) for e in model_dir.iterdir() if _is_number(e.name)]
                latest = max((int(v) for v in index.versions), default=0)
                if expected_latest is not None and latest != expected_latest:
                    raise FailedPreconditionError(
                        f"{name!r} is at v{latest} now, not v{expected_latest}: another writer got there first; retry"
                    )
                version = max(numbers, default=0) + 1
                record = Manifest(
                    **{
                        **manifest,
                        "version": version,
                        "files": files,
                        "size_bytes": size,
                        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                        "encryption": nonce_layout() if data_key is not None else {},
                    }
                )
                raw = record.model_dump_json(indent=2).encode()
                if data_key is not None:
                    kek_id = self.policy.for_owner(record.owner)
                    raw = self.keyring.seal(raw, kek_id, data_key, MANIFEST_CONTEXT)
                    record._data_key, record._kek_id = data_key, kek_id
                (staging / MANIFEST).write_bytes(raw)
                os.rename(staging, self.version_dir(name, version))
                index.versions[str(version)] = manifest_digest(raw)
                index.family, index.owner = record.family, record.owner
                self._write_index(name, index)
                return record
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete_version(self, name: str, version: int) -> None:
        """Removes a version: out of the index first (from then on it does not exist for any reader), then its
        directory. Never the latest version, so that its number is never given out again."""
        with self._index_lock(name):
            index = self._index_locked(name)
            if str(int(version)) not in index.versions:
                raise NotFoundError(f"model {name!r} has no version {version}")
            if int(version) == max(int(v) for v in index.versions):
                raise FailedPreconditionError(f"model {name!r}: v{version} is the latest version; it is kept")
            del index.versions[str(int(version))]
            self._write_index(name, index)
            doomed = Path(tempfile.mkdtemp(prefix=f".deleted-{int(version)}-", dir=self.model_dir(name)))
            os.rename(self.version_dir(name, version), doomed / "version")
        shutil.rmtree(doomed, ignore_errors=True)

    def copy_version(self, source: ModelStore, name: str, version: int) -> Manifest:
        """Publishes a version of another store here, decrypted in memory and sealed again under this store's
        keys (e.g. a plain store's versions into an encrypted one); it gets this store's next number."""
        manifest = source.manifest(name, version)
        artifacts = source.artifacts(manifest).check_all()
        record = manifest.model_dump(exclude={"version", "files", "size_bytes", "created_at", "encryption"})
        return self.publish(record, {file_name: artifacts.read(file_name) for file_name in manifest.files})

    # Keys

    def rewrap(self, kek_id: str, tenant: str | None = None, family: str | None = None) -> RewrapReport:
        """Rotation: from now on new data keys are wrapped by `kek_id` (the store's, or one tenant's), and
        every version's data key that should be is re-wrapped by it: a new manifest header, renamed into
        place, under the model's index lock. No artifact is re-encrypted; readers see either header, and
        both open the same data key. `family` limits it to one family's models (each service rotates its own)."""
        if not self.encrypted:
            raise FailedPreconditionError(
                "the model store is not encrypted here: set this process's KEYS_DIR and KEK_ID settings"
            )
        if not self.keyring.has(kek_id):
            raise KeyUnavailableError(
                f"KEK {kek_id!r} is not in the keys directory {self.keyring.keys_dir} "
                f"(it holds {self.keyring.ids() or 'no KEK'}): add it there (to the Secret) first"
            )
        self.policy.record(kek_id, tenant)
        report = RewrapReport()
        for name in self._model_dirs():
            try:
                self._rewrap_model(name, tenant, family, report)
            except (IntegrityError, OSError) as exc:
                report.errors.append(f"{name}: {exc}")
        return report

    def _rewrap_model(self, name: str, tenant: str | None, family: str | None, report: RewrapReport) -> None:
        with self._index_lock(name):
            index = self._index_locked(name)
            if not index.versions or (family and self._family(name, index) != family):
                return
            if tenant is not None and index.owner != tenant:
                return
            target = self.policy.for_owner(index.owner)
            for version in sorted(index.versions, key=int):
                path = self.version_dir(name, int(version)) / MANIFEST
                raw = path.read_bytes()
                if not is_envelope(raw):
                    report.plain += 1
                    continue
                try:
                    rewrapped = self.keyring.rewrap(raw, target, f"{name} v{version}: {MANIFEST}")
                except KeyUnavailableError as exc:
                    report.errors.append(f"{name} v{version}: {exc.message}")
                    continue
                if rewrapped is None:
                    report.unchanged += 1
                else:
                    _write_atomically(path, rewrapped)
                    report.rewrapped += 1

    def key_usage(self, family: str | None = None) -> KeyUsage:
        """How many versions' data keys each KEK wraps, and how many versions are plain; reads headers only."""
        usage = KeyUsage(self.policy.active(), self.policy.tenants(), Counter(), 0, [])
        for name in self._model_dirs():
            try:
                index = self._index(name)
                if not index.versions or (family and self._family(name, index) != family):
                    continue
                for version in index.versions:
                    with (self.version_dir(name, int(version)) / MANIFEST).open("rb") as handle:
                        head = handle.read(512)
                    if is_envelope(head):
                        usage.by_kek[split_envelope(head)[0].kek_id] += 1
                    else:
                        usage.plain += 1
            except (IntegrityError, OSError) as exc:
                usage.errors.append(f"{name}: {exc}")
        return usage


def _write_atomically(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        tmp.write_bytes(content)
    os.replace(tmp, path)
