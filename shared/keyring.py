"""Key-encryption keys (KEKs): where they come from, and which one wraps a new data key.

A KEK is a file of 32 random bytes (or their base64) in the keys directory, named by its id:
a local folder (`make run` makes `var/keys/local-1`), or a Kubernetes Secret mounted as a
directory, where every key of the Secret is a file. Files are read when a key is needed, never
cached, so a KEK added to the Secret is found without a restart and a KEK deleted is gone.

Which KEK wraps a new data key (`KekPolicy`), in one store:
1. the KEK the store's last rotation named for the owner's tenant, if any;
2. else the tenant's own KEK, `tenant-<tenant>`, when the keys directory has one, so one
   tenant's key never opens another's files;
3. else the store's active KEK: the one its last rotation named, else the `kek_id` setting.

The store keeps what rotation decided in a small plain file, `ACTIVE_KEK`, which holds ids only:

    active-kek local-2
    tenant-kek tenant-acme-2 acme
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import keywrap

from shared.envelope import DATA_KEY_BYTES, EnvelopeHeader, make_envelope, open_sealed, seal, split_envelope
from shared.errors import FailedPreconditionError, InvalidArgumentError

KEK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEK_BYTES = 32
LOCAL_KEK_ID = "local-1"
TENANT_PREFIX = "tenant-"
MARKER = "ACTIVE_KEK"


class KeyUnavailableError(FailedPreconditionError):
    """A KEK that is not in the keys directory, or that does not open the data key it is asked to."""


@dataclass
class RewrapReport:
    """What one rotation did in one store."""

    rewrapped: int = 0  # data keys re-wrapped by the new KEK
    unchanged: int = 0  # data keys already under the KEK they should be
    plain: int = 0  # versions or data sets stored unencrypted: nothing to re-wrap
    errors: list[str] = field(default_factory=list)


@dataclass
class KeyUsage:
    """Which KEKs one store's data keys are wrapped by."""

    active_kek_id: str
    tenant_kek_ids: dict[str, str]
    by_kek: Counter[str]
    plain: int
    errors: list[str]


def check_kek_id(kek_id: str, field: str = "kek_id") -> str:
    if not isinstance(kek_id, str) or not KEK_ID.match(kek_id):
        raise InvalidArgumentError(
            f"{field}: {kek_id[:80]!r} is not a KEK id; expected 1-128 letters, digits, '.', '_' or '-' "
            "(the name of a file in the keys directory, or of a key in its Secret)"
        )
    return kek_id


def tenant_kek_id(tenant: str) -> str | None:
    """The id of a tenant's own KEK by convention, when the tenant's name can be part of one."""
    candidate = f"{TENANT_PREFIX}{tenant}"
    return candidate if tenant and KEK_ID.match(candidate) else None


class Keyring:
    """The KEKs of one process: a keys directory, and the KEK that wraps new data keys by default."""

    def __init__(self, keys_dir: Path | str | None = None, kek_id: str = "") -> None:
        self.keys_dir = Path(keys_dir) if keys_dir else None
        self.kek_id = check_kek_id(kek_id) if kek_id else ""

    @classmethod
    def from_settings(cls, settings: Any) -> Keyring:
        return cls(settings.keys_dir, settings.kek_id)

    @property
    def enabled(self) -> bool:
        """Whether new files are sealed: a keys directory and a KEK are configured."""
        return self.keys_dir is not None and bool(self.kek_id)

    def describe(self) -> str:
        if not self.enabled:
            return "unencrypted (no keys_dir and kek_id are set)"
        return f"encrypted with AES-256-GCM, data keys wrapped by KEK {self.kek_id!r} from {self.keys_dir}"

    def ids(self) -> list[str]:
        """The KEK ids the keys directory holds (names only; Kubernetes' own '..data' entries are skipped)."""
        if self.keys_dir is None or not self.keys_dir.is_dir():
            return []
        return sorted(p.name for p in self.keys_dir.iterdir() if KEK_ID.match(p.name) and p.is_file())

    def has(self, kek_id: str) -> bool:
        return self.keys_dir is not None and bool(KEK_ID.match(kek_id)) and (self.keys_dir / kek_id).is_file()

    def _kek(self, kek_id: str) -> bytes:
        if self.keys_dir is None:
            raise KeyUnavailableError(
                f"sealed with KEK {kek_id!r}, and this process has no keys directory (set its KEYS_DIR setting)"
            )
        if not KEK_ID.match(kek_id):
            raise KeyUnavailableError(f"the KEK id {kek_id[:80]!r} is not a valid id")
        try:
            raw = (self.keys_dir / kek_id).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise KeyUnavailableError(
                f"sealed with KEK {kek_id!r}, which is not in the keys directory {self.keys_dir} "
                f"(it holds {self.ids() or 'no KEK'})"
            ) from None
        return _key_material(raw, kek_id)

    def wrap(self, kek_id: str, data_key: bytes) -> EnvelopeHeader:
        return EnvelopeHeader(kek_id, keywrap.aes_key_wrap(self._kek(kek_id), data_key))

    def unwrap(self, header: EnvelopeHeader) -> bytes:
        kek = self._kek(header.kek_id)
        try:
            data_key = keywrap.aes_key_unwrap(kek, header.wrapped_key)
        except (keywrap.InvalidUnwrap, ValueError):
            raise KeyUnavailableError(
                f"the KEK {header.kek_id!r} in {self.keys_dir} does not open this data key: it is not the KEK the "
                "key was wrapped with (a replaced key file, or another tenant's key)"
            ) from None
        if len(data_key) != DATA_KEY_BYTES:
            raise KeyUnavailableError(f"the data key wrapped by KEK {header.kek_id!r} is not an AES-256 key")
        return data_key

    def seal(self, plaintext: bytes, kek_id: str, data_key: bytes, context: bytes) -> bytes:
        """An envelope: the data key wrapped by `kek_id`, then `plaintext` sealed under the data key."""
        return make_envelope(self.wrap(kek_id, data_key), seal(plaintext, data_key, context))

    def open(self, blob: bytes, context: bytes, what: str) -> tuple[bytes, bytes, EnvelopeHeader]:
        """(plaintext, data key, header) of an envelope. KeyUnavailableError when its KEK is missing or
        wrong; IntegrityError when the sealed body does not authenticate."""
        header, body = split_envelope(blob, what)
        data_key = self.unwrap(header)
        return open_sealed(body, data_key, context, what), data_key, header

    def rewrap(self, blob: bytes, kek_id: str, what: str) -> bytes | None:
        """The envelope with its data key wrapped by `kek_id` instead, the sealed body unchanged; None
        when it is already."""
        header, body = split_envelope(blob, what)
        if header.kek_id == kek_id:
            return None
        return make_envelope(self.wrap(kek_id, self.unwrap(header)), body)


