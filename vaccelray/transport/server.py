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
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import resource
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ssl import SSLContext
from typing import Final, cast

import anyio
import anyio.abc

from vaccelray.errors import Reason, RemoteProtocolError, RPCError, StatusCode
from vaccelray.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    BadRequest,
    RequestReceived,
    ServerConnection,
)
from vaccelray.transport.endpoints import (
    Endpoint,
    ReadBuffer,
    bind,
    parse_endpoint,
    tune_socket,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "CallContext",
    "Method",
    "Server",
    "Service",
    "default_max_connections",
    "serve",
]

log = logging.getLogger("vaccelray.server")

Metadata = tuple[tuple[str, str], ...]
InlineHandler = Callable[[bytes, "CallContext"], bytes]
AsyncHandler = Callable[[bytes, "CallContext"], Awaitable[bytes]]
FutureHandler = Callable[[bytes, "CallContext"], "asyncio.Future[bytes]"]


@dataclass(frozen=True, slots=True)
class Method:
    """A handler for one method.

    ``inline``: a plain function run on the loop (it must not block) returning the answer.
    ``future``: a plain function run on the loop returning an ``asyncio.Future[bytes]``
    (raising RPCError answers at once); the server answers with its result or
    exception, and cancels it at the deadline, on disconnect and on shutdown.
    Otherwise: an ``async`` function, run as a task.
    """

    handler: InlineHandler | AsyncHandler | FutureHandler
    inline: bool = False
    future: bool = False


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    methods: Mapping[str, Method]


@dataclass(slots=True)  # not frozen: one is built per call, and frozen init costs 5 setattrs
class CallContext:
    """What a handler knows about its call."""

    service: str
    method: str
    metadata: Metadata
    #: Absolute deadline on the event loop's clock (``anyio.current_time()``), or None.
    deadline: float | None
    peer: str
    #: Identifies the client connection (unique per server); see ``serve(on_disconnect=)``.
    connection_id: int = 0

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
        return self.deadline - anyio.current_time()


_NS: Final = 1e-9
#: The answer to a call that arrives while the server stops: it never reached a handler.
_NOT_DISPATCHED: Final = RPCError(
    StatusCode.UNAVAILABLE, "server is shutting down", reason=Reason.NOT_DISPATCHED
)

#: Seconds a frame may take to arrive whole once its first byte has.
DEFAULT_FRAME_TIMEOUT: Final = 30.0
#: Seconds a connection that holds nothing may stay silent.
DEFAULT_IDLE_TIMEOUT: Final = 300.0
#: Descriptors kept for the daemon's own files: a tenth of the limit, and at least this.
_FD_RESERVE: Final = 32
#: Seconds between two log lines about the same kind of dropped connection.
_LOG_INTERVAL: Final = 10.0
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


class _Throttle:
    """Lets one log line of a kind through per ``_LOG_INTERVAL``, counting those held back."""

    __slots__ = ("held", "next")

    def __init__(self) -> None:
        self.next = float("-inf")
        self.held = 0

    def __call__(self, now: float) -> str | None:
        """The suffix of the line to log now, or None to hold it back."""
        if now < self.next:
            self.held += 1
            return None
        held, self.held, self.next = self.held, 0, now + _LOG_INTERVAL
        return f" ({held} more since the last report)" if held else ""


class _FutureCall:
    """A *future* handler's call in flight: why it was cancelled, if it was."""

    __slots__ = ("event", "future", "reason", "timer")

    def __init__(self, event: RequestReceived, future: asyncio.Future[bytes]) -> None:
        self.event = event
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        #: The status to answer when the future ends cancelled (None: CANCELLED).
        self.reason: tuple[StatusCode, str] | None = None

    def cancel(self, code: StatusCode, message: str) -> None:
        if self.reason is None:
            self.reason = (code, message)
        self.future.cancel()


