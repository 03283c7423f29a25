"""The model store on disk: `<root>/<model>/<version>/` with a manifest per version.

A version directory is immutable once published: it is written under a temporary name and
renamed into place, so readers never see half a version. The default version is the latest
one unless `<root>/<model>/DEFAULT` pins another.

`<root>/<model>/INDEX.json` lists the model's versions, each with the sha256 of its manifest:
a version exists once it is in the index, and a manifest that no longer matches its recorded
hash is refused, as an artifact that no longer matches the manifest is. Model names are checked
before they touch a path.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.errors import IntegrityError, InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_PIN = "DEFAULT"
INDEX = "INDEX.json"
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


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
        return data


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
    framework: Literal["onnx", "torch"]
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
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / check_model_name(name)

    def model_names(self, family: str | None = None) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or not MODEL_NAME.match(entry.name):
                continue
            versions = self.versions(entry.name)
            if versions and (family is None or self.manifest(entry.name, versions[-1]).family == family):
                names.append(entry.name)
        return names

    def versions(self, name: str) -> list[int]:
        """The model's published versions: those its index lists."""
        return sorted(int(v) for v in self._index(name))

    def _index(self, name: str) -> dict[str, str]:
        """Version -> sha256 of its manifest."""
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            return {}
        if (model_dir / INDEX).exists():
            return self._read_index(name)
        with self._index_lock(name):
            return self._read_index(name) if (model_dir / INDEX).exists() else self._adopt(name)

    def _read_index(self, name: str) -> dict[str, str]:
        try:
            return json.loads((self.model_dir(name) / INDEX).read_text())["versions"]
        except (ValueError, KeyError, OSError) as exc:
            raise IntegrityError(f"model {name!r}: its version index is unreadable ({exc})") from None

    def _adopt(self, name: str) -> dict[str, str]:
        """Indexes a model written before the index existed, trusting its manifests as they are
        now (and saying so). Called with the index lock held."""
        model_dir = self.model_dir(name)
        found = {
            entry.name: sha256_file(entry / MANIFEST)
            for entry in model_dir.iterdir()
            if _is_number(entry.name) and (entry / MANIFEST).is_file()
        }
        if found:
            log.warning("model %s had no version index; indexed versions %s as they are", name, sorted(found))
            _write_atomically(model_dir / INDEX, json.dumps({"versions": found}, indent=2, sort_keys=True))
        return found

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
            return int(pin.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def unpin_default(self, name: str) -> None:
        (self.model_dir(name) / DEFAULT_PIN).unlink(missing_ok=True)

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(int(version))

    def manifest(self, name: str, version: int) -> Manifest:
        """The version's manifest, refused unless it matches the hash the index recorded for it."""
        recorded = self._index(name).get(str(int(version)))
        path = self.version_dir(name, version) / MANIFEST
        if recorded is None or not path.is_file():
            raise NotFoundError(f"model {name!r} has no version {version}")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != recorded:
            raise IntegrityError(
                f"{name} v{version}: {MANIFEST} does not match the sha256 the store's index recorded; refusing it"
            )
        return Manifest.model_validate_json(raw)

    def artifacts(self, manifest: Manifest) -> Artifacts:
        """The version's files, for a loader: each read whole and checked as it is read."""
        return Artifacts(manifest, self.version_dir(manifest.name, manifest.version))

    def verify(self, manifest: Manifest) -> Path:
        """Checks every file's sha256 against the manifest; returns the version directory."""
        artifacts = self.artifacts(manifest)
        for file_name in manifest.files:
            artifacts.read(file_name)
        return artifacts.directory

    def pin_default(self, name: str, version: int) -> None:
        if version not in self.versions(name):
            raise NotFoundError(f"model {name!r} has no version {version}")
        _write_atomically(self.model_dir(name) / DEFAULT_PIN, f"{version}\n")

    def publish(self, manifest: dict[str, Any], artifacts: dict[str, Path]) -> Manifest:
        """Writes a new version from artifact files; the version number is the next free one.

        `manifest` holds every Manifest field except name-derived ones filled here:
        version, files, created_at.
        """
        name = check_model_name(manifest["name"], "output_model")
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        staging.chmod(0o755)  # mkdtemp makes it private; other processes serve from it
        try:
            files, size = {}, 0
            for file_name, source in artifacts.items():
                shutil.copyfile(source, staging / file_name)
                files[file_name] = sha256_file(staging / file_name)
                size += (staging / file_name).stat().st_size
            # One publisher at a time per model: the number, the rename and the index move together.
            with self._index_lock(name):
                index = self._read_index(name) if (model_dir / INDEX).exists() else self._adopt(name)
                numbers = [int(v) for v in index] + [int(e.name) for e in model_dir.iterdir() if _is_number(e.name)]
                version = max(numbers, default=0) + 1
                record = Manifest(
                    **{
                        **manifest,
                        "version": version,
                        "files": files,
                        "size_bytes": size,
                        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                )
                raw = record.model_dump_json(indent=2).encode()
                (staging / MANIFEST).write_bytes(raw)
                os.rename(staging, self.version_dir(name, version))
                index[str(version)] = hashlib.sha256(raw).hexdigest()
                _write_atomically(model_dir / INDEX, json.dumps({"versions": index}, indent=2, sort_keys=True))
                return record
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