def _key_material(raw: bytes, kek_id: str) -> bytes:
    if len(raw) == KEK_BYTES:
        return raw
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != KEK_BYTES:
        raise KeyUnavailableError(
            f"the KEK file {kek_id!r} holds {len(raw)} bytes; a KEK is {KEK_BYTES} random bytes, or their base64"
        )
    return decoded


class KekPolicy:
    """Which KEK wraps a new data key in one store (see the module's docstring), and rotation's record of it."""

    def __init__(self, root: Path, keyring: Keyring) -> None:
        self.root = Path(root)
        self.keyring = keyring

    def _record(self) -> tuple[str, dict[str, str]]:
        try:
            lines = (self.root / MARKER).read_text().splitlines()
        except FileNotFoundError:
            return "", {}
        active, tenants = "", {}
        for line in lines:
            word, _, rest = line.partition(" ")
            if word == "active-kek":
                active = rest.strip()
            elif word == "tenant-kek":
                kek_id, _, tenant = rest.partition(" ")
                tenants[tenant] = kek_id
        return active, tenants

    def active(self) -> str:
        return self._record()[0] or self.keyring.kek_id

    def tenants(self) -> dict[str, str]:
        return self._record()[1]

    def for_owner(self, owner: str) -> str:
        """The KEK for a new data key of a file belonging to `owner` (a tenant, or "" for shared files)."""
        active, tenants = self._record()
        if owner in tenants:
            return tenants[owner]
        own = tenant_kek_id(owner)
        if own is not None and self.keyring.has(own):
            return own
        return active or self.keyring.kek_id

    def record(self, kek_id: str, tenant: str | None = None) -> None:
        """Names the KEK new data keys get from now on: the store's, or one tenant's."""
        if tenant is not None and ("\n" in tenant or not tenant):
            raise InvalidArgumentError("tenant: must be a non-empty name without line breaks")
        active, tenants = self._record()
        if tenant is None:
            active = kek_id
        else:
            tenants[tenant] = kek_id
        lines = [f"active-kek {active}"] if active else []
        lines += [f"tenant-kek {kek} {name}" for name, kek in sorted(tenants.items())]
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{MARKER}.{os.getpid()}.tmp"
        staging.write_text("\n".join(lines) + "\n")
        os.replace(staging, self.root / MARKER)


def create_kek(keys_dir: Path | str, kek_id: str = LOCAL_KEK_ID) -> bool:
    """Writes a new random KEK file (mode 0600, in a 0700 folder) unless one of that id exists; True if it did."""
    check_kek_id(kek_id)
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(keys_dir / kek_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(KEK_BYTES))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="Make a new KEK file: 32 random bytes, readable by its owner only.")
    parser.add_argument("kek_id", help="its id: the file's name, e.g. local-2 or tenant-acme")
    parser.add_argument("--keys-dir", type=Path, default=Path("var/keys"))
    args = parser.parse_args()
    if not create_kek(args.keys_dir, args.kek_id):
        raise SystemExit(f"{args.keys_dir / args.kek_id} exists already; a KEK is never overwritten")
    print(f"new KEK {args.kek_id!r} in {args.keys_dir}")


if __name__ == "__main__":
    main()
