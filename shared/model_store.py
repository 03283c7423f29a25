"""The model store on disk: `<root>/<model>/<version>/` with a manifest per version.

A version directory is immutable once published: it is written under a temporary name and
renamed into place, so readers never see half a version. The default version is the latest
one unless `<root>/<model>/DEFAULT` pins another.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.errors import IntegrityError, InvalidArgumentError, NotFoundError

MANIFEST = "manifest.json"
DEFAULT_PIN = "DEFAULT"


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def model_names(self, family: str | None = None) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            versions = self.versions(entry.name)
            if versions and (family is None or self.manifest(entry.name, versions[-1]).family == family):
                names.append(entry.name)
        return names

    def versions(self, name: str) -> list[int]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(
            int(entry.name) for entry in model_dir.iterdir() if entry.name.isdigit() and (entry / MANIFEST).is_file()
        )

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
        pin = self.root / name / DEFAULT_PIN
        try:
            return int(pin.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def unpin_default(self, name: str) -> None:
        (self.root / name / DEFAULT_PIN).unlink(missing_ok=True)

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def manifest(self, name: str, version: int) -> Manifest:
        path = self.version_dir(name, version) / MANIFEST
        if not path.is_file():
            raise NotFoundError(f"model {name!r} has no version {version}")
        return Manifest.model_validate_json(path.read_text())

    def verify(self, manifest: Manifest) -> Path:
        """Checks every file's sha256 against the manifest; returns the version directory."""
        directory = self.version_dir(manifest.name, manifest.version)
        for file_name, expected in manifest.files.items():
            path = directory / file_name
            if not path.is_file():
                raise IntegrityError(f"{manifest.name} v{manifest.version}: {file_name} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise IntegrityError(
                    f"{manifest.name} v{manifest.version}: {file_name} has sha256 {actual[:12]}…, "
                    f"the manifest records {expected[:12]}…; refusing to load it"
                )
        return directory

    def pin_default(self, name: str, version: int) -> None:
        if version not in self.versions(name):
            raise NotFoundError(f"model {name!r} has no version {version}")
        _write_atomically(self.root / name / DEFAULT_PIN, f"{version}\n")

    def publish(self, manifest: dict[str, Any], artifacts: dict[str, Path]) -> Manifest:
        """Writes a new version from artifact files; the version number is the next free one.

        `manifest` holds every Manifest field except name-derived ones filled here:
        version, files, created_at.
        """
        name = manifest["name"]
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgumentError(f"model name {name!r} is not a valid directory name")
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        staging.chmod(0o755)  # mkdtemp makes it private; other processes serve from it
        try:
            files, size = {}, 0
            for file_name, source in artifacts.items():
                shutil.copyfile(source, staging / file_name)
                files[file_name] = sha256_file(staging / file_name)
                size += (staging / file_name).stat().st_size
            while True:
                version = (self.versions(name) or [0])[-1] + 1
                record = Manifest(
                    **{
                        **manifest,
                        "version": version,
                        "files": files,
                        "size_bytes": size,
                        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                )
                (staging / MANIFEST).write_text(record.model_dump_json(indent=2))
                try:
                    # rename() fails if another writer took this number first; then try the next.
                    os.rename(staging, self.version_dir(name, version))
                    return record
                except OSError:
                    if not self.version_dir(name, version).exists():
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
