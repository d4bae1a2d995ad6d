"""The ttrpc server: listeners, dispatch to handlers, status codes, shutdown.

Each connection is an asyncio protocol around a sans-IO
:class:`~vaccelray.protocol.ServerConnection`. ``buffer_updated`` decodes every
whole request in the chunk; *inline* handlers (non-blocking code such as the
noop backend) answer right there and all their responses leave in one write,
with no task or thread hop. *future* handlers also run right there but return
an ``asyncio.Future`` the server answers from when it completes: no task, no
cancel scope, for the hot path of work handed to another process. Other
handlers run as tasks of the server's task group, each in its own cancel scope.
Either way the request's ``timeout_nano`` is a deadline (answered with
DEADLINE_EXCEEDED), and a client that disconnects has its calls cancelled.

Structure (task groups, cancel scopes, deadlines) is anyio; the sockets are
asyncio's, so the server runs on anyio's asyncio backend.

One bad peer must cost the others nothing (see :class:`Server` for the knobs):
an idle connection holds no read buffer (all share one, see ``ReadBuffer``);
connections past a cap are closed as soon as accepted; a frame that started
arriving must complete within ``frame_timeout``; and a connection that sent
nothing for ``idle_timeout`` and holds nothing (no call in flight, no state a
``holds_state`` predicate claims for it, such as vAccel sessions) is closed.
When the process runs out of descriptors, asyncio's accept loop pauses
accepting for a second and retries, while open connections keep being served.
A connection's calls in flight (not inline ones, answered as they arrive) are
bounded: the one past the bound is answered RESOURCE_EXHAUSTED at once. What a
peer can make the server log (refusals, rejected requests, protocol errors) is
rate-limited. Shutdown answers every call still in flight after the grace
period UNAVAILABLE, even one whose handler runs on in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import logging
import os
import resource
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from math import inf
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import anyio
import anyio.abc

from vaccelray.errors import Reason, RemoteProtocolError, RPCError, StatusCode
from vaccelray.logs import Throttle, request_id_from, request_id_var
from vaccelray.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    BadRequest,
    RequestReceived,
    ServerConnection,
)
from vaccelray.transport.endpoints import (
    SOCKET_MODE,
    Endpoint,
    ReadBuffer,
    bind,
    parse_endpoint,
    tune_socket,
)
from vaccelray.transport.tls_layer import TlsLayer
from vaccelray.transport.writes import WriteBatch, defer

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup
if TYPE_CHECKING:
    from vaccelray.metrics import CallMetrics

__all__ = [
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_INFLIGHT",
    "Answer",
    "CallContext",
    "Link",
    "Method",
    "Origin",
    "Server",
    "Service",
    "Work",
    "default_max_connections",
    "origin_of",
    "serve",
]

log = logging.getLogger("vaccelray.server")

Metadata = tuple[tuple[str, str], ...]
#: What a *callback* handler's work answers: the reply's payload, or the error to answer.
Answer = bytes | BaseException


class Work(Protocol):
    """What a *callback* handler returns: the call's work, which the server starts."""

    def start(self, done: Callable[[Answer], None]) -> None:
        """Begin; call *done* once, on the loop, with the answer (raising answers too)."""

    def cancel(self) -> object:
        """Stop: the server gave up the call (it answered it itself)."""


InlineHandler = Callable[[bytes, "CallContext"], bytes]
AsyncHandler = Callable[[bytes, "CallContext"], Awaitable[bytes]]
FutureHandler = Callable[[bytes, "CallContext"], "asyncio.Future[bytes]"]
CallbackHandler = Callable[[bytes, "CallContext"], Work]


@dataclass(frozen=True, slots=True)
class Method:
    """A handler for one method.

    ``inline``: a plain function run on the loop (it must not block) returning the answer.
    ``future``: a plain function run on the loop returning an ``asyncio.Future[bytes]``
    (raising RPCError answers at once); the server answers with its result or
    exception, and cancels it at the deadline, on disconnect and on shutdown.
    ``callback``: the same without a future, for a relay's hot path: a plain
    function run on the loop returning a :class:`Work`, which the server
    starts with a *done* callback; the work calls ``done(answer)`` once, on
    the loop, and the answer leaves from that call (no loop callback between).
    At the deadline, on disconnect and on shutdown the server answers itself
    and cancels the work; a ``done`` after that is ignored.
    Otherwise: an ``async`` function, run as a task.
    """

    handler: InlineHandler | AsyncHandler | FutureHandler | CallbackHandler
    inline: bool = False
    future: bool = False
    callback: bool = False


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    methods: Mapping[str, Method]


