"""The cluster token and TLS contexts.

Offloaded tasks carry pickles, and a pickle is code. A worker that listens
on anything but loopback (or a unix socket) therefore refuses the task
service to callers that do not present the cluster token, sent as the ttrpc
metadata ``authorization: Bearer <token>``. A worker started with a token
asks for it on every listener. The check runs before the request is
decoded; the daemon never loads a pickle at all (its pool processes do).
Refusals are answered UNAUTHENTICATED (16) and logged with the peer.

The vAccel agent service (data only: images in, tags out) stays open for
unmodified vAccel clients unless the worker is told to protect it too.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from vaccelray.errors import RPCError, StatusCode, VaccelrayError
from vaccelray.transport.endpoints import TcpEndpoint, UnixEndpoint, parse_endpoint
from vaccelray.transport.server import CallContext, Method, Service

__all__ = [
    "METADATA_KEY",
    "TOKEN_ENV",
    "AuthError",
    "TokenCheck",
    "client_ssl_context",
    "is_loopback",
    "load_token",
    "protect",
    "server_ssl_context",
    "token_metadata",
]

log = logging.getLogger("vaccelray.auth")

METADATA_KEY: Final = "authorization"
TOKEN_ENV: Final = "VACCELRAY_TOKEN"
_SCHEME: Final = "Bearer "


class AuthError(VaccelrayError):
    """A token or TLS file that cannot be used."""


def load_token(
    token: str | None = None, token_file: str | os.PathLike[str] | None = None
) -> str | None:
    """*token*, else the first line of *token_file*, else ``$VACCELRAY_TOKEN``, else None."""
    if token:
        return token
    if token_file is not None:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:
            raise AuthError(f"cannot read token file {token_file}: {exc.strerror or exc}") from exc
        if not text:
            raise AuthError(f"token file {token_file} is empty")
        return text.splitlines()[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The ttrpc metadata that presents *token* (nothing for None)."""
    return ((METADATA_KEY, _SCHEME + token),) if token else ()


def is_loopback(address: str) -> bool:
    """True for unix sockets and TCP on a loopback address; vsock and other hosts are not."""
    endpoint = parse_endpoint(address)
    if isinstance(endpoint, UnixEndpoint):
        return True
    if not isinstance(endpoint, TcpEndpoint):
        return False
    if endpoint.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(endpoint.host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TokenCheck:
    """Whether calls must present the token, and the check itself."""

    token: str | None = field(default=None, repr=False)
    required: bool = False

    @classmethod
    def for_addresses(cls, addresses: Iterable[str], token: str | None) -> TokenCheck:
        """Required when a token is set or any address is reachable from other hosts."""
        exposed = [a for a in addresses if not is_loopback(a)]
        if exposed and token is None:
            log.warning(
                "No cluster token for %s: the task service refuses every call there "
                "(give one with --token-file or VACCELRAY_TOKEN)",
                ", ".join(exposed),
            )
        return cls(token, required=token is not None or bool(exposed))

    def check(self, ctx: CallContext) -> None:
        """Raise UNAUTHENTICATED unless the call presents the token (when one is required)."""
        if not self.required:
            return
        presented = ctx.get_metadata(METADATA_KEY)
        if self.token is None:
            reason = "this worker has no cluster token, so it accepts no tasks from other hosts"
        elif presented is None:
            reason = "the cluster token is required (authorization metadata missing)"
        elif not hmac.compare_digest(presented.encode(), (_SCHEME + self.token).encode()):
            reason = "wrong cluster token"
        else:
            return
        log.warning("Refused %s/%s from %s: %s", ctx.service, ctx.method, ctx.peer, reason)
        raise RPCError(StatusCode.UNAUTHENTICATED, reason)


def protect(services: Sequence[Service], check: TokenCheck) -> list[Service]:
    """*services* with every method checking the token first (no-op when not required)."""
    if not check.required:
        return list(services)
    return [
        Service(s.name, {n: _guarded(m, check) for n, m in s.methods.items()}) for s in services
    ]


def _guarded(method: Method, check: TokenCheck) -> Method:
    handler = method.handler
    if method.inline or method.future:
        # Both run on the loop as plain functions: check, then pass on what the
        # handler returns (the answer, or the future of it), keeping the kind.
        def on_loop(payload: bytes, ctx: CallContext) -> Any:
            check.check(ctx)
            return handler(payload, ctx)

        return Method(on_loop, inline=method.inline, future=method.future)

    async def guarded(payload: bytes, ctx: CallContext) -> bytes:
        check.check(ctx)
        result = handler(payload, ctx)
        assert not isinstance(result, bytes)
        return await result

    return Method(guarded)


def server_ssl_context(cert: str, key: str | None = None) -> ssl.SSLContext:
    """A TLS server context from a PEM certificate (chain) and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise AuthError(f"cannot load TLS certificate {cert}: {exc}") from exc
    return context


def client_ssl_context(tls: bool | str | ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The client context for ``tls=``: True (system CAs), a CA file path, or a context."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=tls)
    except (OSError, ssl.SSLError) as exc:
        raise AuthError(f"cannot load TLS CA file {tls}: {exc}") from exc
