"""The ttrpc client: one connection multiplexing concurrent calls.

Every call gets the next odd stream id and a future; the connection's
``data_received`` resolves futures as responses arrive, in whatever order
the server finishes them. A call's timeout is enforced here and also sent
to the server as ``timeout_nano`` so it can stop working on it.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import Protocol, TypeVar, cast

import anyio

from vaccelray.errors import ConnectError, ProtocolError, RPCError, StatusCode, TransportError
from vaccelray.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    ClientConnection,
    ResponseReceived,
)
from vaccelray.transport.endpoints import Endpoint, UnixEndpoint, open_connection, parse_endpoint

__all__ = ["Client", "client_from_socket", "connect", "open_client"]


class _Message(Protocol):
    def SerializeToString(self) -> bytes: ...


_M = TypeVar("_M")


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, max_message_size: int) -> None:
        self.proto = ClientConnection(max_message_size)
        self.waiters: dict[int, asyncio.Future[ResponseReceived]] = {}
        self.transport: asyncio.Transport | None = None
        self.error: TransportError | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        while True:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                self._fail(TransportError(f"connection broken by the server: {exc}"))
                if self.transport is not None:
                    self.transport.close()
                return
            if event is NEED_DATA:
                return
            assert isinstance(event, ResponseReceived)
            waiter = self.waiters.pop(event.stream_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._writable.set()
        reason = f": {exc}" if exc else ""
        self._fail(TransportError(f"connection closed{reason}"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _fail(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(error)


class Client:
    """A connected ttrpc client; create it with :func:`connect`."""

    def __init__(self, endpoint: Endpoint, protocol: _ClientProtocol) -> None:
        self.endpoint = endpoint
        self._protocol = protocol

    @property
    def is_closed(self) -> bool:
        return self._protocol.transport is None

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
        transport = protocol.transport
        if transport is None:
            raise protocol.error or TransportError(f"connection to {self.endpoint} is closed")
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise RPCError(StatusCode.DEADLINE_EXCEEDED, f"{method}: no time left for the call")
            timeout_nano = max(1, math.ceil(timeout * 1e9))
        stream_id, data = protocol.proto.send_request(
            service, method, payload, timeout_nano=timeout_nano, metadata=metadata
        )
        waiter: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        protocol.waiters[stream_id] = waiter
        try:
            if not protocol._writable.is_set():
                await protocol._writable.wait()
            transport.write(data)
            if timeout is None:
                response = await waiter
            else:
                with anyio.fail_after(timeout):
                    response = await waiter
        except TimeoutError:
            raise RPCError(
                StatusCode.DEADLINE_EXCEEDED,
                f"{service}/{method} got no answer within {timeout:g} s",
            ) from None
        finally:
            if not waiter.done():
                protocol.waiters.pop(stream_id, None)
                protocol.proto.abandon(stream_id)
                waiter.cancel()
        if response.code != 0:
            raise RPCError(response.code, response.message, response.details)
        return response.payload

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

    async def aclose(self) -> None:
        transport = self._protocol.transport
        if transport is not None:
            transport.close()
            await anyio.lowlevel.checkpoint()


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
) -> Client:
    """Like :func:`connect` for long-lived clients the caller closes with ``aclose``."""
    ep = parse_endpoint(endpoint)
    try:
        with anyio.fail_after(connect_timeout):
            _, protocol = await open_connection(
                ep, lambda: _ClientProtocol(max_message_size), ssl=ssl
            )
    except TimeoutError:
        raise ConnectError(
            f"cannot connect to {ep}: no answer within {connect_timeout:g} s"
        ) from None
    return Client(ep, protocol)
