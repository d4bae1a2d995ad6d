"""ttrpc connection state machines, h11 style: bytes in, events out, events to bytes.

:class:`ServerConnection` turns a client's byte stream into
:class:`RequestReceived` (or :class:`BadRequest`, which must be answered with
its status) and encodes responses. :class:`ClientConnection` numbers
requests (odd stream ids from 1, step 2), encodes them, and turns the
server's bytes into :class:`ResponseReceived`. Neither does any I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from vaccelray.errors import Detail, LocalProtocolError, RemoteProtocolError, StatusCode
from vaccelray.protocol.envelope import (
    EnvelopeError,
    decode_request,
    decode_response,
    encode_error_response,
    request_parts,
    response_parts,
)
from vaccelray.protocol.frames import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    encode_frame,
    join_frame,
)

__all__ = [
    "NEED_DATA",
    "BadRequest",
    "ClientConnection",
    "RequestReceived",
    "ResponseReceived",
    "ServerConnection",
]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` when more bytes must be received first.
NEED_DATA: Final = _NeedData()

Metadata = tuple[tuple[str, str], ...]


class RequestReceived(NamedTuple):
    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: Metadata


class BadRequest(NamedTuple):
    """A request that cannot be dispatched; answer it with ``code`` and ``message``."""

    stream_id: int
    code: StatusCode
    message: str


class ResponseReceived(NamedTuple):
    stream_id: int
    code: int
    message: str
    details: tuple[Detail, ...]
    payload: bytes

    @property
    def ok(self) -> bool:
        return self.code == 0


_REQUEST: Final = FrameType.REQUEST
_RESPONSE: Final = FrameType.RESPONSE


class ServerConnection:
    """The server side of one ttrpc connection."""

    __slots__ = ("_decoder", "_open_streams")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._decoder = FrameDecoder(max_message_size)
        self._open_streams: set[int] = set()

    @property
    def open_streams(self) -> int:
        """Requests received and not yet answered."""
        return len(self._open_streams)

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_event(self) -> RequestReceived | BadRequest | _NeedData:
        """The next request; raises :class:`RemoteProtocolError` on a broken stream."""
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                return NEED_DATA
            stream_id = frame.stream_id
            if not stream_id & 1:
                raise RemoteProtocolError(f"client used even stream id {stream_id}")
            # Like containerd's server, skip the known frame types we do not
            # serve (streaming DATA of newer clients) for future compatibility.
            if frame.type == _REQUEST:
                break
        if stream_id in self._open_streams:
            raise RemoteProtocolError(f"stream {stream_id} reused while its request is in flight")
        self._open_streams.add(stream_id)
        if isinstance(frame, OversizedFrame):
            return BadRequest(
                stream_id,
                StatusCode.RESOURCE_EXHAUSTED,
                f"message of {frame.length} bytes exceeds the limit of "
                f"{self._decoder.max_message_size} bytes",
            )
        try:
            service, method, payload, timeout_nano, metadata = decode_request(frame.body)
        except EnvelopeError as exc:
            return BadRequest(stream_id, StatusCode.INVALID_ARGUMENT, f"undecodable request: {exc}")
        return RequestReceived(stream_id, service, method, payload, timeout_nano, metadata)

    def send_response(
        self,
        stream_id: int,
        payload: bytes = b"",
        code: int = 0,
        message: str = "",
        details: Sequence[Detail] = (),
    ) -> bytes:
        """Bytes answering *stream_id*; an OK status is omitted, as Go does.

        An OK answer larger than the message size limit is never sent (the
        peer would have to refuse it): the caller gets RESOURCE_EXHAUSTED
        naming its size instead. (Error answers are a status of our own.)
        """
        try:
            self._open_streams.remove(stream_id)
        except KeyError:
            raise LocalProtocolError(f"no request in flight on stream {stream_id}") from None
        limit = self._decoder.max_message_size
        if code == 0:
            parts = response_parts(payload)
            size = sum(map(len, parts))
            if size <= limit:
                return join_frame(stream_id, FrameType.RESPONSE, parts)
            code, payload, details = StatusCode.RESOURCE_EXHAUSTED, b"", ()
            message = f"response of {size} bytes exceeds the limit of {limit} bytes"
        body = encode_error_response(code, message, details, payload)
        return encode_frame(stream_id, FrameType.RESPONSE, body)


class ClientConnection:
    """The client side of one ttrpc connection."""

    __slots__ = ("_abandoned", "_decoder", "_next_stream_id", "_pending")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._decoder = FrameDecoder(max_message_size)
        self._next_stream_id = 1
        self._pending: set[int] = set()
        self._abandoned: set[int] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout_nano: int = 0,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """A new stream id and the bytes of its request frame."""
        stream_id = self._next_stream_id
        if stream_id >= 1 << 32:
            raise LocalProtocolError("stream ids exhausted on this connection; open a new one")
        self._next_stream_id = stream_id + 2
        parts = request_parts(service, method, payload, timeout_nano, metadata)
        data = join_frame(stream_id, FrameType.REQUEST, parts)
        self._pending.add(stream_id)
        return stream_id, data

    def abandon(self, stream_id: int) -> None:
        """Stop waiting for *stream_id* (timed out, cancelled); its late answer is dropped."""
        if stream_id in self._pending:
            self._pending.remove(stream_id)
            self._abandoned.add(stream_id)

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_event(self) -> ResponseReceived | _NeedData:
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                return NEED_DATA
            event = self._response(frame)
            if event is not None:
                return event

    def _response(self, frame: Frame | OversizedFrame) -> ResponseReceived | None:
        stream_id = frame.stream_id
        if frame.type != _RESPONSE:
            raise RemoteProtocolError(
                f"server sent a {frame.type.name} frame on stream {stream_id}"
            )
        if stream_id in self._abandoned:
            self._abandoned.remove(stream_id)
            return None
        if stream_id not in self._pending:
            raise RemoteProtocolError(f"response on stream {stream_id}, which has no request")
        self._pending.remove(stream_id)
        if isinstance(frame, OversizedFrame):
            return ResponseReceived(
                stream_id,
                StatusCode.RESOURCE_EXHAUSTED,
                f"response of {frame.length} bytes exceeds the limit of "
                f"{self._decoder.max_message_size} bytes",
                (),
                b"",
            )
        try:
            code, message, details, payload = decode_response(frame.body)
        except EnvelopeError as exc:
            raise RemoteProtocolError(f"undecodable response on stream {stream_id}: {exc}") from exc
        return ResponseReceived(stream_id, code, message, details, payload)
