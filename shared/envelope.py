"""Envelope encryption of stored files: AES-256-GCM under a data key, the data key wrapped by a KEK.

Two file formats, both binary from their first byte (so no sealed file parses as JSON, CSV,
ONNX or safetensors):

- a **sealed stream** (`SEALED_MAGIC`): the plaintext cut into chunks of `chunk_bytes`, each
  sealed on its own with a fresh random 96-bit nonce stored before it. Data sets are streamed in
  1 MiB chunks; an artifact is one chunk (up to 1 GiB), decrypted in one call at load. The associated data of
  chunk i is the file's context (what it is, e.g. `artifact:model.onnx`), i as 8 bytes and a
  final-chunk flag, so chunks cannot be reordered, dropped, swapped between files or cut
  short: every chunk but the last holds exactly `chunk_bytes`, and only the last is sealed as
  final. Artifacts and data-set files are sealed streams under their version's or data set's
  data key; it is written and read chunk by chunk, never whole (`SealedWriter`, `open_stream`).

      SEALED_MAGIC | chunk_bytes (u32) | nonce (12) ciphertext+tag (chunk + 16) | ... | last chunk

- an **envelope** (`ENVELOPE_MAGIC`): a header naming the KEK and carrying the data key it
  wraps (AES key wrap, RFC 3394, which also detects a wrong KEK), then a sealed stream under
  that data key. Manifests, data sets' metadata and checkpoints are envelopes. Rotation
  rewrites only the header (`rewrap`): the sealed body, and so every hash over it, stays.

      ENVELOPE_MAGIC | header length (u16) | KEK id length (u8) KEK id | wrapped key length (u8)
      wrapped key | sealed stream
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import IntegrityError

SEALED_MAGIC = b"\x89MAAS-S\n"
ENVELOPE_MAGIC = b"\x89MAAS-E\n"
CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 30  # below AES-GCM's limit of 2**31 - 1 bytes per call in `cryptography`
NONCE_BYTES = 12
TAG_BYTES = 16
RECORD_OVERHEAD = NONCE_BYTES + TAG_BYTES
DATA_KEY_BYTES = 32
CIPHER = "AES-256-GCM"
_CHUNK_SIZE = struct.Struct(">I")
_AAD_TAIL = struct.Struct(">QB")
_HEADER_LENGTH = struct.Struct(">H")
STREAM_HEAD = len(SEALED_MAGIC) + _CHUNK_SIZE.size


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def whole_file_chunk(size: int) -> int:
    """The chunk size that seals a file of `size` bytes as one chunk (the final one), up to MAX_CHUNK_BYTES."""
    return min(size + 1, MAX_CHUNK_BYTES)


def nonce_layout() -> dict[str, object]:
    """How a version's files are sealed, for its manifest to record beside them."""
    return {
        "cipher": CIPHER,
        "data_key": "one per version, wrapped by the KEK named in the manifest's header",
        "chunks": "each file is one chunk up to 1 GiB (larger files: 1 GiB chunks); its size is in the file's head",
        "nonce": "96 random bits per chunk, stored before the chunk",
        "associated_data": "the file's context (artifact:<file name>), the chunk index (u64), a final-chunk flag (u8)",
    }


def _aad(context: bytes, index: int, final: bool) -> bytes:
    return context + b"\0" + _AAD_TAIL.pack(index, final)


