"""The ttrpc client: one connection multiplexing concurrent calls.

Every call gets the next odd stream id and a future; the connection's
``buffer_updated`` settles calls as responses arrive, in whatever order
the server finishes them. A call's timeout is enforced here and also sent
to the server as ``timeout_nano`` so it can stop working on it.
:meth:`Client.start_call` is the callback form (no coroutine, no task, no
loop iteration between the response and the callback) for hot paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import Protocol, TypeVar, cast

import anyio

from vaccelray.errors import ConnectError, ProtocolError, RPCError, StatusCode, TransportError
from vaccelray.logs import current_request_id, new_request_id, request_id_var
from vaccelray.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ClientConnection,
    ResponseReceived,
)
from vaccelray.protocol.request_id import REQUEST_ID_KEY, valid_request_id
from vaccelray.protocol.services import Rpc
from vaccelray.transport.endpoints import (
    Endpoint,
    ReadBuffer,
    UnixEndpoint,
    open_connection,
    parse_endpoint,
)

__all__ = [
    "Client",
    "Outcome",
    "PendingCall",
    "Waiter",
    "client_from_socket",
    "connect",
    "open_client",
]

log = logging.getLogger("vaccelray.client")


class _Message(Protocol):
    def SerializeToString(self) -> bytes: ...


_M = TypeVar("_M")
Req = TypeVar("Req")
Rep = TypeVar("Rep")

#: What a call's callback gets: the response payload, or the error.
Outcome = bytes | BaseException


class Waiter(Protocol):
    """What waits for a call's answer (see :meth:`Client.send`)."""

    def finish(self, outcome: Outcome) -> object:
        """The answer's payload or the error; called once, on the loop (it must not raise)."""


class PendingCall:
    """A call sent with :meth:`Client.start_call`; its callback is called exactly once."""

    __slots__ = ("_callback", "_client", "_stream_id", "_timer")

    def __init__(self, client: Client, callback: Callable[[Outcome], object]) -> None:
        self._client = client
        self._stream_id = 0  # set once sent
        self._callback = callback
        self._timer: asyncio.TimerHandle | None = None

    def finish(self, outcome: Outcome) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._callback(outcome)

    def _abandon(self, outcome: Outcome) -> None:
        if self._client.abandon(self._stream_id, self):
            self.finish(outcome)

    def cancel(self) -> None:
        """Abandon the call; its callback gets CancelledError now (unless it ended already)."""
        self._abandon(asyncio.CancelledError())

    def expire(self, call: str, timeout: float) -> None:
        self._abandon(
            RPCError(StatusCode.DEADLINE_EXCEEDED, f"{call} got no answer within {timeout:g} s")
        )


