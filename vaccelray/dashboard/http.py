"""A minimal, bounded HTTP/1.1 server for the metrics and dashboard pages.

One request per connection (answered with ``Connection: close``), GET and
HEAD only, no request bodies. What a peer can hold is bounded: connections
past ``max_connections`` are closed as accepted; a request
head must arrive whole within ``head_timeout`` seconds (slow-loris) and fit
in :data:`MAX_HEAD` bytes (else 408 / 431); the answer must leave within
``head_timeout`` too. The handler is a plain function run on the loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from vaccelray.errors import VaccelrayError

__all__ = [
    "DEFAULT_HEAD_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_HEAD",
    "HttpAddressError",
    "Request",
    "Response",
    "parse_http_address",
    "serve_http",
]

log = logging.getLogger("vaccelray.http")

#: Bytes of a request line and headers together.
MAX_HEAD: Final = 8192
DEFAULT_HEAD_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 32


class HttpAddressError(VaccelrayError):
    """An address for an HTTP listener that is not HOST:PORT."""


def parse_http_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``, or with ``http://`` before it) as (host, port)."""
    rest = address.removeprefix("http://")
    host, colon, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise HttpAddressError(f"bad HTTP address {address!r}: expected HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    #: Header names in lower case; a repeated header keeps its last value.
    headers: Mapping[str, str]
    #: The peer's address (host).
    peer: str = ""

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self, *, head_only: bool = False) -> bytes:
        reason = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _plain(status: int, text: str) -> Response:
    return Response(status, (text + "\n").encode())


def parse_head(head: bytes, peer: str = "") -> Request | Response:
    """The request in *head* (request line and headers), or the error answer to it."""
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        return _plain(400, "bad request line")
    if not version.startswith("HTTP/1."):
        return _plain(505, "HTTP/1.x only")
    if method not in ("GET", "HEAD"):
        return Response(405, b"GET or HEAD only\n", headers=(("Allow", "GET, HEAD"),))
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            return _plain(400, "bad header line")
        headers[name.strip().lower()] = value.strip()
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        return _plain(413, "no request bodies")
    parts = urlsplit(target)
    return Request(method, parts.path or "/", parse_qs(parts.query), headers, peer)


class _Server:
    def __init__(
        self, handler: Callable[[Request], Response], max_connections: int, head_timeout: float
    ) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.open = 0

    async def connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            if self.max_connections and self.open >= self.max_connections:
                return  # closed as accepted: nothing of it is held
            self.open += 1
            try:
                await self._serve(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the peer went away
            finally:
                self.open -= 1

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        peer = str(stream.extra(SocketAttribute.remote_address, ("?",))[0])
        answer: Request | Response = _plain(408, "request head too slow")
        with anyio.move_on_after(self.head_timeout):
            answer = await self._read(stream, peer)
        head_only = False
        if isinstance(answer, Request):
            request = answer
            head_only = request.method == "HEAD"
            try:
                answer = self.handler(request)
            except Exception:
                log.exception("HTTP %s failed", request.path)
                answer = _plain(500, "internal error")
        with anyio.move_on_after(self.head_timeout):
            await stream.send(answer.encode(head_only=head_only))

    async def _read(self, stream: anyio.abc.SocketStream, peer: str) -> Request | Response:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD:
                return _plain(431, f"request head over {MAX_HEAD} bytes")
            try:
                buffer += await stream.receive(MAX_HEAD)
            except anyio.EndOfStream:
                return _plain(400, "incomplete request")
        head = buffer.partition(b"\r\n\r\n")[0]
        if len(head) > MAX_HEAD:
            return _plain(431, f"request head over {MAX_HEAD} bytes")
        return parse_head(head, peer)


@asynccontextmanager
async def serve_http(
    address: str,
    handler: Callable[[Request], Response],
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    head_timeout: float = DEFAULT_HEAD_TIMEOUT,
) -> AsyncIterator[str]:
    """Serve *handler* on *address* (``HOST:PORT``) until the block exits; yields the URL."""
    host, port = parse_http_address(address)
    server = _Server(handler, max_connections, head_timeout)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener, anyio.create_task_group() as tg:
        bound = listener.extra(SocketAttribute.local_address)
        assert isinstance(bound, tuple)
        bound_host = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        tg.start_soon(listener.serve, server.connection)
        try:
            yield f"http://{bound_host}:{bound[1]}"
        finally:
            tg.cancel_scope.cancel()
