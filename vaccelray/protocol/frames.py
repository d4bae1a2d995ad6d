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
from typing import Final, NamedTuple

from vaccelray.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "OversizedFrame",
    "encode_frame",
    "join_frame",
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


# Frames and events are NamedTuples: one is made per message on the hot path,
# and a tuple is several times cheaper to build than a frozen dataclass.
class Frame(NamedTuple):
    stream_id: int
    type: FrameType
    flags: int
    body: bytes


class OversizedFrame(NamedTuple):
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


def join_frame(stream_id: int, frame_type: FrameType, parts: list[bytes], flags: int = 0) -> bytes:
    """:func:`encode_frame` of the body ``b"".join(parts)``, in one copy."""
    size = sum(map(len, parts))
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id {stream_id} does not fit in 32 bits")
    if size > _MAX_STREAM_ID:
        raise LocalProtocolError(f"frame body of {size} bytes does not fit in 32 bits")
    return b"".join([HEADER.pack(size, stream_id, frame_type, flags), *parts])


_TYPES: Final = {t.value: t for t in FrameType}


class FrameDecoder:
    """Incremental decoder: ``feed(data)``, then ``next_frame()`` until ``None``.

    Received chunks are kept as they are and joined only once a whole frame
    is there, so a chunk holding whole frames is sliced without any copy of
    the buffer, and a large frame arriving in many chunks is joined once.
    """

    __slots__ = ("_buf", "_chunks", "_discard", "_pending", "_pos", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buf = b""
        self._pos = 0
        self._chunks: list[bytes] = []
        self._pending = 0  # bytes in _chunks
        self._discard = 0  # body bytes of an oversized frame still to skip

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (excluding skipped bodies)."""
        return len(self._buf) - self._pos + self._pending

    @property
    def in_frame(self) -> bool:
        """Whether bytes not handed out as a frame yet are held, or a skipped body is arriving.

        After ``next_frame`` returned ``None``: whether a frame is part way in.
        """
        return bool(self._discard or self._chunks or self._pos < len(self._buf))

    def feed(self, data: bytes) -> None:
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
        if not data:
            return
        if self._pos >= len(self._buf) and not self._chunks:
            self._buf = data
            self._pos = 0
        else:
            self._chunks.append(data)
            self._pending += len(data)

    def _available(self, needed: int) -> bool:
        """Whether *needed* bytes from the current position have arrived; joins them if so."""
        if len(self._buf) - self._pos >= needed:
            return True
        if len(self._buf) - self._pos + self._pending < needed:
            return False
        self._buf = b"".join([self._buf[self._pos :], *self._chunks])
        self._pos = 0
        self._chunks = []
        self._pending = 0
        return True

    def next_frame(self) -> Frame | OversizedFrame | None:
        """The next whole frame, or ``None`` when more bytes are needed.

        Raises :class:`RemoteProtocolError` for a header no peer may send
        (unknown frame type); the connection cannot be resynchronised after it.
        """
        if not self._available(HEADER_SIZE):
            return None
        pos = self._pos
        length, stream_id, raw_type, flags = HEADER.unpack_from(self._buf, pos)
        frame_type = _TYPES.get(raw_type)
        if frame_type is None:
            raise RemoteProtocolError(f"frame of unknown type {raw_type} on stream {stream_id}")
        if length > self.max_message_size:
            self._skip_oversized(length)
            return OversizedFrame(stream_id, frame_type, length)
        buf = self._buf
        start = pos + HEADER_SIZE
        end = start + length
        if end <= len(buf):
            self._pos = end
            return Frame(stream_id, frame_type, flags, buf[start:end])
        if len(buf) - start + self._pending < length:
            return None
        return Frame(stream_id, frame_type, flags, self._join_body(start, length))

    def _join_body(self, start: int, length: int) -> bytes:
        """The *length* bytes from *start* of the buffer on, the chunks' included, in one copy.

        Only the body is joined (not the chunks after it, nor the header), so
        a large frame costs its body once, and nothing of it stays held here
        once the frame is handed out.
        """
        parts = [self._buf[start:]]
        need = length - len(parts[0])
        chunks = self._chunks
        for i, chunk in enumerate(chunks):
            if len(chunk) >= need:
                parts.append(chunk[:need])
                self._buf, self._pos = chunk[need:], 0
                self._chunks = rest = chunks[i + 1 :]
                self._pending = sum(map(len, rest))
                break
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)

    def _skip_oversized(self, length: int) -> None:
        # Consume the header and whatever of the body is here; feed() skips the rest.
        rest = len(self._buf) - self._pos - HEADER_SIZE
        take = min(length, rest)
        self._pos += HEADER_SIZE + take
        length -= take
        while length and self._chunks:
            chunk = self._chunks.pop(0)
            self._pending -= len(chunk)
            if len(chunk) > length:
                self._chunks.insert(0, chunk[length:])
                self._pending += len(chunk) - length
                length = 0
            else:
                length -= len(chunk)
        self._discard = length