class _ClientProtocol(asyncio.BufferedProtocol):
    def __init__(self, max_message_size: int, coalesce: bool = False) -> None:
        self.proto = ClientConnection(max_message_size)
        #: Made on the loop (asyncio.get_running_loop() per call costs a getpid syscall).
        self.loop = asyncio.get_running_loop()
        #: Hold each request to the end of the loop turn (see :func:`open_client`).
        self.coalesce = coalesce
        self.reads = ReadBuffer()
        self.waiters: dict[int, Waiter] = {}
        self.transport: asyncio.Transport | None = None
        self.error: TransportError | None = None
        #: Requests held back by ``Client.batch()``.
        self.batch: list[bytes] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        #: Set once the transport is closed for good (its socket too).
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reads.view

    def buffer_updated(self, nbytes: int) -> None:
        proto = self.proto
        proto.receive_data(self.reads.take(nbytes))
        while True:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                self._fail(TransportError(f"connection broken by the server: {exc}"))
                if self.transport is not None:
                    self.transport.close()
                return
            if not isinstance(event, ResponseReceived):  # NEED_DATA
                return
            waiter = self.waiters.pop(event.stream_id, None)
            if waiter is not None:
                if event.code != 0:
                    waiter.finish(RPCError(event.code, event.message, event.details))
                else:
                    waiter.finish(event.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self._writable.set()
        reason = f": {exc}" if exc else ""
        self._fail(TransportError(f"connection closed{reason}"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def flush(self) -> None:
        """Write the requests held back, in one write."""
        parts, self.batch = self.batch, None
        if parts and self.transport is not None:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _fail(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            waiter.finish(error)


class Client:
    """A connected ttrpc client; create it with :func:`connect`."""

    def __init__(self, endpoint: Endpoint, protocol: _ClientProtocol) -> None:
        self.endpoint = endpoint
        self._protocol = protocol

    @property
    def is_closed(self) -> bool:
        return self._protocol.transport is None

    @property
    def peer_cert(self) -> bytes | None:
        """On a TLS connection, the server's DER certificate as this end sees it; else None."""
        transport = self._protocol.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if tls is None:
            return None
        return tls.getpeercert(binary_form=True) or b""

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Requests of the calls started in the block leave in one write, at its end."""
        protocol = self._protocol
        if protocol.batch is not None:  # nested: the outer block writes
            yield
            return
        protocol.batch = []
        try:
            yield
        finally:
            protocol.flush()

    def start_call(
        self,
        service: str,
        method: str,
        payload: bytes,
        callback: Callable[[Outcome], object],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        expire: bool = True,
    ) -> PendingCall:
        """Send a call now; *callback* gets the response payload or the error :meth:`call` raises.

        The callback runs on the loop, exactly once, straight from the read
        that brings the answer (it must not raise); ``cancel()`` on the
        returned call abandons it. Flow control is ignored (the request is
        buffered when the server reads slowly; :meth:`call` waits instead).
        With *expire* False the timeout is only sent to the server: the
        caller cancels the call when it passes (a relay whose own deadline
        timer does so saves a timer per call). Raises TransportError when
        the connection is closed.

        The call carries a request id (see :meth:`send`).
        """
        pending = PendingCall(self, callback)
        pending._stream_id = self.send(
            service, method, payload, pending, timeout=timeout, metadata=metadata
        )
        if timeout is not None and expire:
            pending._timer = self._protocol.loop.call_later(
                timeout, pending.expire, f"{service}/{method}", timeout
            )
        return pending

    def send(
        self,
        service: str,
        method: str,
        payload: bytes,
        waiter: Waiter,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> int:
        """:meth:`start_call` at its leanest (for a relay's hot path): no timer, no callback hop.

        ``waiter.finish`` gets what the callback of :meth:`start_call` would;
        :meth:`abandon` with the stream id returned stops the wait. The
        *timeout* is only sent to the server (its deadline); raises RPCError
        when it has passed already, TransportError when the connection is closed.

        The call carries a request id (``vaccelray-request-id``): the current
        one (a handler's, forwarding its call; one the caller set in
        :data:`vaccelray.logs.request_id_var`), else a new one.
        """
        protocol = self._protocol
        transport = protocol.transport
        if transport is None:
            raise protocol.error or TransportError(f"connection to {self.endpoint} is closed")
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise RPCError(StatusCode.DEADLINE_EXCEEDED, f"{method}: no time left for the call")
            timeout_nano = max(1, math.ceil(timeout * 1e9))
        request_id = current_request_id()
        if request_id is None:
            request_id = _sent_request_id(metadata) or new_request_id()
        # Last: the receiver takes the last one (a forwarding handler's own wins).
        metadata = (*metadata, (REQUEST_ID_KEY, request_id))
        if log.isEnabledFor(logging.DEBUG):
            traced = request_id_var.set(request_id)  # the debug line names it
            log.debug("Calling %s/%s on %s", service, method, self.endpoint)
            request_id_var.reset(traced)
        stream_id, data = protocol.proto.send_request(
            service,
            method,
            payload,
            timeout_nano=timeout_nano,
            metadata=metadata,
        )
        protocol.waiters[stream_id] = waiter
        if protocol.batch is not None:
            protocol.batch.append(data)
        elif protocol.coalesce:
            protocol.batch = [data]
            protocol.loop.call_soon(protocol.flush)
        else:
            transport.write(data)
        return stream_id

    def abandon(self, stream_id: int, waiter: Waiter) -> bool:
        """Stop *waiter*'s wait for the answer on *stream_id* (a late answer is dropped).

        False when it waits no more (answered, failed, abandoned already):
        then nothing is done. Its ``finish`` is not called here.
        """
        protocol = self._protocol
        if protocol.waiters.get(stream_id) is not waiter:
            return False
        del protocol.waiters[stream_id]
        protocol.proto.abandon(stream_id)
        return True

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> bytes:
        """Call *service*/*method*; returns the response payload.

        Raises :class:`RPCError` for a non-OK status (DEADLINE_EXCEEDED when
        *timeout* passes) and :class:`TransportError` when the connection fails.
        """
        protocol = self._protocol
        if protocol.transport is not None and not protocol._writable.is_set():
            await protocol._writable.wait()
        future: asyncio.Future[bytes] = protocol.loop.create_future()
        pending = self.start_call(
            service,
            method,
            payload,
            functools.partial(_resolve, future),
            timeout=timeout,
            metadata=metadata,
        )
        try:
            return await future
        finally:
            pending.cancel()  # cancelled while waiting: abandon the call (else a no-op)

    async def call_rpc(
        self,
        rpc: Rpc[Req, Rep],
        request: Req,
        *,
        service: str | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Rep:
        """:meth:`call` of a declared method, its request and reply through the method's codecs.

        *service* picks another of the service's names (the vAccel agent has four).
        """
        payload = await self.call(
            service or rpc.service,
            rpc.method,
            rpc.request.encode(request),
            timeout=timeout,
            metadata=metadata,
        )
        return rpc.reply.decode(payload)

    async def call_message(
        self,
        service: str,
        method: str,
        request: _Message,
        response_type: type[_M],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> _M:
        """:meth:`call` with protobuf messages on both sides."""
        payload = await self.call(
            service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        return response_type.FromString(payload)  # type: ignore[attr-defined,no-any-return]

    def abort(self) -> None:
        """Drop the connection at once, without flushing (for a peer that stopped answering)."""
        transport = self._protocol.transport
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        """Close the connection (requests held by a batch and written bytes go first)."""
        self._protocol.flush()
        transport = self._protocol.transport
        if transport is not None:
            transport.close()

    async def aclose(self, grace: float = 5.0) -> None:
        """Close, and return once the socket is closed.

        A transport closes its socket a loop iteration or more after
        ``close()`` (after a TLS goodbye, several): a caller that stops its
        loop right after would leave the socket open. Past *grace* seconds
        the connection is aborted.
        """
        self.close()
        closed = self._protocol.closed
        with anyio.move_on_after(grace):
            await closed.wait()
        if not closed.is_set():
            self.abort()
            with anyio.move_on_after(1.0):
                await closed.wait()


def _resolve(future: asyncio.Future[bytes], outcome: Outcome) -> None:
    if not future.done():
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


async def client_from_socket(
    sock: socket.socket, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> Client:
    """A :class:`Client` over an already connected socket (one end of a ``socketpair``)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: _ClientProtocol(max_message_size), sock=sock)
    return Client(UnixEndpoint(sock.getsockname() or "socketpair", abstract=True), protocol)


@asynccontextmanager
async def connect(
    endpoint: str | Endpoint,
    *,
    connect_timeout: float = 5.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ssl: SSLContext | None = None,
) -> AsyncIterator[Client]:
    """A :class:`Client` connected to *endpoint*, closed when the block exits."""
    client = await open_client(
        endpoint, connect_timeout=connect_timeout, max_message_size=max_message_size, ssl=ssl
    )
    try:
        yield client
    finally:
        await client.aclose()


async def open_client(
    endpoint: str | Endpoint,
    *,
    connect_timeout: float = 5.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ssl: SSLContext | None = None,
    coalesce: bool = False,
    setup: Callable[[Client], Awaitable[None]] | None = None,
) -> Client:
    """Like :func:`connect` for long-lived clients the caller closes with ``aclose``.

    *coalesce* holds each request to the end of the loop turn, so the calls
    started in one turn leave in one write: right for a relay such as the
    scheduler, which starts a call for each request of a read. A client that
    starts one call per turn pays a loop callback per call for it (about a
    third of an asyncio client's calls per second, measured), so it is off
    by default.

    *setup* runs on the new connection before it is returned, within the
    connect timeout (the membership proof, say); when it fails the
    connection is closed and its error raised.
    """
    ep = parse_endpoint(endpoint)
    client: Client | None = None
    try:
        with anyio.fail_after(connect_timeout):
            _, protocol = await open_connection(
                ep, lambda: _ClientProtocol(max_message_size, coalesce), ssl=ssl
            )
            client = Client(ep, protocol)
            if setup is not None:
                await setup(client)
    except TimeoutError:
        if client is not None:
            client.abort()
        raise ConnectError(
            f"cannot connect to {ep}: no answer within {connect_timeout:g} s"
        ) from None
    except BaseException:
        if client is not None:
            client.abort()
        raise
    return client


def _sent_request_id(metadata: Sequence[tuple[str, str]]) -> str | None:
    """The request id the caller put in *metadata* itself (a valid one), else None."""
    for key, value in metadata:
        if key == REQUEST_ID_KEY and valid_request_id(value):
            return value
    return None
