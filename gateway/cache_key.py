"""Cache keys from a canonical encoding of a request's inputs, never from its protobuf bytes.

Protobuf bytes are not canonical (map order, field order, unknown fields), so the digest walks
the request message itself, for any family: fields in field-number order, each tagged with its
number and length-prefixed, map entries sorted by key, tensors as dtype + shape + raw bytes,
and the presence of optional message fields. The model's name and version are not hashed:
the key names them. Two requests that mean the same thing get the same key; requests that
differ in any input, shape or dtype get different ones.
"""

from __future__ import annotations

import hashlib
import struct

from google.protobuf.descriptor import FieldDescriptor

from maas.common.v1 import tensor_pb2

KEY_PREFIX = "maas:v1:result"
# Named in the key itself (family, model, version), so not part of the digest.
KEY_FIELDS = frozenset({"model_name", "model_version"})
TENSOR = tensor_pb2.Tensor.DESCRIPTOR.full_name
_FLOAT = {FieldDescriptor.TYPE_FLOAT: "<f", FieldDescriptor.TYPE_DOUBLE: "<d"}


class CanonicalHasher:
    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def _part(self, tag: bytes, payload: bytes) -> None:
        self._digest.update(tag + struct.pack("<Q", len(payload)) + payload)

    def text(self, value: str) -> CanonicalHasher:
        self._part(b"s", value.encode("utf-8"))
        return self

    def raw(self, value: bytes) -> CanonicalHasher:
        self._part(b"b", value)
        return self

    def integers(self, values) -> CanonicalHasher:
        values = list(values)
        self._part(b"i", struct.pack(f"<{len(values)}q", *values))
        return self

    def floats(self, fmt: str, values) -> CanonicalHasher:
        values = list(values)
        self._part(b"f", struct.pack(f"<{len(values)}{fmt[-1]}", *values))
        return self

    def tensor(self, tensor: tensor_pb2.Tensor) -> CanonicalHasher:
        self.integers([tensor.dtype, len(tensor.shape), *tensor.shape])
        self._part(b"t", tensor.data)
        return self

    def message(self, message, skip: frozenset[str] = frozenset()) -> CanonicalHasher:
        """Every set field of `message`, in field-number order."""
        if message.DESCRIPTOR.full_name == TENSOR:
            return self.tensor(message)
        for field in sorted(message.DESCRIPTOR.fields, key=lambda f: f.number):
            if field.name in skip:
                continue
            value = getattr(message, field.name)
            self.integers([field.number])
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                self._map(field, value)
            elif field.is_repeated:
                self.integers([len(value)])
                for item in value:
                    self._value(field, item)
            elif field.message_type is not None:
                present = message.HasField(field.name)
                self.integers([present])
                if present:
                    self.message(value)
            else:
                self._value(field, value)
        return self

    def _map(self, field: FieldDescriptor, entries) -> None:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        self.integers([len(entries)])
        for key in sorted(entries):
            self._value(key_field, key)
            self._value(value_field, entries[key])

    def _value(self, field: FieldDescriptor, value) -> None:
        if field.message_type is not None:
            self.message(value)
        elif field.type == FieldDescriptor.TYPE_STRING:
            self.text(value)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            self.raw(value)
        elif field.type in _FLOAT:
            self.floats(_FLOAT[field.type], [value])
        else:  # integers, booleans and enums
            self.integers([int(value)])

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def request_digest(family: str, request) -> str:
    """The digest of a Predict request of any family."""
    return CanonicalHasher().text(family).message(request, KEY_FIELDS).hexdigest()


def result_key(family: str, model: str, version: int, digest: str, owner: str = "") -> str:
    """The cache key of a result. A private model's keys also name its owner (hashed, since a tenant
    name may hold any character), so no two tenants' entries ever share a key."""
    if owner:
        tenant = hashlib.sha256(owner.encode()).hexdigest()[:16]
        return f"{KEY_PREFIX}:{family}:{model}:{version}:t-{tenant}:{digest}"
    return f"{KEY_PREFIX}:{family}:{model}:{version}:{digest}"