class SealedWriter:
    """Writes a sealed stream to a binary file, chunk by chunk: at most one chunk of plaintext is held."""

    def __init__(self, out: BinaryIO, key: bytes, context: bytes, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.out = out
        self.cipher = AESGCM(key)
        self.context = context
        self.chunk_bytes = chunk_bytes
        self.index = 0
        self.pending = bytearray()
        self.written = 0
        # One output buffer, reused for every chunk: an upload sealed on whichever executor thread is free
        # allocates no fresh megabyte per chunk (glibc's per-thread arenas would keep each one).
        self._sealed: bytearray | None = None
        self._emit(SEALED_MAGIC + _CHUNK_SIZE.pack(chunk_bytes))

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.written += len(data)

    def _seal(self, chunk: bytes | bytearray | memoryview, final: bool) -> None:
        nonce = os.urandom(NONCE_BYTES)
        size = len(chunk) + TAG_BYTES
        if self._sealed is None or len(self._sealed) < size:
            self._sealed = bytearray(max(size, min(self.chunk_bytes, CHUNK_BYTES) + TAG_BYTES))
        out = memoryview(self._sealed)[:size]
        self.cipher.encrypt_into(nonce, chunk, _aad(self.context, self.index, final), out)
        self._emit(nonce)
        self._emit(out)
        self.index += 1

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self.pending:
            take = min(len(view), self.chunk_bytes - len(self.pending))
            self.pending += view[:take]
            view = view[take:]
            if len(self.pending) < self.chunk_bytes or not view:
                return  # a full chunk is sealed as non-final only once more data follows it
            self._seal(self.pending, final=False)
            self.pending.clear()
        # Whole chunks straight from the caller's buffer; the last full one waits: it may be the final.
        while len(view) > self.chunk_bytes:
            self._seal(view[: self.chunk_bytes], final=False)
            view = view[self.chunk_bytes :]
        self.pending += view

    def close(self) -> None:
        """Seals what is left as the final chunk (possibly empty, when the data filled whole chunks)."""
        if len(self.pending) == self.chunk_bytes:
            self._seal(self.pending, final=False)
            self.pending = bytearray()
        self._seal(self.pending, final=True)
        self.pending = bytearray()


class _Buffer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))  # the writer reuses its buffer


def seal(data: bytes | memoryview, key: bytes, context: bytes, chunk_bytes: int = CHUNK_BYTES) -> bytes:
    """The sealed stream of `data`, in memory."""
    out = _Buffer()
    writer = SealedWriter(out, key, context, chunk_bytes)  # type: ignore[arg-type]
    writer.write(data)
    writer.close()
    return b"".join(out.parts)


def _stream_head(head: bytes | memoryview, what: str) -> int:
    if bytes(head[: len(SEALED_MAGIC)]) != SEALED_MAGIC or len(head) < STREAM_HEAD:
        raise IntegrityError(f"{what}: not a sealed stream")
    (chunk_bytes,) = _CHUNK_SIZE.unpack(head[len(SEALED_MAGIC) : STREAM_HEAD])
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise IntegrityError(f"{what}: bad chunk size {chunk_bytes}")
    return chunk_bytes


def _refused(what: str, index: int) -> IntegrityError:
    return IntegrityError(
        f"{what}: chunk {index} does not authenticate: the file was altered, cut short or reordered, "
        "or it is not sealed under this data key"
    )


def _open_chunk(cipher: AESGCM, record: memoryview, context: bytes, index: int, final: bool, what: str) -> bytes:
    if len(record) < RECORD_OVERHEAD:
        raise IntegrityError(f"{what}: cut short (chunk {index} is incomplete)")
    try:
        return cipher.decrypt(record[:NONCE_BYTES], record[NONCE_BYTES:], _aad(context, index, final))
    except InvalidTag:
        raise _refused(what, index) from None


