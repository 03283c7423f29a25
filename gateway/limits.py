"""Limits a Predict request meets before the gateway does any work that grows with it.

The raw size is checked before the request is parsed; after parsing, one walk over its fields
(not its elements) checks every repeated field's length and every tensor's shape. Only then
are the cache digest, the tenant's view of the model and the backend call computed, so a
request of five million empty texts is refused in microseconds and the event loop never
stalls on it. The model services check their own, tighter limits again (texts per call,
feature widths, node ids in range).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from maas.common.v1 import tensor_pb2
from shared.errors import InvalidArgumentError, ResourceExhaustedError
from shared.tensors import check_shape

TENSOR = tensor_pb2.Tensor.DESCRIPTOR.full_name


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = 32 * 1024 * 1024
    max_repeated: int = 65_536
    max_tensor_elements: int = 1 << 24

    @classmethod
    def from_settings(cls, settings) -> RequestLimits:
        return cls(settings.max_request_bytes, settings.max_repeated, settings.max_tensor_elements)

    def check_size(self, raw: bytes) -> None:
        if len(raw) > self.max_request_bytes:
            raise ResourceExhaustedError(
                f"request of {len(raw)} bytes; the gateway takes at most {self.max_request_bytes} "
                "(MAAS_GATEWAY_MAX_REQUEST_BYTES): send fewer rows per call"
            )

    def check(self, message, path: str = "") -> None:
        """Every repeated field's length and every tensor's shape, by field: no per-element work. Only
        the fields that are set are visited, and a field's name is spelled out only for an error."""
        if message.DESCRIPTOR.full_name == TENSOR:
            check_shape(message.shape, path or "tensor", self.max_tensor_elements)
            return
        for field, value in message.ListFields():
            if field.is_repeated:
                if len(value) > self.max_repeated:
                    raise InvalidArgumentError(
                        f"{_name(path, field)}: {len(value)} entries; at most {self.max_repeated} per request "
                        "(MAAS_GATEWAY_MAX_REPEATED)"
                    )
                if field.message_type is None:
                    continue
                map_value = _map_value(field.message_type)
                if map_value is not None:
                    if map_value.message_type is not None:
                        for key in value:
                            self.check(value[key], f"{_name(path, field)}[{key!r}]")
                else:
                    for i, item in enumerate(value):
                        self.check(item, f"{_name(path, field)}[{i}]")
            elif field.message_type is not None:
                self.check(value, _name(path, field))


def _name(path: str, field) -> str:
    return f"{path}.{field.name}" if path else field.name


@functools.cache
def _map_value(message_type):
    """The value field of a map's entry type; None for a message type that is no map entry."""
    return message_type.fields_by_name["value"] if message_type.GetOptions().map_entry else None
