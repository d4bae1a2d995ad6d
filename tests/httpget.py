"""A raw HTTP/1.1 GET for the tests of the metrics and dashboard listeners (one per connection)."""

from __future__ import annotations

from urllib.parse import urlsplit

import anyio

__all__ = ["Reply", "http_get", "raw_request"]


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def text(self) -> str:
        return self.body.decode()


async def raw_request(url: str, data: bytes) -> bytes:
    """Send *data* to the host of *url*, return all it answers until it closes."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    async with await anyio.connect_tcp(parts.hostname, parts.port) as stream:
        await stream.send(data)
        out = b""
        while not _whole(out):
            try:
                out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
        return out


def _whole(data: bytes) -> bool:
    """A whole answer with a Content-Length (a peer that keeps the connection open)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


async def http_get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return Reply(await raw_request(url, ("\r\n".join(lines) + "\r\n\r\n").encode()))