def open_sealed(blob: bytes | memoryview, key: bytes, context: bytes, what: str = "sealed file") -> bytes:
    """The plaintext of a whole sealed stream held in memory; IntegrityError unless every chunk authenticates."""
    view = memoryview(blob)
    chunk_bytes = _stream_head(view, what)
    record = chunk_bytes + RECORD_OVERHEAD
    body = view[STREAM_HEAD:]
    full, rest = divmod(len(body), record)
    if rest < RECORD_OVERHEAD:  # the final chunk always holds less than a whole chunk
        raise IntegrityError(f"{what}: cut short (no final chunk)")
    cipher = AESGCM(key)
    if full == 0:  # one chunk (every artifact under 1 GiB): decrypted straight into the bytes returned
        return _open_chunk(cipher, body, context, 0, True, what)
    out = bytearray(full * chunk_bytes + rest - RECORD_OVERHEAD)
    target = memoryview(out)
    for index in range(full + 1):
        chunk = body[index * record : (index + 1) * record]
        length = len(chunk) - RECORD_OVERHEAD
        try:
            cipher.decrypt_into(
                chunk[:NONCE_BYTES], chunk[NONCE_BYTES:], _aad(context, index, index == full),
                target[index * chunk_bytes : index * chunk_bytes + length],
            )  # fmt: skip
        except InvalidTag:
            raise _refused(what, index) from None
    return bytes(out)


def open_stream(source: BinaryIO, key: bytes, context: bytes, what: str = "sealed file") -> Iterator[bytes]:
    """Plaintext chunks of a sealed stream read from a file, one chunk in memory at a time."""
    chunk_bytes = _stream_head(source.read(STREAM_HEAD), what)
    record = chunk_bytes + RECORD_OVERHEAD
    cipher = AESGCM(key)
    index = 0
    current = source.read(record)
    while True:
        if len(current) < record:  # shorter than a whole record: the final chunk
            yield _open_chunk(cipher, memoryview(current), context, index, True, what)
            return
        following = source.read(record)
        if not following:
            raise IntegrityError(f"{what}: cut short (no final chunk)")
        yield _open_chunk(cipher, memoryview(current), context, index, False, what)
        index += 1
        current = following


def plaintext_size(stored_size: int, chunk_bytes: int) -> int:
    full, rest = divmod(stored_size - STREAM_HEAD, chunk_bytes + RECORD_OVERHEAD)
    return full * chunk_bytes + max(rest - RECORD_OVERHEAD, 0)


@dataclass(frozen=True)
class EnvelopeHeader:
    """The non-secret head of an envelope: which KEK wraps the data key, and the wrapped key."""

    kek_id: str
    wrapped_key: bytes

    def encode(self) -> bytes:
        kek = self.kek_id.encode("ascii")
        header = bytes([len(kek)]) + kek + bytes([len(self.wrapped_key)]) + self.wrapped_key
        return ENVELOPE_MAGIC + _HEADER_LENGTH.pack(len(header)) + header


def is_envelope(blob: bytes | memoryview) -> bool:
    return bytes(blob[: len(ENVELOPE_MAGIC)]) == ENVELOPE_MAGIC


def is_sealed(blob: bytes | memoryview) -> bool:
    return bytes(blob[: len(SEALED_MAGIC)]) == SEALED_MAGIC


def split_envelope(blob: bytes | memoryview, what: str = "envelope") -> tuple[EnvelopeHeader, memoryview]:
    """(header, sealed body) of an envelope."""
    view = memoryview(blob)
    start = len(ENVELOPE_MAGIC) + _HEADER_LENGTH.size
    if not is_envelope(view) or len(view) < start:
        raise IntegrityError(f"{what}: not an envelope")
    (length,) = _HEADER_LENGTH.unpack(view[len(ENVELOPE_MAGIC) : start])
    header = bytes(view[start : start + length])
    try:
        kek_length = header[0]
        kek_id = header[1 : 1 + kek_length].decode("ascii")
        key_length = header[1 + kek_length]
        wrapped = header[2 + kek_length : 2 + kek_length + key_length]
    except (IndexError, UnicodeDecodeError):
        raise IntegrityError(f"{what}: its header is malformed") from None
    if len(wrapped) != key_length or 2 + kek_length + key_length != length:
        raise IntegrityError(f"{what}: its header is malformed")
    return EnvelopeHeader(kek_id, wrapped), view[start + length :]


def make_envelope(header: EnvelopeHeader, body: bytes | memoryview) -> bytes:
    return header.encode() + bytes(body)
