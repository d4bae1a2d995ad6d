"""Endpoint addresses: ``tcp://host:port``, ``unix:///path``, ``unix:@name``, ``vsock://cid:port``.

One parser for every address a user can type, one canonical spelling back
(``str(endpoint)``), and the socket calls to listen on or connect to each.
Connections are asyncio protocols: the hot path handles a frame inside
``buffer_updated`` with no task switch (see ``server.py``).
Rust ttrpc treats ``unix://name`` (two slashes) as the abstract namespace;
we accept it the same way.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
import ssl as ssl_module
import stat
from collections.abc import Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Final, TypeAlias, TypeVar, cast

from vaccelray.errors import ConnectError, VaccelrayError
from vaccelray.transport.tls_layer import TlsLayer

__all__ = [
    "SOCKET_MODE",
    "Endpoint",
    "EndpointError",
    "ListenError",
    "ReadBuffer",
    "TcpEndpoint",
    "UnixEndpoint",
    "VsockEndpoint",
    "bind",
    "open_connection",
    "parse_endpoint",
    "tune_socket",
]

_FORMS = "tcp://HOST:PORT, unix:///PATH, unix:@NAME or vsock://CID:PORT"


class EndpointError(VaccelrayError, ValueError):
    """An address that is not one of the endpoint forms."""


class ListenError(VaccelrayError, OSError):
    """An endpoint that cannot be listened on; the message names it and says why.

    An ``OSError`` (with the ``errno`` of the failure, when there is one), so
    code that handled the bare socket error still does.
    """

    def __init__(self, endpoint: Endpoint, reason: str, code: int | None = None) -> None:
        super().__init__(f"cannot listen on {endpoint}: {reason}")
        self.errno = code


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixEndpoint:
    path: str
    abstract: bool = False

    def __str__(self) -> str:
        return f"unix:@{self.path}" if self.abstract else f"unix://{self.path}"

    @property
    def sockaddr(self) -> str:
        return "\0" + self.path if self.abstract else self.path


@dataclass(frozen=True, slots=True)
class VsockEndpoint:
    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock://{self.cid}:{self.port}"


Endpoint: TypeAlias = TcpEndpoint | UnixEndpoint | VsockEndpoint


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise EndpointError(f"bad port {text!r} in {address!r}: expected a number from 0 to 65535")
    return int(text)


def parse_endpoint(address: str | Endpoint) -> Endpoint:
    """Parse an address; raises :class:`EndpointError` naming the accepted forms."""
    if not isinstance(address, str):
        return address
    scheme, sep, rest = address.partition("://")
    if address.startswith("unix:@"):
        name = address[len("unix:@") :]
        if not name:
            raise EndpointError(f"empty abstract socket name in {address!r}")
        return UnixEndpoint(name, abstract=True)
    if not sep:
        raise EndpointError(f"bad endpoint {address!r}: expected {_FORMS}")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise EndpointError(f"bad endpoint {address!r}: expected tcp://HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return TcpEndpoint(host, _port(port, address))
    if scheme == "unix":
        if rest.startswith("/"):
            return UnixEndpoint(rest)
        if not rest:
            raise EndpointError(f"empty unix socket path in {address!r}")
        return UnixEndpoint(rest, abstract=True)
    if scheme == "vsock":
        cid, colon, port = rest.partition(":")
        if not colon or not cid.isdigit():
            raise EndpointError(f"bad endpoint {address!r}: expected vsock://CID:PORT")
        return VsockEndpoint(int(cid), _port(port, address))
    raise EndpointError(f"unknown scheme {scheme!r} in {address!r}: expected {_FORMS}")


#: Size of the buffer a connection's reads land in (see :class:`ReadBuffer`).
READ_SIZE: Final = 256 << 10


class ReadBuffer:
    """The one buffer an ``asyncio.BufferedProtocol`` connection reads into.

    A plain ``asyncio.Protocol`` gets every read as a fresh 256 KiB ``recv``
    allocation, which glibc serves with mmap and munmap: measured on a 2-core
    VM, that alone cost ~80 µs per call round trip in a client. Reads here
    land in one reused buffer and are copied out at their real size (small
    messages stay far below glibc's mmap threshold).

    One can serve many connections of one event loop: asyncio calls
    ``get_buffer``, reads into it and calls ``buffer_updated`` in one go on the
    loop's thread, and :meth:`take` copies the bytes out, so nothing refers to
    the buffer between two reads. A server shares one among all its
    connections (256 KiB each would make an idle connection cost 256 KiB).
    """

    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))

    def take(self, nbytes: int) -> bytes:
        return self.view[:nbytes].tobytes()


#: Send buffer of unix connections (the kernel caps it at net.core.wmem_max).
UNIX_SEND_BUFFER: Final = 4 << 20


def tune_socket(sock: socket.socket) -> None:
    """Options of every connection, both ends.

    TCP_NODELAY on TCP sockets: one frame per write must not wait for Nagle.
    A large send buffer on unix sockets: a message of a few MiB leaves in one
    write instead of a write per ~200 KiB and a loop iteration for each
    (about 10% more 1 MiB calls per second, measured).
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)


#: Permissions of a listening unix socket file: its owner only (connecting needs write).
SOCKET_MODE: Final = 0o600


