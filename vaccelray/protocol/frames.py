"""The ttrpc frame codec.

A frame is a 10-byte big-endian header (body length, stream id, type, flags)
followed by the body. :class:`FrameDecoder` takes bytes as they arrive and
hands out whole frames; a frame whose declared length exceeds the limit is
reported as :class:`OversizedFrame` and its body is skipped as it arrives,
so the connection stays usable (what containerd's server does).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from vaccelray.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "OversizedFrame",
    "encode_frame",
]

HEADER: Final = struct.Struct(">IIBB")
HEADER_SIZE: Final = HEADER.size
#: containerd's and ttrpc-rust's limit on a frame body.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 << 20
_MAX_STREAM_ID: Final = (1 << 32) - 1


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: FrameType
    flags: int
    body: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame declared larger than the limit; its body is being discarded."""

    stream_id: int
    type: FrameType
    length: int


def encode_frame(stream_id: int, frame_type: FrameType, body: bytes, flags: int = 0) -> bytes:
    """Header and body as one bytes object, ready for a single write."""
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id {stream_id} does not fit in 32 bits")
    if len(body) > _MAX_STREAM_ID:
        raise LocalProtocolError(f"frame body of {len(body)} bytes does not fit in 32 bits")
    return HEADER.pack(len(body), stream_id, frame_type, flags) + body


_TYPES: Final = {t.value: t for t in FrameType}


class FrameDecoder:
    """Incremental decoder: ``feed(data)``, then ``next_frame()`` until ``None``."""

    __slots__ = ("_buffer", "_discard", "_pos", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._pos = 0
        self._discard = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (excluding skipped bodies)."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> None:
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
            if not data:
                return
        self._buffer += data

    def next_frame(self) -> Frame | OversizedFrame | None:
        """The next whole frame, or ``None`` when more bytes are needed.

        Raises :class:`RemoteProtocolError` for a header no peer may send
        (unknown frame type); the connection cannot be resynchronised after it.
        """
        buf = self._buffer
        pos = self._pos
        available = len(buf) - pos
        if available < HEADER_SIZE:
            self._compact()
            return None
        length, stream_id, raw_type, flags = HEADER.unpack_from(buf, pos)
        frame_type = _TYPES.get(raw_type)
        if frame_type is None:
            raise RemoteProtocolError(f"frame of unknown type {raw_type} on stream {stream_id}")
        if length > self.max_message_size:
            self._pos = pos + HEADER_SIZE
            take = min(length, len(buf) - self._pos)
            self._pos += take
            self._discard = length - take
            self._compact()
            return OversizedFrame(stream_id, frame_type, length)
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            self._compact()
            return None
        body = bytes(buf[pos + HEADER_SIZE : end])
        self._pos = end
        return Frame(stream_id, frame_type, flags, body)

    def _compact(self) -> None:
        # Drop consumed bytes once per batch rather than once per frame.
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
