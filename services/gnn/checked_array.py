"""A `.npy` array mapped read-only, whose bytes are checked against per-block sha256s the first time a read
touches them.

Opening costs one block (the header's), whatever the array's size: a stored graph of any size opens in
constant time, and a query checks only the blocks its rows live in, once per process. A block that does
not match its hash is refused with an error naming the graph, the file and the block, before any of its
bytes reach an answer; the check repeats on every later read of that block, so it keeps being refused.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np

from shared.errors import IntegrityError

BLOCK_BYTES = 1 << 16  # 64 KiB: a query's first touch of a block costs ~30 us of sha256
DIGEST_BYTES = 32


def block_digests(data: bytes | memoryview, block_bytes: int = BLOCK_BYTES) -> bytes:
    """The sha256 of every block of `data`, concatenated (32 bytes each)."""
    view = memoryview(data)
    return b"".join(
        hashlib.sha256(view[start : start + block_bytes]).digest() for start in range(0, max(len(view), 1), block_bytes)
    )


def block_count(size: int, block_bytes: int = BLOCK_BYTES) -> int:
    return max(math.ceil(size / block_bytes), 1)


class CheckedArray:
    """Rows of a .npy file (a path to map, or bytes already in memory), checked block by block as they are read.

    `array[rows]` (an integer array or an int) checks the blocks those rows live in, then reads them;
    `whole()` checks every block and returns the mapped array itself."""

    def __init__(
        self,
        source: Path | bytes,
        digests: bytes,
        what: str,
        block_bytes: int = BLOCK_BYTES,
        trusted: bool = False,
    ) -> None:
        self.what = what  # e.g. "graph 'sbm' v3: indices.npy"
        self.block_bytes = block_bytes
        if isinstance(source, bytes | bytearray):
            self._raw = np.frombuffer(source, np.uint8)
        else:
            try:
                self._raw = np.memmap(source, np.uint8, mode="r")
            except FileNotFoundError:
                raise IntegrityError(f"{what} is missing") from None
            except ValueError:  # an empty file cannot be mapped; a .npy file never is one
                raise IntegrityError(f"{what} is empty") from None
        size = len(self._raw)
        if len(digests) != block_count(size, block_bytes) * DIGEST_BYTES:
            raise IntegrityError(
                f"{what}: {size} bytes make {block_count(size, block_bytes)} blocks, but its block list holds "
                f"{len(digests) // DIGEST_BYTES}: the file was cut short or grown; refusing it"
            )
        self._digests = np.frombuffer(digests, np.uint8).reshape(-1, DIGEST_BYTES)
        self._checked = np.full(len(self._digests), trusted, bool)
        self._all_checked = trusted
        self._check(np.zeros(1, np.int64))  # the header, in the first block
        head = io.BytesIO(bytes(self._raw[: min(size, block_bytes)]))
        try:
            version = np.lib.format.read_magic(head)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(head)
        except ValueError as exc:
            raise IntegrityError(f"{what}: not a .npy array ({exc})") from None
        offset = head.tell()
        rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        if fortran or dtype.hasobject or not shape or offset + math.prod(shape) * dtype.itemsize != size:
            raise IntegrityError(f"{what}: not a C-ordered numeric array of shape {list(shape)} filling the file")
        self.offset = offset
        self.row_bytes = rows * dtype.itemsize
        self.array = self._raw[offset:].view(dtype).reshape(shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, rows):
        if isinstance(rows, int | np.integer):
            return self.take(np.array([rows], np.int64))[0]
        return self.take(np.asarray(rows, np.int64))

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if not self._all_checked and rows.size and self.row_bytes:
            flat = np.unique(rows.reshape(-1))
            flat = np.where(flat < 0, flat + len(self.array), flat)  # numpy reads -1 as the last row: check that
            flat = flat[(flat >= 0) & (flat < len(self.array))]  # out of range: numpy's IndexError below
            first = (self.offset + flat * self.row_bytes) // self.block_bytes
            last = (self.offset + (flat + 1) * self.row_bytes - 1) // self.block_bytes
            if self.row_bytes > self.block_bytes:  # a row spans whole blocks: every one between
                spans = last - first + 1
                first = np.repeat(first - (np.cumsum(spans) - spans), spans) + np.arange(int(spans.sum()))
                self._check(np.unique(first))
            else:
                self._check(np.unique(np.concatenate([first, last])))
        return np.asarray(self.array[rows])

    def whole(self) -> np.ndarray:
        """The whole array (the mapping itself, no copy), every block checked first."""
        if not self._all_checked:
            self._check(np.arange(len(self._digests)))
        return self.array

    def _check(self, blocks: np.ndarray) -> None:
        for block in blocks[~self._checked[blocks]].tolist():
            start = block * self.block_bytes
            actual = hashlib.sha256(self._raw[start : start + self.block_bytes]).digest()
            if actual != self._digests[block].tobytes():
                raise IntegrityError(
                    f"{self.what}: block {block} (bytes {start}..{min(start + self.block_bytes, len(self._raw))}) "
                    "does not match its sha256; refusing to use it"
                )
            self._checked[block] = True  # races only check a block twice
        if not self._all_checked and self._checked.all():
            self._all_checked = True
