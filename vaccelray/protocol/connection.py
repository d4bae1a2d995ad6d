"""ttrpc connection state machines, h11 style: bytes in, events out, events to bytes.

:class:`ServerConnection` turns a client's byte stream into
:class:`RequestReceived` (or :class:`BadRequest`, which must be answered with
its status) and encodes responses. :class:`ClientConnection` numbers
requests (odd stream ids from 1, step 2), encodes them, and turns the
server's bytes into :class:`ResponseReceived`. Neither does any I/O.

A server connection given a :class:`~vaccelray.metrics.CallMetrics` counts
its reads and calls there as it decodes and answers them: here, in the
methods every call passes through, because a layer around them costs twice
as much a call (``bench/bench_metrics.py --micro``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

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

if TYPE_CHECKING:
    from vaccelray.metrics import CallMetrics, MethodStats

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
    #: What the connection's table of methods holds for (service, method); None if nothing.
    target: object = None


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


#: Upper bounds (seconds) of the call latency buckets (``vaccelray.metrics``); one more
#: bucket holds the rest.
LATENCY_BOUNDS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Latencies a method keeps before they are sorted into its buckets (``MethodStats.fold``).
FOLD_AT: Final = 256
_clock = time.perf_counter
#: The table of a connection given none: every request's target is None.
_NOTHING: Final[Mapping[tuple[str, str], object]] = {}


class ServerConnection:
    """The server side of one ttrpc connection; its calls counted in *metrics* when given.

    Each request's :attr:`RequestReceived.target` is what *methods* holds for
    its (service, method) (a server's handlers), looked up here once for the
    server's dispatch and the metering alike. A call's latency runs from the
    read that completed its request (one clock reading a read, however many
    requests it held) to its answer.
    """

    __slots__ = ("_arrived", "_decoder", "_last", "_methods", "_metrics", "_open_streams")

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        metrics: CallMetrics | None = None,
        methods: Mapping[tuple[str, str], object] = _NOTHING,
    ) -> None:
        self._decoder = FrameDecoder(max_message_size)
        self._methods = methods
        #: Requests received and not yet answered, by stream id: when metered, their
        #: method's counters and the clock when they arrived.
        self._open_streams: dict[int, tuple[MethodStats, float] | None] = {}
        self._metrics = metrics
        #: The clock at the last read.
        self._arrived = 0.0
        #: The service, method, target and counters of the last request (most repeat it):
        #: comparing names costs less than hashing the new ones. None never equals a name.
        self._last: tuple[str | None, str | None, object, MethodStats | None]
        self._last = (None, None, None, None)

    @property
    def open_streams(self) -> int:
        """Requests received and not yet answered."""
        return len(self._open_streams)

    def receive_data(self, data: bytes) -> None:
        metrics = self._metrics
        if metrics is not None:
            self._arrived = _clock()
            metrics.reads += 1
            metrics.bytes_in += len(data)
            # The latencies of the method this connection called last are folded (by the
            # batch) here, and any other's when a connection turns from it in next_event:
            # a method's answers since its last fold are at most its calls in flight.
            # (_fold_full written out: a call on every read costs more than the check.)
            last = self._last[3]
            if last is not None and len(last.latencies) >= FOLD_AT:
                last.fold()
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
        if isinstance(frame, OversizedFrame):
            return self._bad(
                stream_id,
                StatusCode.RESOURCE_EXHAUSTED,
                f"message of {frame.length} bytes exceeds the limit of "
                f"{self._decoder.max_message_size} bytes",
            )
        try:
            service, method, payload, timeout_nano, metadata = decode_request(frame.body)
        except EnvelopeError as exc:
            return self._bad(stream_id, StatusCode.INVALID_ARGUMENT, f"undecodable request: {exc}")
        last_service, last_method, target, stats = self._last
        if method != last_method or service != last_service:
            target, stats = self._resolve(service, method, stats)
        self._open_streams[stream_id] = None if stats is None else (stats, self._arrived)
        return RequestReceived(stream_id, service, method, payload, timeout_nano, metadata, target)

    def _resolve(
        self, service: str, method: str, last: MethodStats | None
    ) -> tuple[object, MethodStats | None]:
        """The target and counters of a request naming another method than the last."""
        key = (service, method)
        target = self._methods.get(key)
        stats = None
        metrics = self._metrics
        if metrics is not None:
            _fold_full(last)  # (see receive_data)
            stats = metrics.methods.get(key, metrics.other)
        self._last = (service, method, target, stats)
        return target, stats

    def _bad(self, stream_id: int, code: StatusCode, message: str) -> BadRequest:
        """A request that cannot be dispatched (counted under no method)."""
        metrics = self._metrics
        if metrics is None:
            self._open_streams[stream_id] = None
        else:
            _fold_full(metrics.other)
            self._open_streams[stream_id] = (metrics.other, self._arrived)
        return BadRequest(stream_id, code, message)

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
            metered = self._open_streams.pop(stream_id)
        except KeyError:
            raise LocalProtocolError(f"no request in flight on stream {stream_id}") from None
        if code == 0:
            parts = response_parts(payload)
            size = sum(map(len, parts))
            limit = self._decoder.max_message_size
            if size <= limit:
                data = join_frame(stream_id, FrameType.RESPONSE, parts)
                if metered is None:  # (the unmetered answer leaves first: most do)
                    return data
            else:
                code, payload, details = StatusCode.RESOURCE_EXHAUSTED, b"", ()
                message = f"response of {size} bytes exceeds the limit of {limit} bytes"
        if code:
            body = encode_error_response(code, message, details, payload)
            data = encode_frame(stream_id, FrameType.RESPONSE, body)
            if metered is None:
                return data
        assert metered is not None
        stats, start = metered
        stats.latencies.append(_clock() - start)  # (see receive_data for the fold)
        if code:
            assert self._metrics is not None
            self._metrics.failed(stats, code, message)
        return data


def _fold_full(stats: MethodStats | None) -> None:
    """Fold *stats*' latencies when ``FOLD_AT`` wait."""
    if stats is not None and len(stats.latencies) >= FOLD_AT:
        stats.fold()


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
