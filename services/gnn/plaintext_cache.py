"""Decrypted stored-graph files in memory-only storage, shared by every process of one user on a machine.

A sealed graph is decrypted once per machine into a tmpfs directory (`maas-graphs-<uid>`, 0700, in /dev/shm
by default; in Kubernetes in an emptyDir with `medium: Memory` shared by a pod's containers and workers), named by the
sha256 of its sealed file, written 0600 and published by atomic rename. Every replica then maps that one
copy, so they share its pages as they share a plain store's page cache.

The trade-off: the plaintext sits in RAM (never on persistent disk: a directory that is not tmpfs or ramfs
is refused) where any process of the same user can read it, as it could read the keys that decrypt it.
Each mapping is still checked block by block against the version's (sealed) block list, so a copy altered
in place is refused, not served.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


DEFAULT_PARENT = Path("/dev/shm")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (its longest mount point in /proc/self/mounts); "" unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


class PlaintextCache:
    """One directory of decrypted graph files; `at()` refuses a directory it could leak from."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def at(cls, parent: Path | str | None) -> PlaintextCache | None:
        """The cache in `<parent>/maas-graphs-<uid>` (made 0700 if missing; the parent may be shared, as /dev/shm
        or an emptyDir is), or None, saying why in the log, when it is not memory-only or not this user's alone:
        sealed graphs are then decrypted into each process."""
        if parent is None or str(parent) == "":
            return None
        directory = Path(parent) / f"maas-graphs-{os.getuid()}"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(directory)
        except OSError as exc:
            log.warning("graph plaintext cache %s is unusable (%s); sealed graphs are decrypted per process",
                        directory, exc)  # fmt: skip
            return None
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            log.warning("graph plaintext cache %s is not a directory of this user's alone (mode 0700); sealed "
                        "graphs are decrypted per process", directory)  # fmt: skip
            return None
        kind = filesystem_type(directory)
        if kind not in MEMORY_FILESYSTEMS:
            log.warning("graph plaintext cache %s is on %s, not in memory (tmpfs); sealed graphs are decrypted "
                        "per process", directory, kind or "an unknown filesystem")  # fmt: skip
            return None
        return cls(directory)

    def path(self, name: str) -> Path:
        return self.directory / name

    def get_or_write(self, name: str, decrypt) -> Path:
        """The file `name`, written from `decrypt()` first unless some process did already; one process at a
        time decrypts, the others wait and map its copy."""
        path = self.path(name)
        if path.exists():
            return path
        with self._lock():
            if path.exists():
                return path
            data = decrypt()
            tmp = self.directory / f".{name}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.rename(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return path

    def remove(self, names: list[str]) -> None:
        """Drops copies (mappings that processes hold stay valid until they unmap them)."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.path(name).unlink()

    @contextlib.contextmanager
    def _lock(self):
        with (self.directory / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