@dataclass(frozen=True, slots=True)
class Origin:
    """Who is at the other end of a connection, as the kernel tells it (made once per connection).

    *listener*: the endpoint the connection came in on, as a client would
    spell it (``tcp://127.0.0.1:8194``, ``unix:@name``). *loopback*: the peer
    is on this host for sure (a unix socket, or TCP from a loopback address).
    *uid*, *pid*: the peer's user and process ids on a unix socket (``SO_PEERCRED``,
    when it connected; the pid is 0 when the peer is in a PID namespace this one does
    not see), else None.
    """

    listener: str
    loopback: bool
    uid: int | None = None
    pid: int | None = None


@dataclass(slots=True)
class Link:
    """What one connection has established beyond its socket (one per connection).

    *tls*: it speaks TLS; *peer_cert*: the DER certificate the peer showed
    in the handshake, if any. *member*: the peer proved it holds the cluster
    token on this connection (``vaccelray.membership``, which keeps the
    proof's state between its two calls in *challenge*).
    """

    tls: bool = False
    peer_cert: bytes = b""
    member: bool = False
    challenge: object = None


#: The first byte of every TLS connection (a handshake record). Read as the first byte
#: of a ttrpc frame's length it would announce a body of at least 352 MiB: never valid.
_TLS_HANDSHAKE: Final = 0x16


#: What a connection whose socket cannot be asked is: a remote peer, nothing known.
UNKNOWN_ORIGIN: Final = Origin("?", loopback=False)


def origin_of(sock: Any) -> Origin:
    """The :class:`Origin` of an accepted connection's socket (asyncio's wrapper of it)."""
    if sock is None:
        return UNKNOWN_ORIGIN
    try:
        local = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
            if isinstance(local, bytes):  # abstract: a leading NUL
                listener = "unix:@" + local[1:].decode(errors="replace")
            else:
                listener = "unix://" + local
            return Origin(listener, loopback=True, uid=uid, pid=pid)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            peer = sock.getpeername()
            host = local[0]
            listener = f"tcp://[{host}]:{local[1]}" if ":" in host else f"tcp://{host}:{local[1]}"
            return Origin(listener, loopback=_loopback_ip(peer[0]))
        return Origin(f"vsock://{local[0]}:{local[1]}", loopback=False)
    except (OSError, ValueError, IndexError, struct.error):
        return UNKNOWN_ORIGIN


