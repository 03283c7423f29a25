"""Hypothesis strategies for malformed requests of any protobuf message, read off its descriptor.

A request is built field by field with values a caller should not send but can: empty, huge,
negative and non-ASCII strings and numbers, NaN and infinities, tensors whose shape, dtype and
bytes disagree, maps with odd keys, messages nested in the wrong places; or it is random bytes
on the wire, or a valid-looking message with bytes flipped.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**62, 2**63 - 1, -(2**63)]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
UINT64 = st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(min_value=0, max_value=2**64 - 1))
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.one_of(
    st.sampled_from(["", " ", "²", "../../etc/passwd", "a" * 300, "digits-mlp", "sentiment", "karate-gcn", "\x00"]),
    st.text(max_size=40),
)
BYTES = st.binary(max_size=256)

_SCALARS = {
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_UINT32: st.integers(min_value=0, max_value=2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(min_value=0, max_value=2**32 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: FLOATS,
    FieldDescriptor.TYPE_DOUBLE: DOUBLES,
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: BYTES,
}
TENSOR = "maas.common.v1.Tensor"


def _tensor(message_class):
    shapes = st.lists(st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**62, 2**63 - 1])), max_size=4)
    return st.builds(
        lambda dtype, shape, data: message_class(dtype=dtype, shape=shape, data=data),
        st.integers(min_value=0, max_value=12),
        shapes,
        st.binary(max_size=512),
    )


def scalar(field: FieldDescriptor):
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 50))
    return _SCALARS[field.type]


def message(message_class, depth: int = 0):
    """A message of `message_class` with a random subset of its fields set to odd values."""
    descriptor = message_class.DESCRIPTOR
    if descriptor.full_name == TENSOR:
        return _tensor(message_class)

    @st.composite
    def build(draw):
        instance = message_class()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            value = getattr(instance, field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_field = field.message_type.fields_by_name["key"]
                value_field = field.message_type.fields_by_name["value"]
                for _ in range(draw(st.integers(0, 3))):
                    key = draw(scalar(key_field))
                    if value_field.message_type is not None:
                        if depth < 3:
                            entry = value[key]
                            entry.CopyFrom(draw(message(type(entry), depth + 1)))
                    else:
                        value[key] = draw(scalar(value_field))
            elif field.is_repeated:
                count = draw(st.integers(0, 4))
                if field.message_type is not None:
                    if depth < 3:
                        for _ in range(count):
                            item = value.add()
                            item.CopyFrom(draw(message(type(item), depth + 1)))
                else:
                    value.extend(draw(st.lists(scalar(field), max_size=count)))
            elif field.message_type is not None:
                if depth < 3:
                    value.CopyFrom(draw(message(type(value), depth + 1)))
            else:
                setattr(instance, field.name, draw(scalar(field)))
        return instance

    return build()


def mutated(seed):
    """A valid request with one field replaced by an odd value (or cleared): reaches the checks that
    run after the first ones pass, which a wholly random message rarely does."""
    fields = list(seed.DESCRIPTOR.fields)

    @st.composite
    def build(draw):
        request = type(seed)()
        request.CopyFrom(seed)
        field = draw(st.sampled_from(fields))
        odd = draw(message(type(seed)))
        if odd.ListFields() and draw(st.booleans()):
            request.ClearField(field.name)
            if field.is_repeated or field.message_type is None or odd.HasField(field.name):
                if field.is_repeated:
                    getattr(request, field.name).MergeFrom(getattr(odd, field.name))
                elif field.message_type is not None:
                    getattr(request, field.name).CopyFrom(getattr(odd, field.name))
                else:
                    setattr(request, field.name, getattr(odd, field.name))
        else:
            request.ClearField(field.name)
        return request

    return build()


def wire(message_class, seeds=()):
    """Serialized requests: odd messages, valid ones with a field made odd, either with bytes flipped
    or cut, or random bytes."""
    # Valid requests with one odd field reach deeper checks: draw them three times as often.
    sources = [message(message_class)] + [mutated(seed) for seed in seeds for _ in range(3)]

    @st.composite
    def build(draw):
        raw = draw(st.one_of(*sources)).SerializeToString()
        mode = draw(st.sampled_from(["message", "message", "flipped", "cut", "random"]))
        if mode == "flipped" and raw:
            data = bytearray(raw)
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= draw(st.integers(1, 255))
            return bytes(data)
        if mode == "cut" and raw:
            return raw[: draw(st.integers(0, len(raw) - 1))]
        if mode == "random":
            return draw(st.binary(max_size=300))
        return raw

    return build()