def bind(
    endpoint: Endpoint, *, backlog: int = 512, mode: int = SOCKET_MODE
) -> tuple[socket.socket, Endpoint]:
    """A listening, non-blocking socket on *endpoint* and the endpoint it really bound.

    Port 0 is resolved to the port the kernel chose. At a unix socket path, a
    stale socket file (no server accepts on it) is replaced; anything else
    found there is left alone: a live socket is "in use", and a file that is
    not a socket is never removed. A failure to listen is a :class:`ListenError`
    naming the endpoint. A unix socket file gets the permissions *mode*
    before it listens, so no one else can connect in between.
    """
    address: str | tuple[object, ...]
    if isinstance(endpoint, TcpEndpoint):
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise EndpointError(
                f"cannot resolve {endpoint.host!r} in {endpoint}: {exc.strerror}"
            ) from exc
        family, address = infos[0][0], infos[0][4]
    elif isinstance(endpoint, UnixEndpoint):
        if not endpoint.abstract:
            _remove_stale_socket(endpoint)
        family, address = socket.AF_UNIX, endpoint.sockaddr
    else:
        family, address = socket.AF_VSOCK, (endpoint.cid, endpoint.port)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _listen_error(endpoint, exc) from exc
    try:
        if isinstance(endpoint, TcpEndpoint):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if isinstance(endpoint, UnixEndpoint) and not endpoint.abstract:
            os.chmod(endpoint.path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _listen_error(endpoint, exc) from exc
    if isinstance(endpoint, TcpEndpoint):
        return sock, TcpEndpoint(endpoint.host, int(sock.getsockname()[1]))
    if isinstance(endpoint, VsockEndpoint):
        return sock, VsockEndpoint(endpoint.cid, int(sock.getsockname()[1]))
    return sock, endpoint


def _listen_error(endpoint: Endpoint, exc: OSError) -> ListenError:
    """*exc* from making a listener on *endpoint*, as one line that says what to fix."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if isinstance(endpoint, UnixEndpoint) and not endpoint.abstract:
        directory = os.path.dirname(endpoint.path) or "/"
        if exc.errno == errno.ENOENT:
            reason = f"no directory {directory}"
        elif exc.errno == errno.ENOTDIR:
            reason = f"{directory} is not a directory"
    return ListenError(endpoint, reason, exc.errno)


def _remove_stale_socket(endpoint: UnixEndpoint) -> None:
    """Unlink the socket file a dead server left at *endpoint*'s path, and nothing else.

    Raises :class:`ListenError` when the path holds something that is not a
    socket, or a socket a server accepts on. When it cannot tell (no
    permission, say), it leaves the path alone and ``bind`` reports why.
    """
    path = endpoint.path
    try:
        found = os.lstat(path)
    except OSError:
        return  # nothing there, or nothing this process may look at: bind says which
    if not stat.S_ISSOCK(found.st_mode):
        raise ListenError(
            endpoint,
            "it exists and is not a socket; remove it or choose another path",
            errno.EEXIST,
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live server with a full backlog must not block us
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: nobody accepts on it
    except OSError:
        return
    else:
        raise ListenError(
            endpoint, "Address already in use (a server accepts on it)", errno.EADDRINUSE
        )
    finally:
        probe.close()
    # Unlink only the socket that was probed, not a file put there since.
    try:
        if _same_file(os.lstat(path), found):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def open_connection(
    endpoint: Endpoint, protocol_factory: Callable[[], _P], *, ssl: SSLContext | None = None
) -> tuple[asyncio.Transport, _P]:
    """Connect *endpoint* to a new protocol; raises :class:`ConnectError` naming it.

    With *ssl*, the connection speaks TLS (server name: the TCP host, else
    ``localhost``) through a :class:`~vaccelray.transport.tls_layer.TlsLayer`
    reading into the protocol's own buffer (a ``BufferedProtocol``);
    returned once the handshake is done.
    """
    loop = asyncio.get_running_loop()
    layer: TlsLayer | None = None
    factory: Callable[[], asyncio.BaseProtocol] = protocol_factory
    if ssl is not None:
        inner = protocol_factory()
        assert isinstance(inner, asyncio.BufferedProtocol)
        name = endpoint.host if isinstance(endpoint, TcpEndpoint) else "localhost"
        buffer = memoryview(inner.get_buffer(-1))
        layer = TlsLayer(ssl, inner, buffer, timeout=0, server_hostname=name)
        factory = functools.partial(lambda layer: layer, layer)
    try:
        if isinstance(endpoint, TcpEndpoint):
            transport, protocol = await loop.create_connection(
                factory, endpoint.host, endpoint.port
            )
        elif isinstance(endpoint, UnixEndpoint):
            transport, protocol = await loop.create_unix_connection(factory, endpoint.sockaddr)
        else:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, (endpoint.cid, endpoint.port))
            except BaseException:
                sock.close()
                raise
            transport, protocol = await loop.create_connection(factory, sock=sock)
        if layer is not None:
            try:
                await layer.ready
            except BaseException:
                transport.abort()
                raise
            assert layer.transport is not None
            transport, protocol = layer.transport, layer.inner
    except ssl_module.SSLError as exc:
        detail = getattr(exc, "verify_message", None) or exc.reason or exc
        raise ConnectError(
            f"cannot connect to {endpoint}: TLS handshake failed ({detail})"
        ) from exc
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConnectError(f"cannot connect to {endpoint}: {reason}") from exc
    sock = transport.get_extra_info("socket")
    if sock is not None:
        tune_socket(sock)
    return transport, cast(_P, protocol)
