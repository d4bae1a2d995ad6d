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

from typing import Final

__all__ = ["FieldError", "decode_varint", "encode_varint", "read_varint_field", "with_varint_field"]

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


def _spans(data: bytes, number: int) -> tuple[list[tuple[int, int]], int | None]:
    """(start, end) of each occurrence of varint field *number*, and the last one's value."""
    spans: list[tuple[int, int]] = []
    value: int | None = None
    pos, size = 0, len(data)
    while pos < size:
        start = pos
        key, pos = decode_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise FieldError("field number 0")
        if wire_type == _VARINT:
            found, pos = decode_varint(data, pos)
            if field == number:
                spans.append((start, pos))
                value = found
        elif wire_type == _LEN:
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
        if field == number and wire_type != _VARINT:
            raise FieldError(f"field {number} is not a varint")
    return spans, value


def read_varint_field(data: bytes, number: int) -> int:
    """The value of varint field *number* as an int64 (0 when absent, as proto3 reads it)."""
    value = _spans(data, number)[1]
    if value is None:
        return 0
    return value - _UINT64 if value >= 1 << 63 else value


def with_varint_field(data: bytes, number: int, value: int) -> bytes:
    """*data* with varint field *number* set to *value* (left out when 0, as proto3 writes it).

    The new field takes the place of the last occurrence (or goes at the end),
    so a message protobuf wrote keeps its field order.
    """
    spans, _ = _spans(data, number)
    field = encode_varint(number << 3 | _VARINT) + encode_varint(value) if value else b""
    if not spans:
        return data + field
    parts = []
    pos = 0
    for start, end in spans:
        parts.append(data[pos:start])
        pos = end
    parts += (field, data[pos:])
    return b"".join(parts)
