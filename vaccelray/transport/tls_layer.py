"""TLS over memory BIOs, at the cost of an idle connection's OpenSSL state only.

asyncio's own TLS gives every connection a 256 KiB read buffer of its own
(measured: ~280 KiB per idle TLS connection, against ~2.3 KiB plaintext).
:class:`TlsLayer` sits between the socket's transport and the protocol of
the connection instead: ciphertext is read into the server's one shared
buffer, fed to an ``ssl.SSLObject`` through memory BIOs (``wrap_bio``), and
the cleartext is read back into that same buffer and handed to the inner
protocol's ``buffer_updated``; what the inner protocol writes is encrypted
into the outgoing BIO and written to the socket at once. Nothing is kept
between two reads but OpenSSL's own state (which releases its buffers when
idle) and the BIOs, empty once drained.

The inner protocol is made (``connection_made``) once the handshake is
done, so it sees the peer's certificate; a handshake that does not finish
within *timeout* seconds closes the connection (:attr:`TlsLayer.ready`
says how it ended). The server side is the default; given a
*server_hostname*, the layer is a client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, cast

__all__ = ["TlsLayer"]


class _TlsTransport(asyncio.Transport):
    """What the inner protocol writes to and asks: the layer, as a transport."""

    def __init__(self, layer: TlsLayer) -> None:
        super().__init__()
        self._layer = layer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._layer.send(data)

    def writelines(self, list_of_data: Any) -> None:
        self._layer.send(b"".join(list_of_data))

    def close(self) -> None:
        self._layer.close()

    def abort(self) -> None:
        self._layer.raw.abort()

    def is_closing(self) -> bool:
        return self._layer.raw.is_closing()

    def pause_reading(self) -> None:
        self._layer.raw.pause_reading()

    def resume_reading(self) -> None:
        self._layer.raw.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._layer.raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._layer.tls
        if name == "sslcontext":
            return self._layer.tls.context
        return self._layer.raw.get_extra_info(name, default)


class TlsLayer(asyncio.BufferedProtocol):
    """TLS between a socket's transport and *inner*, reading into *buffer*.

    *buffer* may be shared by every connection of one event loop (see
    ``endpoints.ReadBuffer``): nothing refers to it between two reads.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        inner: asyncio.BufferedProtocol,
        buffer: memoryview,
        *,
        timeout: float,
        server_hostname: str | None = None,
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        #: The client side when it has the server's name (SNI; checked if the context says).
        self.client = server_hostname is not None
        self.tls = context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=not self.client,
            server_hostname=server_hostname,
        )
        #: Done when the handshake is (its exception when it failed or was cut off).
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inner = inner
        self.buffer = buffer
        self.timeout = timeout
        self.raw: asyncio.Transport = cast(asyncio.Transport, None)
        self.transport: _TlsTransport | None = None  # once the handshake is done
        self.timer: asyncio.TimerHandle | None = None
        #: The inner protocol was made on the plain transport already (see :meth:`adopt`).
        self.adopted = False

    # -- from the socket --------------------------------------------------------

    def adopt(self, transport: asyncio.Transport) -> None:
        """Take over the transport of a connection whose inner protocol is made already
        (a server that saw the first byte of a handshake); it is made again once the
        handshake is done, and told when the connection is lost, whenever that is."""
        self.adopted = True
        self.connection_made(transport)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        if self.timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(self.timeout, self.raw.abort)
        if self.client:
            self._handshake()  # the client speaks first

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.incoming.write(self.buffer[:nbytes])
        try:
            if self.transport is None and not self._handshake():
                return
            self._deliver()
        except ssl.SSLError as exc:
            self._flush()  # the alert, if any
            self._failed(exc)
            self.raw.abort()

    def _handshake(self) -> bool:
        """Advance the handshake; True once it is done (the inner protocol is then made)."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        self._flush()
        self.started()
        self.transport = _TlsTransport(self)
        self.inner.connection_made(self.transport)
        if not self.ready.done():
            self.ready.set_result(None)
        return True

    def _deliver(self) -> None:
        """Hand every cleartext byte decrypted so far to the inner protocol, in one go.

        The records of one read are decrypted one after the other into the
        buffer and handed over together, as one plaintext read would be: the
        server then answers all the requests in them with one write.
        """
        buffer, inner, tls, incoming = self.buffer, self.inner, self.tls, self.incoming
        size = len(buffer)
        filled = 0
        closing = False
        # While records wait: checking first spares an exception per read that drains them.
        while incoming.pending or tls.pending():
            try:
                n = cast(int, tls.read(size - filled, buffer[filled:]))
            except ssl.SSLWantReadError:
                break  # a record part way in
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                closing = True
                break
            if not n:
                break
            filled += n
            if filled == size:  # full: hand it over, and go on
                inner.buffer_updated(filled)
                filled = 0
                if self.transport is None:
                    return
        if filled and self.transport is not None:
            inner.buffer_updated(filled)
        if closing:
            self.close()
        self._flush()  # session tickets, key updates

    def eof_received(self) -> bool:
        return False  # close

    def started(self) -> None:
        """The handshake ended (or never will): stop its timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _failed(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: a server does not wait on it

    def connection_lost(self, exc: Exception | None) -> None:
        self.started()
        self._failed(exc or ConnectionResetError("connection closed during the TLS handshake"))
        if self.transport is not None or self.adopted:
            self.transport = None
            self.adopted = False
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- from the inner protocol ---------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.raw.is_closing():
            return
        self.tls.write(data)
        self._flush()

    def close(self) -> None:
        if self.raw.is_closing():
            return
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: theirs is not awaited
            self.tls.unwrap()  # close_notify
        self._flush()
        self.raw.close()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.raw.write(self.outgoing.read())