def _loopback_ip(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass(slots=True)  # not frozen: one is built per call, and frozen init costs 5 setattrs
class CallContext:
    """What a handler knows about its call."""

    service: str
    method: str
    metadata: Metadata
    #: Absolute deadline on the event loop's clock (``loop.time()``), or None.
    deadline: float | None
    peer: str
    #: Identifies the client connection (unique per server); see ``serve(on_disconnect=)``.
    connection_id: int = 0
    #: Where the connection came in and who is at its other end (see :class:`Origin`).
    origin: Origin = UNKNOWN_ORIGIN
    #: What the connection established: TLS, membership (see :class:`Link`).
    link: Link | None = None

    def get_metadata(self, key: str) -> str | None:
        """The last value sent for *key*, or None."""
        found = None
        for k, v in self.metadata:
            if k == key:
                found = v
        return found

    def time_left(self) -> float | None:
        if self.deadline is None:
            return None
        # The loop's own clock: anyio.current_time() is the same, at several calls' cost.
        return self.deadline - asyncio.get_running_loop().time()


_NS: Final = 1e-9
#: The answer to a call that arrives while the server stops: it never reached a handler.
_NOT_DISPATCHED: Final = RPCError(
    StatusCode.UNAVAILABLE, "server is shutting down", reason=Reason.NOT_DISPATCHED
)
#: The details of the answer to a call stopped by shutdown (it may have had effects).
_SHUTTING_DOWN: Final = RPCError(StatusCode.UNAVAILABLE, reason=Reason.SHUTTING_DOWN).details

#: Seconds a frame may take to arrive whole once its first byte has.
DEFAULT_FRAME_TIMEOUT: Final = 30.0
#: Seconds a connection that holds nothing may stay silent.
DEFAULT_IDLE_TIMEOUT: Final = 300.0
#: Descriptors kept for the daemon's own files: a tenth of the limit, and at least this.
_FD_RESERVE: Final = 32
#: Calls of one connection in flight at once (inline calls do not count).
DEFAULT_MAX_INFLIGHT: Final = 256
#: Bytes of answers to the requests of one read written before the next is handled: a
#: client that does not read its answers stops the handling (not only the reading) at once.
_WRITE_AT: Final = 64 << 10
#: Seconds accepting pauses when the process is out of descriptors (or memory).
ACCEPT_RETRY_DELAY: Final = 1.0
#: Connections accepted per wake-up of a listener (as asyncio's accept loop).
_ACCEPTS_PER_WAKEUP: Final = 100
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def default_max_connections() -> int:
    """Connections a server accepts by default: the soft ``RLIMIT_NOFILE`` less a reserve.

    The reserve (a tenth of the limit, at least 32 descriptors) is for the
    daemon's own files: listeners, model files, pipes to its task processes.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - max(_FD_RESERVE, soft // 10))


class _LoopCall:
    """A *future* or *callback* handler's call in flight; :meth:`done` ends it, once."""

    __slots__ = ("answered", "conn", "deadline", "ended", "event", "work")

    def __init__(self, conn: _Connection, event: RequestReceived) -> None:
        self.conn = conn
        self.event = event
        #: The future, or the callback handler's work.
        self.work: Work | None = None
        #: Loop time of the call's deadline, if it has one (see _Connection.deadline_due).
        self.deadline: float | None = None
        #: Answered already (on shutdown): what the handler returns later is dropped.
        self.answered = False
        self.ended = False

    def done(self, answer: Answer) -> None:
        """Answer the call (unless it ended already): the handler's *done*."""
        if not self.ended:
            self.ended = True
            self.conn._call_ended(self, answer)

    def future_done(self, future: asyncio.Future[bytes]) -> None:
        """The future's done callback: answer with what it holds."""
        if future.cancelled():  # by the handler's own code (the server ends the call first)
            self.done(RPCError(StatusCode.CANCELLED, f"{self.event.method} was cancelled"))
            return
        exc = future.exception()
        self.done(future.result() if exc is None else exc)

    def cancel(self, code: StatusCode, message: str) -> None:
        """Answer *code*, *message* now (deadline, disconnect) and cancel the work."""
        if not self.ended:
            self.ended = True
            if self.work is not None:
                self.work.cancel()
            self.conn._call_ended(self, RPCError(code, message))

    def stop(self) -> None:
        """Cancel the work: ``stop_calls`` answered already."""
        self.cancel(StatusCode.UNAVAILABLE, "the server is shutting down")


class _TaskCall:
    """An ``async`` handler's call in flight: its task's cancel scope."""

    __slots__ = ("answered", "event", "scope")

    def __init__(self, event: RequestReceived, scope: anyio.CancelScope) -> None:
        self.event = event
        self.scope = scope
        #: Answered already (on shutdown): what the handler returns later is dropped.
        self.answered = False

    def stop(self) -> None:
        self.scope.cancel()


class _Connection(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(
        self, server: Server, origin: Origin | None = None, tls: SSLContext | None = None
    ) -> None:
        self.server = server
        #: The TLS context, until the first read says whether the client speaks TLS.
        self.sniff = tls
        #: Who the peer is, when the caller says so (else the socket is asked).
        self.given_origin = origin
        #: Counts the bytes of the answers written (the connection counts the rest).
        self.metrics = metrics = server.metrics
        self.proto = ServerConnection(server.max_message_size, metrics, server._methods)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.origin = UNKNOWN_ORIGIN
        #: Made when the connection turns out to speak TLS (plaintext ones hold none).
        self.link: Link | None = None
        #: Calls in flight off the loop's turn (inline ones finish within it).
        self.tasks: set[_TaskCall] = set()
        self.calls: set[_LoopCall] = set()
        # Shared by every connection of the server: an idle connection holds no buffer.
        self.reads = server._reads
        # The decoder says whether a frame is part way in (the frame-progress timeout).
        self.decoder = self.proto._decoder
        self.id = next(server._connection_ids)
        self.loop = asyncio.get_running_loop()
        #: Loop time of the last bytes received or call answered (the idle timeout).
        self.last_active = 0.0
        #: Loop time the frame now part way in began (or a frame completed after it); None.
        self.frame_start: float | None = None
        self.frame_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        #: One timer for the deadlines of every future and callback call of the
        #: connection, due at the earliest (a timer per call would cost one each).
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.deadline_at = inf
        #: Reading paused because the client does not read its answers.
        self.paused = False
        #: Answers held back until the end of the loop turn (see _answer).
        self.held: list[bytes] | None = None

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
        self.origin = self.given_origin or origin_of(sock)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            self.link = Link(tls=True, peer_cert=tls.getpeercert(binary_form=True) or b"")
        peer = transport.get_extra_info("peername")
        self.peer = (
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "local"
        )
        server = self.server
        now = self.loop.time()
        server._connections.add(self)
        self.last_active = now
        if self.idle_timer is not None:  # made again, over TLS
            self.idle_timer.cancel()
        if server.idle_timeout > 0:
            self.idle_timer = self.loop.call_at(now + server.idle_timeout, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server._connections.discard(self)
        for timer in (self.frame_timer, self.idle_timer, self.deadline_timer):
            if timer is not None:
                timer.cancel()
        self.frame_timer = self.idle_timer = self.deadline_timer = None
        if self.server.on_disconnect is not None:
            self.server.on_disconnect(self.id)
        for task in self.tasks:
            task.stop()
        for call in list(self.calls):
            call.cancel(StatusCode.CANCELLED, "the client disconnected")

    def stop_calls(self) -> None:
        """Answer every call in flight UNAVAILABLE (shutting down) now, then cancel it.

        The answers leave at once, whether or not the handlers end: one
        running in a thread (a blocking backend) cannot be interrupted, and
        what it returns later is dropped.
        """
        out: list[bytes] = []
        calls: list[_TaskCall | _LoopCall] = [*self.tasks, *self.calls]
        for call in calls:
            call.answered = True
            out.append(
                self.proto.send_response(
                    call.event.stream_id,
                    code=StatusCode.UNAVAILABLE,
                    message=f"{call.event.method} stopped: the server is shutting down",
                    details=_SHUTTING_DOWN,
                )
            )
            call.stop()
        self._write(out)

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        if self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
            if self.frame_start is not None:
                # The frame could not progress while we did not read: its clock restarts.
                self._frame_begun(self.loop.time())
            self._handle_requests()  # those received before the pause

    # -- hostile clients ----------------------------------------------------

    def _frame_begun(self, now: float) -> None:
        self.frame_start = now
        timeout = self.server.frame_timeout
        if self.frame_timer is None and timeout > 0:
            self.frame_timer = self.loop.call_at(now + timeout, self._frame_check)

    def _frame_check(self) -> None:
        """The frame-progress timer: close a connection whose frame is overdue."""
        self.frame_timer = None
        start = self.frame_start
        if start is None or self.transport is None or self.paused:
            return  # done, closed, or not ours to wait for (resume_writing re-arms)
        server = self.server
        now = self.loop.time()
        due = start + server.frame_timeout
        if now < due:
            self.frame_timer = self.loop.call_at(due, self._frame_check)
            return
        if server._stalls(now):
            log.warning(
                "Closing connection from %s: a frame it began %.1f s ago is still "
                "incomplete (limit %g s)",
                self.peer,
                now - start,
                server.frame_timeout,
            )
        self.transport.abort()

    def holds_something(self) -> bool:
        """A call in flight, a frame part way in, or state the server's predicate claims."""
        if self.proto.open_streams or self.frame_start is not None:
            return True
        holds_state = self.server.holds_state
        return holds_state is not None and holds_state(self.id)

    def _idle_check(self) -> None:
        """The idle timer: close a silent connection that holds nothing."""
        self.idle_timer = None
        if self.transport is None:
            return
        server = self.server
        now = self.loop.time()
        due = self.last_active + server.idle_timeout
        if now < due:
            self.idle_timer = self.loop.call_at(due, self._idle_check)
            return
        if self.holds_something():
            self.idle_timer = self.loop.call_at(now + server.idle_timeout, self._idle_check)
            return
        if server._idles(now):
            log.info(
                "Closing idle connection %d from %s: silent for %g s, holding nothing",
                self.id,
                self.peer,
                server.idle_timeout,
            )
        self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reads.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.sniff is not None:
            tls, self.sniff = self.sniff, None
            if self.reads.view[0] == _TLS_HANDSHAKE:
                self._start_tls(tls, nbytes)
                return
        self.proto.receive_data(self.reads.take(nbytes))
        with WriteBatch():  # a call answered as it starts leaves with this read's answers
            self._handle_requests()

    def _start_tls(self, context: SSLContext, nbytes: int) -> None:
        """The client opened with a TLS handshake: put a TLS layer under this connection.

        The layer takes the socket's transport and the bytes read so far, and
        makes this connection again once the handshake is done (so it sees
        the peer's certificate); until then it is an idle connection holding
        nothing, and the handshake must end within ``frame_timeout``.
        """
        raw = self.transport
        assert raw is not None
        layer = TlsLayer(context, self, self.reads.view, timeout=self.server.frame_timeout)
        raw.set_protocol(layer)
        layer.adopt(raw)
        layer.buffer_updated(nbytes)

    def _handle_requests(self) -> None:
        """Answer the requests received, until the client stops reading the answers.

        Small requests can ask for large answers (a Genop declaring its output
        size): the answers are written as they add up, and once the transport
        says the client's answers back up, the rest waits in the decoder until
        ``resume_writing``, so one read never makes more than a few answers.
        """
        proto = self.proto
        out: list[bytes] = []
        pending = 0
        server = self.server
        self.last_active = now = self.loop.time()
        limit = server.max_inflight_per_connection
        progressed = False
        while not self.paused:
            answered = len(out)
            try:
                event = proto.next_event()
            except RemoteProtocolError as exc:
                if server._broken(now):
                    log.warning("Closing connection from %s: %s", self.peer, exc)
                self._write(out)
                if self.transport is not None:
                    self.transport.close()
                return
            if event is NEED_DATA:
                break
            progressed = True
            if isinstance(event, BadRequest):
                if server._rejects(now):
                    log.info(
                        "Rejected request on stream %d from %s: %s",
                        event.stream_id,
                        self.peer,
                        event.message,
                    )
                out.append(
                    proto.send_response(event.stream_id, code=event.code, message=event.message)
                )
                continue
            assert isinstance(event, RequestReceived)
            method: Method | None = event.target  # type: ignore[assignment]  # server._methods
            if method is None:
                out.append(self._unknown(event, now))
            elif method.inline:
                out.append(self._run_inline(method, event))
            elif server._draining:
                out.append(self._shutting_down(event))
            elif limit and proto.open_streams > limit:
                # open_streams counts this request too: *limit* others are in flight.
                out.append(self._too_many(event, limit, now))
            elif method.future or method.callback:
                answer = self._start_future(method, event)
                if answer is not None:
                    out.append(answer)
            elif server._task_group is None:
                out.append(self._shutting_down(event))
            else:
                server._inflight += 1
                server._task_group.start_soon(self._run_async, method, event)
            if len(out) > answered:
                pending += len(out[-1])
                if pending >= _WRITE_AT:  # may pause writing, which ends the loop
                    self._write(out)
                    out, pending = [], 0
        self._write(out)
        if self.decoder.in_frame:
            if progressed or self.frame_start is None:
                self._frame_begun(now)
        elif self.frame_start is not None:
            self.frame_start = None

    # -- dispatch -----------------------------------------------------------

    def _context(self, event: RequestReceived) -> CallContext:
        deadline = None
        if event.timeout_nano > 0:
            # the loop's clock is anyio's on asyncio, read without a backend lookup
            deadline = self.loop.time() + event.timeout_nano * _NS
        return CallContext(
            event.service,
            event.method,
            event.metadata,
            deadline,
            self.peer,
            self.id,
            self.origin,
            self.link,
        )

    def _unknown(self, event: RequestReceived, now: float) -> bytes:
        if event.service in self.server._service_names:
            message = f"method {event.method} not found in service {event.service}"
        else:
            message = f"service {event.service} not found"
        if self.server._unknowns(now):
            log.info("Unknown method %s/%s from %s", event.service, event.method, self.peer)
        return self.proto.send_response(
            event.stream_id, code=StatusCode.UNIMPLEMENTED, message=message
        )

    def _too_many(self, event: RequestReceived, limit: int, now: float) -> bytes:
        if self.server._busy(now):
            log.warning(
                "Refused %s/%s from %s: %d calls in flight on its connection, the limit",
                event.service,
                event.method,
                self.peer,
                limit,
            )
        return self.proto.send_response(
            event.stream_id,
            code=StatusCode.RESOURCE_EXHAUSTED,
            message=f"{event.method} refused: {limit} calls already in flight on this "
            "connection, the limit (raise it with --max-inflight)",
        )

    def _run_inline(self, method: Method, event: RequestReceived) -> bytes:
        traced = request_id_var.set(request_id_from(event.metadata))
        try:
            payload = method.handler(event.payload, self._context(event))
        except RPCError as exc:
            return self._error(event.stream_id, exc)
        except Exception as exc:
            return self._internal(event, exc)
        finally:
            request_id_var.reset(traced)
        assert isinstance(payload, bytes)
        return self.proto.send_response(event.stream_id, payload)

    def _shutting_down(self, event: RequestReceived) -> bytes:
        return self._error(event.stream_id, _NOT_DISPATCHED)

    def _start_future(self, method: Method, event: RequestReceived) -> bytes | None:
        """Start a *future* or *callback* handler; the answer when it failed at once, else None.

        What the handler starts (callbacks, threads) keeps the call's request id.
        """
        traced = request_id_var.set(request_id_from(event.metadata))
        try:
            return self._start_traced_future(method, event)
        finally:
            request_id_var.reset(traced)

    def _start_traced_future(self, method: Method, event: RequestReceived) -> bytes | None:
        ctx = self._context(event)
        call = _LoopCall(self, event)
        try:
            work = method.handler(event.payload, ctx)
            if not method.callback:
                assert isinstance(work, asyncio.Future)
                work.add_done_callback(call.future_done)
        except RPCError as exc:
            return self._error(event.stream_id, exc)
        except Exception as exc:
            return self._internal(event, exc)
        call.work = cast(Work, work)
        self.calls.add(call)
        self.server._inflight += 1
        if method.callback:
            try:
                call.work.start(call.done)
            except Exception as exc:  # answered as the handler's own raise would be
                call.done(exc)
            if call.ended:
                return None
        deadline = ctx.deadline
        if deadline is not None:
            call.deadline = deadline
            if deadline < self.deadline_at:
                self._deadline_timer(deadline)
        return None

    def _deadline_timer(self, when: float) -> None:
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
        self.deadline_at = when
        self.deadline_timer = self.loop.call_at(when, self.deadline_due)

    def deadline_due(self) -> None:
        """The deadline timer: end the calls whose deadline passed, wait for the next one.

        It is due at the earliest deadline it was armed for; calls that ended
        meanwhile are simply gone from ``calls``, and none is checked before
        its time (so a burst of calls costs no timer each, only a comparison).
        """
        self.deadline_timer = None
        self.deadline_at = inf
        now = self.loop.time()
        following = inf
        for call in list(self.calls):
            deadline = call.deadline
            if deadline is None:
                continue
            if deadline <= now:
                call.cancel(
                    StatusCode.DEADLINE_EXCEEDED, f"{call.event.method} exceeded its deadline"
                )
            elif deadline < following:
                following = deadline
        if following < inf and self.transport is not None:
            self._deadline_timer(following)

    def _call_ended(self, call: _LoopCall, answer: Answer) -> None:
        self.calls.discard(call)
        self.last_active = self.loop.time()
        try:
            if self.transport is None or call.answered:
                return
            stream_id = call.event.stream_id
            if isinstance(answer, bytes):
                data = self.proto.send_response(stream_id, answer)
            elif isinstance(answer, RPCError):
                data = self._error(stream_id, answer)
            else:
                data = self._internal(call.event, answer)
            self._answer(data)
        finally:
            self.server._call_done()

    async def _run_async(self, method: Method, event: RequestReceived) -> None:
        ctx = self._context(event)
        request_id_var.set(request_id_from(event.metadata))  # this task's own context
        call = _TaskCall(
            event, anyio.CancelScope(deadline=inf if ctx.deadline is None else ctx.deadline)
        )
        self.tasks.add(call)
        payload: bytes  # set when the handler returns (else failure or cancelled_caught is)
        failure: Exception | None = None
        try:
            with call.scope:
                try:
                    payload = await cast(Awaitable[bytes], method.handler(event.payload, ctx))
                except Exception as exc:
                    failure = exc
            if call.answered:  # on shutdown, while the handler ran on
                if failure is not None and not isinstance(failure, RPCError):
                    log.error("%s/%s failed", event.service, event.method, exc_info=failure)
                return
            if call.scope.cancelled_caught:
                if ctx.deadline is not None and self.loop.time() >= ctx.deadline:
                    code, message = (
                        StatusCode.DEADLINE_EXCEEDED,
                        f"{event.method} exceeded its deadline",
                    )
                else:
                    code, message = StatusCode.CANCELLED, f"{event.method} was cancelled"
                data = self.proto.send_response(event.stream_id, code=code, message=message)
            elif isinstance(failure, RPCError):
                data = self._error(event.stream_id, failure)
            elif failure is not None:
                data = self._internal(event, failure)
            else:
                data = self.proto.send_response(event.stream_id, payload)
            self._answer(data)
        finally:
            self.tasks.discard(call)
            self.last_active = self.loop.time()
            self.server._call_done()

    def _error(self, stream_id: int, exc: RPCError) -> bytes:
        return self.proto.send_response(
            stream_id, code=exc.code, message=exc.message, details=exc.details
        )

    def _internal(self, event: RequestReceived, exc: BaseException) -> bytes:
        """INTERNAL, naming the request: its id finds the traceback in this daemon's log."""
        log.exception("%s/%s failed", event.service, event.method, exc_info=exc)
        request_id = request_id_var.get() or request_id_from(event.metadata)
        return self.proto.send_response(
            event.stream_id,
            code=StatusCode.INTERNAL,
            message=f"{type(exc).__name__}: {exc} (request {request_id})",
        )

    def _write(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            data = out[0] if len(out) == 1 else b"".join(out)
            if self.metrics is not None:
                self.metrics.bytes_out += len(data)
            self.transport.write(data)

    def _answer(self, data: bytes) -> None:
        """Write an answer that ends off the read path, with the others that end with it.

        Answers that finish together (a scheduler reading a worker's batch of
        them, say) leave in one write instead of one each: at the end of the
        read that made them (see :mod:`vaccelray.transport.writes`), else at
        the end of the loop turn.
        """
        if self.held is None:
            self.held = [data]
            if not defer(self.flush):
                self.loop.call_soon(self.flush)
        else:
            self.held.append(data)

    def flush(self) -> None:
        """Write the answers held back for the end of the read or of the loop turn."""
        held, self.held = self.held, None
        if held:
            self._write(held)


class _Listener:
    """Accepts connections on one listening socket, for a :class:`Server`.

    Not asyncio's ``loop.create_server``: out of descriptors, its accept loop
    logs a traceback and schedules a retry for every connection waiting in the
    backlog (a hundred a second, measured), and a connection over the cap
    would get a protocol and a transport only to be closed. Here a connection
    over the cap is closed as it is accepted, and running out of descriptors
    pauses accepting (only) for ``ACCEPT_RETRY_DELAY``, logged at most every 10 s.
    """

    def __init__(self, server: Server, sock: socket.socket, ssl: SSLContext | None) -> None:
        self.server = server
        self.sock = sock
        self.ssl = ssl
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.retry: asyncio.TimerHandle | None = None
        self.closed = False
        self.loop.add_reader(self.fd, self._accept)

    def _accept(self) -> None:
        server = self.server
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                else:
                    log.warning("Accepting a connection failed: %s", exc)
                return
            cap = server.max_connections
            if cap and len(server._connections) + server._starting >= cap:
                conn.close()
                server._refused(address)
                continue
            server._start_connection(conn, self.ssl)

    def _pause(self, exc: OSError) -> None:
        self.loop.remove_reader(self.fd)
        self.retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
        if self.server._starved(self.loop.time()):
            log.error(
                "Cannot accept connections: %s; trying again every %g s, "
                "open connections are served meanwhile",
                os.strerror(exc.errno or 0),
                ACCEPT_RETRY_DELAY,
            )

    def _resume(self) -> None:
        self.retry = None
        if not self.closed:
            self.loop.add_reader(self.fd, self._accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.retry is not None:
            self.retry.cancel()
        self.loop.remove_reader(self.fd)
        self.sock.close()


class Server:
    """Serves ttrpc services on one or more endpoints; see :func:`serve`.

    Limits that keep one client from costing the others (each 0 disables it):

    *max_connections*: connections served at once; one more is closed as soon
    as it is accepted (logged, at most once per 10 s). Default (None):
    :func:`default_max_connections`, from the process's descriptor limit.

    *frame_timeout*: seconds a frame may take to arrive whole once its first
    byte has (default 30); then the connection is closed (logged, rate-limited).
    Not counted while the server stops reading because the client does not
    read its answers.

    *idle_timeout*: seconds a connection may stay silent (default 300); then it
    is closed if it holds nothing: no call in flight, no frame part way in, and
    ``holds_state(connection_id)`` is false (a vAccel client's sessions die
    with its connection, so the agent claims the connections that made some).

    *max_inflight_per_connection*: calls of one connection running at once
    (default 256; inline calls, answered as they arrive, never count). One
    more is answered RESOURCE_EXHAUSTED at once, while the others go on.

    Refusals, rejected requests and protocol errors are logged at most once
    per 10 s per kind, then a line counts those not logged.
    """

    def __init__(
        self,
        services: Iterable[Service],
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        on_disconnect: Callable[[int], None] | None = None,
        max_connections: int | None = None,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        holds_state: Callable[[int], bool] | None = None,
        max_inflight_per_connection: int = DEFAULT_MAX_INFLIGHT,
        metrics: CallMetrics | None = None,
    ) -> None:
        self.max_message_size = max_message_size
        #: Counts every call answered (see :mod:`vaccelray.metrics`), when given.
        self.metrics = metrics
        #: Called on the loop with a connection's ``CallContext.connection_id`` when it closes.
        self.on_disconnect = on_disconnect
        self.max_connections = (
            default_max_connections() if max_connections is None else max_connections
        )
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        #: Asked on the loop whether a connection (by id) holds state that dies with it.
        self.holds_state = holds_state
        self._reads = ReadBuffer()
        self.max_inflight_per_connection = max_inflight_per_connection
        # Log lines a peer can cause at will, each kind rate-limited.
        self._refusals = Throttle(logging.WARNING, "connections refused", log)
        self._stalls = Throttle(logging.WARNING, "connections closed for a stalled frame", log)
        self._idles = Throttle(logging.INFO, "idle connections closed", log)
        self._starved = Throttle(logging.ERROR, "failed accepts", log)
        self._broken = Throttle(logging.WARNING, "connections closed for protocol errors", log)
        self._rejects = Throttle(logging.INFO, "rejected requests", log)
        self._unknowns = Throttle(logging.INFO, "calls of unknown methods", log)
        self._busy = Throttle(logging.WARNING, "calls refused for too many in flight", log)
        #: Accepted connections not yet made (a TLS handshake, say), and their tasks.
        self._starting = 0
        self._start_tasks: set[asyncio.Task[None]] = set()
        self._connection_ids = itertools.count(1)
        self._methods: dict[tuple[str, str], Method] = {}
        self._service_names: set[str] = set()
        self._connections: set[_Connection] = set()
        self._listeners: list[_Listener] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._inflight = 0
        #: Set when the calls in flight reach 0; made only while shutdown waits for that.
        self._idle: anyio.Event | None = None
        self._draining = False
        self.addresses: list[str] = []
        for service in services:
            self.add_service(service)

    def add_service(self, service: Service) -> None:
        self._service_names.add(service.name)
        for name, method in service.methods.items():
            self._methods[(service.name, name)] = method
            if self.metrics is not None:
                self.metrics.declare(service.name, name)

    @property
    def inflight(self) -> int:
        """Calls being handled off the loop right now."""
        return self._inflight

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _call_done(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def _wait_idle(self) -> None:
        while self._inflight:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def _listen(
        self, endpoint: Endpoint, ssl: SSLContext | None = None, socket_mode: int = SOCKET_MODE
    ) -> str:
        sock, bound = bind(endpoint, mode=socket_mode)
        try:
            listener = _Listener(self, sock, ssl)
        except BaseException:
            sock.close()
            raise
        self._listeners.append(listener)
        return str(bound)

    def _refused(self, address: object) -> None:
        if self._refusals(asyncio.get_running_loop().time()):
            peer = (
                f"{address[0]}:{address[1]}"
                if isinstance(address, tuple) and len(address) >= 2
                else "local"
            )
            log.warning(
                "Refusing connection from %s: %d connections open, the limit",
                peer,
                len(self._connections) + self._starting,
            )

    def _start_connection(self, sock: socket.socket, ssl: SSLContext | None) -> None:
        sock.setblocking(False)
        self._starting += 1
        task = asyncio.get_running_loop().create_task(self._connect(sock, ssl))
        self._start_tasks.add(task)
        task.add_done_callback(self._start_tasks.discard)

    async def _connect(self, sock: socket.socket, ssl: SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            # Plaintext until the first byte says TLS (see _Connection.buffer_updated).
            await loop.connect_accepted_socket(lambda: _Connection(self, tls=ssl), sock)
        except Exception as exc:
            log.debug("Connection closed before it was served: %s", exc)
            sock.close()
        except asyncio.CancelledError:
            sock.close()
            raise
        finally:
            self._starting -= 1

    async def accept_socket(self, sock: socket.socket, origin: Origin | None = None) -> None:
        """Serve one already connected socket (one end of a ``socketpair``, say).

        *origin* says who the peer is (else the socket is asked, as for any connection).
        """
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: _Connection(self, origin), sock)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, let calls in flight finish within *grace* seconds, close."""
        if self._draining:
            return
        self._draining = True
        for listener in self._listeners:
            listener.close()
        for task in self._start_tasks:
            task.cancel()
        with anyio.move_on_after(grace):
            await self._wait_idle()
        # Every call still in flight is answered now, even one whose thread runs on.
        for conn in list(self._connections):
            conn.stop_calls()
        # Let the cancelled handlers end (a thread cannot be stopped: it may run on).
        with anyio.move_on_after(1.0):
            await self._wait_idle()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.flush()  # answers of this loop turn, before the close
                conn.transport.close()
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        for throttle in self._throttles():
            throttle.flush()

    def _throttles(self) -> tuple[Throttle, ...]:
        return (
            self._refusals,
            self._stalls,
            self._idles,
            self._starved,
            self._broken,
            self._rejects,
            self._unknowns,
            self._busy,
        )


@asynccontextmanager
async def serve(
    services: Iterable[Service],
    endpoints: Sequence[str | Endpoint],
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    grace: float = 5.0,
    ssl: SSLContext | None = None,
    on_disconnect: Callable[[int], None] | None = None,
    max_connections: int | None = None,
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    holds_state: Callable[[int], bool] | None = None,
    max_inflight_per_connection: int = DEFAULT_MAX_INFLIGHT,
    socket_mode: int = SOCKET_MODE,
    metrics: CallMetrics | None = None,
) -> AsyncIterator[Server]:
    """Serve *services* on *endpoints* until the block exits (then shut down gracefully).

    With *ssl*, every listener speaks TLS to clients that open with a TLS
    handshake and plaintext to the others (told apart by the first byte).
    *on_disconnect* is called with a
    connection's ``CallContext.connection_id`` when that client connection closes.
    *max_connections*, *frame_timeout*, *idle_timeout*, *holds_state* and
    *max_inflight_per_connection* limit what a client may hold (see
    :class:`Server`; 0 disables a limit). A unix socket path is made with
    the permissions *socket_mode* (only its owner may connect by default).
    *metrics* counts every call answered (see :mod:`vaccelray.metrics`).
    """
    server = Server(
        services,
        max_message_size=max_message_size,
        on_disconnect=on_disconnect,
        max_connections=max_connections,
        frame_timeout=frame_timeout,
        idle_timeout=idle_timeout,
        holds_state=holds_state,
        max_inflight_per_connection=max_inflight_per_connection,
        metrics=metrics,
    )
    try:
        async with anyio.create_task_group() as tg:
            server._task_group = tg
            try:
                for endpoint in endpoints:
                    address = await server._listen(parse_endpoint(endpoint), ssl, socket_mode)
                    server.addresses.append(address)
                yield server
            finally:
                with anyio.CancelScope(shield=True):
                    await server.shutdown(grace)
    except BaseExceptionGroup as group:
        # Handler tasks catch their own errors, so a lone exception here came
        # from the caller's block or from binding: give it back unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
