"""One varint field of an encoded protobuf message, read or replaced without decoding the rest.

The scheduler forwards a session-bound vAccel call by swapping the client's
session id for the worker's. Decoding the whole request and encoding it
again would copy every image and tensor twice; walking the top-level fields
only looks at their tags and lengths. A field may appear more than once
(the last one wins, as protobuf parsers do); replacing keeps one, where
the last was. Bytes that are not a protobuf message raise
:class:`FieldError` (a ``ValueError``).
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = [
    "FieldError",
    "VarintField",
    "decode_varint",
    "encode_varint",
    "find_varint_field",
    "read_varint_field",
    "replace_varint_field",
    "with_varint_field",
]

_VARINT: Final = 0
_FIXED64: Final = 1
_LEN: Final = 2
_FIXED32: Final = 5
_UINT64: Final = 1 << 64
_ONE_BYTE: Final = tuple(bytes((i,)) for i in range(0x80))


class FieldError(ValueError):
    """The bytes are not an encoded protobuf message."""


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at *pos*; FieldError when cut short."""
    value = shift = 0
    end = min(len(data), pos + 10)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise FieldError("truncated or overlong varint")


def encode_varint(value: int) -> bytes:
    """*value* as a protobuf varint (a negative int64 takes ten bytes, as protobuf writes it)."""
    if 0 <= value < 0x80:  # most lengths and ids: the envelope's hot path
        return _ONE_BYTE[value]
    value %= _UINT64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class VarintField(NamedTuple):
    """Where a varint field is in one encoded message (see :func:`find_varint_field`)."""

    number: int
    #: Its value as an int64 (0 when absent, as proto3 reads it).
    value: int
    #: (start, end) of each occurrence, in order.
    spans: tuple[tuple[int, int], ...]


def find_varint_field(data: bytes, number: int) -> VarintField:
    """Varint field *number* of *data*: its value and where it is, in one walk.

    Keys, values and lengths below 0x80 (fields 1 to 15, small ids, short
    fields) are read inline: the walk of a small request makes no call per
    field, only per longer varint.
    """
    spans: list[tuple[int, int]] = []
    value = 0
    pos, size = 0, len(data)
    while pos < size:
        start = pos
        key = data[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = decode_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise FieldError("field number 0")
        if wire_type == _VARINT:
            if pos < size and data[pos] < 0x80:
                found = data[pos]
                pos += 1
            else:
                found, pos = decode_varint(data, pos)
            if field == number:
                spans.append((start, pos))
                value = found
            continue
        if wire_type == _LEN:
            if pos < size and data[pos] < 0x80:
                pos += data[pos] + 1
            else:
                length, pos = decode_varint(data, pos)
                pos += length
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise FieldError(f"unsupported wire type {wire_type}")
        if pos > size:
            raise FieldError("truncated field")
        if field == number:
            raise FieldError(f"field {number} is not a varint")
    if value >= 1 << 63:
        value -= _UINT64
    return VarintField(number, value, tuple(spans))


def read_varint_field(data: bytes, number: int) -> int:
    """The value of varint field *number* as an int64 (0 when absent, as proto3 reads it)."""
    return find_varint_field(data, number).value


def replace_varint_field(data: bytes, found: VarintField, value: int) -> bytes:
    """*data*, where *found* was read, with that field set to *value* (left out when 0).

    The new field takes the place of the last occurrence (or goes at the end),
    so a message protobuf wrote keeps its field order; the rest is copied once.
    """
    field = encode_varint(found.number << 3 | _VARINT) + encode_varint(value) if value else b""
    spans = found.spans
    if not spans:
        return data + field
    view = memoryview(data)
    if len(spans) == 1:  # as protobuf writes it: what is before the field, and after
        start, end = spans[0]
        return b"".join((view[:start], field, view[end:]))
    parts: list[bytes | memoryview] = []
    pos = 0
    for start, end in spans:
        parts.append(view[pos:start])
        pos = end
    parts += (field, view[pos:])
    return b"".join(parts)


def with_varint_field(data: bytes, number: int, value: int) -> bytes:
    """*data* with varint field *number* set to *value* (see :func:`replace_varint_field`)."""
    return replace_varint_field(data, find_varint_field(data, number), value)