class _Connection(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.proto = ServerConnection(server.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.scopes: set[anyio.CancelScope] = set()
        self.calls: set[_FutureCall] = set()
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
        #: Reading paused because the client does not read its answers.
        self.paused = False

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
        peer = transport.get_extra_info("peername")
        self.peer = (
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "local"
        )
        server = self.server
        now = self.loop.time()
        server._connections.add(self)
        self.last_active = now
        if server.idle_timeout > 0:
            self.idle_timer = self.loop.call_at(now + server.idle_timeout, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server._connections.discard(self)
        for timer in (self.frame_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        self.frame_timer = self.idle_timer = None
        if self.server.on_disconnect is not None:
            self.server.on_disconnect(self.id)
        for scope in self.scopes:
            scope.cancel()
        for call in list(self.calls):
            call.cancel(StatusCode.CANCELLED, "the client disconnected")

    def cancel_calls(self, code: StatusCode, why: str) -> None:
        """Cancel every call in flight on this connection, answering *code* ("<method> *why*")."""
        for scope in self.scopes:
            scope.cancel()
        for call in list(self.calls):
            call.cancel(code, f"{call.event.method} {why}")

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
        suffix = server._stalls(now)
        if suffix is not None:
            log.warning(
                "Closing connection from %s: a frame it began %.1f s ago is still "
                "incomplete (limit %g s)%s",
                self.peer,
                now - start,
                server.frame_timeout,
                suffix,
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
        suffix = server._idles(now)
        if suffix is not None:
            log.info(
                "Closing idle connection %d from %s: silent for %g s, holding nothing%s",
                self.id,
                self.peer,
                server.idle_timeout,
                suffix,
            )
        self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reads.view

    def buffer_updated(self, nbytes: int) -> None:
        proto = self.proto
        proto.receive_data(self.reads.take(nbytes))
        out: list[bytes] = []
        server = self.server
        self.last_active = now = self.loop.time()
        progressed = False
        while True:
            try:
                event = proto.next_event()
            except RemoteProtocolError as exc:
                log.warning("Closing connection from %s: %s", self.peer, exc)
                self._write(out)
                if self.transport is not None:
                    self.transport.close()
                return
            if event is NEED_DATA:
                break
            progressed = True
            if isinstance(event, BadRequest):
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
            method = server._methods.get((event.service, event.method))
            if method is None:
                out.append(self._unknown(event))
            elif method.inline:
                out.append(self._run_inline(method, event))
            elif server._draining:
                out.append(self._shutting_down(event))
            elif method.future:
                answer = self._start_future(method, event)
                if answer is not None:
                    out.append(answer)
            elif server._task_group is None:
                out.append(self._shutting_down(event))
            else:
                server._inflight += 1
                server._task_group.start_soon(self._run_async, method, event)
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
            event.service, event.method, event.metadata, deadline, self.peer, self.id
        )

    def _unknown(self, event: RequestReceived) -> bytes:
        if event.service in self.server._service_names:
            message = f"method {event.method} not found in service {event.service}"
        else:
            message = f"service {event.service} not found"
        return self.proto.send_response(
            event.stream_id, code=StatusCode.UNIMPLEMENTED, message=message
        )

    def _run_inline(self, method: Method, event: RequestReceived) -> bytes:
        try:
            payload = method.handler(event.payload, self._context(event))
        except RPCError as exc:
            return self._error(event.stream_id, exc)
        except Exception as exc:
            return self._internal(event, exc)
        assert isinstance(payload, bytes)
        return self.proto.send_response(event.stream_id, payload)

    def _shutting_down(self, event: RequestReceived) -> bytes:
        return self._error(event.stream_id, _NOT_DISPATCHED)

    def _start_future(self, method: Method, event: RequestReceived) -> bytes | None:
        """Start a *future* handler; the answer when it failed at once, else None."""
        ctx = self._context(event)
        try:
            future = method.handler(event.payload, ctx)
        except RPCError as exc:
            return self._error(event.stream_id, exc)
        except Exception as exc:
            return self._internal(event, exc)
        assert isinstance(future, asyncio.Future)
        call = _FutureCall(event, future)
        if ctx.deadline is not None:
            call.timer = self.loop.call_at(
                ctx.deadline,
                call.cancel,
                StatusCode.DEADLINE_EXCEEDED,
                f"{event.method} exceeded its deadline",
            )
        self.calls.add(call)
        self.server._inflight += 1
        future.add_done_callback(lambda _: self._future_done(call))
        return None

    def _future_done(self, call: _FutureCall) -> None:
        self.calls.discard(call)
        self.last_active = self.loop.time()
        if call.timer is not None:
            call.timer.cancel()
        try:
            if self.transport is None:
                return
            future, stream_id = call.future, call.event.stream_id
            if future.cancelled():
                code, message = call.reason or (
                    StatusCode.CANCELLED,
                    f"{call.event.method} was cancelled",
                )
                data = self.proto.send_response(stream_id, code=code, message=message)
            else:
                exc = future.exception()
                if exc is None:
                    data = self.proto.send_response(stream_id, future.result())
                elif isinstance(exc, RPCError):
                    data = self._error(stream_id, exc)
                else:
                    data = self._internal(call.event, exc)
            self.transport.write(data)
        finally:
            self.server._call_done()

    async def _run_async(self, method: Method, event: RequestReceived) -> None:
        server = self.server
        ctx = self._context(event)
        scope = anyio.CancelScope(
            deadline=ctx.deadline if ctx.deadline is not None else float("inf")
        )
        self.scopes.add(scope)
        data = None
        try:
            with scope:
                try:
                    result = method.handler(event.payload, ctx)
                    assert not isinstance(result, bytes)
                    data = self.proto.send_response(event.stream_id, await result)
                except RPCError as exc:
                    data = self._error(event.stream_id, exc)
                except Exception as exc:
                    data = self._internal(event, exc)
            if scope.cancelled_caught and self.transport is not None:
                if ctx.deadline is not None and anyio.current_time() >= ctx.deadline:
                    code, message = (
                        StatusCode.DEADLINE_EXCEEDED,
                        f"{event.method} exceeded its deadline",
                    )
                elif server._draining:
                    code, message = (
                        StatusCode.UNAVAILABLE,
                        f"{event.method} stopped: the server is shutting down",
                    )
                else:
                    code, message = StatusCode.CANCELLED, f"{event.method} was cancelled"
                data = self.proto.send_response(event.stream_id, code=code, message=message)
            if data is not None and self.transport is not None:
                self.transport.write(data)
        finally:
            self.scopes.discard(scope)
            self.last_active = self.loop.time()
            server._call_done()

    def _error(self, stream_id: int, exc: RPCError) -> bytes:
        return self.proto.send_response(
            stream_id, code=exc.code, message=exc.message, details=exc.details
        )

    def _internal(self, event: RequestReceived, exc: BaseException) -> bytes:
        log.exception("%s/%s failed", event.service, event.method, exc_info=exc)
        return self.proto.send_response(
            event.stream_id, code=StatusCode.INTERNAL, message=f"{type(exc).__name__}: {exc}"
        )

    def _write(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


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
        suffix = self.server._starved(self.loop.time())
        if suffix is not None:
            log.error(
                "Cannot accept connections: %s; trying again every %g s, "
                "open connections are served meanwhile%s",
                os.strerror(exc.errno or 0),
                ACCEPT_RETRY_DELAY,
                suffix,
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
    ) -> None:
        self.max_message_size = max_message_size
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
        self._refusals = _Throttle()
        self._stalls = _Throttle()
        self._idles = _Throttle()
        self._starved = _Throttle()
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

    async def _listen(self, endpoint: Endpoint, ssl: SSLContext | None = None) -> str:
        sock, bound = bind(endpoint)
        try:
            listener = _Listener(self, sock, ssl)
        except BaseException:
            sock.close()
            raise
        self._listeners.append(listener)
        return str(bound)

    def _refused(self, address: object) -> None:
        suffix = self._refusals(asyncio.get_running_loop().time())
        if suffix is not None:
            peer = (
                f"{address[0]}:{address[1]}"
                if isinstance(address, tuple) and len(address) >= 2
                else "local"
            )
            log.warning(
                "Refusing connection from %s: %d connections open, the limit%s",
                peer,
                len(self._connections) + self._starting,
                suffix,
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
            await loop.connect_accepted_socket(lambda: _Connection(self), sock, ssl=ssl)
        except Exception as exc:  # a TLS handshake that failed, say
            log.debug("Connection closed before it was served: %s", exc)
            sock.close()
        except asyncio.CancelledError:
            sock.close()
            raise
        finally:
            self._starting -= 1

    async def accept_socket(self, sock: socket.socket) -> None:
        """Serve one already connected socket (one end of a ``socketpair``, say)."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: _Connection(self), sock)

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
        for conn in list(self._connections):
            conn.cancel_calls(StatusCode.UNAVAILABLE, "stopped: the server is shutting down")
        # Let cancelled calls send their UNAVAILABLE answers before the connections close.
        with anyio.move_on_after(1.0):
            await self._wait_idle()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()


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
) -> AsyncIterator[Server]:
    """Serve *services* on *endpoints* until the block exits (then shut down gracefully).

    With *ssl*, every listener speaks TLS. *on_disconnect* is called with a
    connection's ``CallContext.connection_id`` when that client connection closes.
    *max_connections*, *frame_timeout*, *idle_timeout* and *holds_state* limit
    what a client may hold (see :class:`Server`; 0 disables a limit).
    """
    server = Server(
        services,
        max_message_size=max_message_size,
        on_disconnect=on_disconnect,
        max_connections=max_connections,
        frame_timeout=frame_timeout,
        idle_timeout=idle_timeout,
        holds_state=holds_state,
    )
    try:
        async with anyio.create_task_group() as tg:
            server._task_group = tg
            try:
                for endpoint in endpoints:
                    address = await server._listen(parse_endpoint(endpoint), ssl)
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
