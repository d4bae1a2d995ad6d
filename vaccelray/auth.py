"""Credentials: what a connection presents, what a listener demands, who refused.

Offloaded tasks carry pickles, and a pickle is code, so the task service
always asks for a credential, loopback included:

- the cluster token, sent as the ttrpc metadata ``authorization: Bearer
  <token>``; or
- on a unix socket, being the daemon's own user (or root): the kernel says
  who the peer is (``SO_PEERCRED``), for path and abstract sockets alike.

A daemon started without a token uses the user's default token, made at
its first start (random, mode 0600) in :func:`default_token_path`: one per
user, shared by all their daemons. A client of the same user reads it
without being told, and presents it to loopback TCP addresses only (a
token of the user's own never leaves the host by default); other users and
other hosts need a copy (``--token-file`` / ``VACCELRAY_TOKEN``). Token
files readable by other users are refused. The embedded worker hands its
client a token in memory.

The check runs before the request is decoded; the daemon never loads a
pickle at all (its pool processes do). Refusals are answered
UNAUTHENTICATED (16), name the hop that refused (``worker tcp://...:`` or
``scheduler tcp://...:``) and the fix, and are logged with the peer.

The vAccel agent service (data only: images in, tags out) stays open for
unmodified vAccel clients unless the worker is told to protect it too; its
requests that load a library (exec) are refused off loopback unless the
daemon runs with ``--allow-exec`` (:class:`ExecPolicy`).

:func:`client_token` decides what a connection presents, :class:`TokenCheck`
what a listener demands: TLS and member credentials attach there.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import logging
import os
import secrets
import ssl
import stat
import tempfile
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, cast

from vaccelray.errors import RPCError, StatusCode, VaccelrayError
from vaccelray.logs import Throttle
from vaccelray.transport.endpoints import TcpEndpoint, UnixEndpoint, parse_endpoint
from vaccelray.transport.server import CallContext, Method, Service

__all__ = [
    "METADATA_KEY",
    "TOKEN_ENV",
    "AuthError",
    "ExecPolicy",
    "TokenCheck",
    "client_tls",
    "client_token",
    "daemon_token",
    "default_token_path",
    "is_loopback",
    "load_token",
    "private_dir",
    "protect",
    "read_token_file",
    "token_metadata",
]

log = logging.getLogger("vaccelray.auth")

METADATA_KEY: Final = "authorization"
TOKEN_ENV: Final = "VACCELRAY_TOKEN"
_SCHEME: Final = "Bearer "
#: How a caller gives the token, in refusals.
_HOW: Final = "--token-file FILE or VACCELRAY_TOKEN"


class AuthError(VaccelrayError):
    """A token or TLS file that cannot be used."""


# -- token files -------------------------------------------------------------------------


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The first line of the token file *path*; refused when other users may read it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise AuthError(
                    f"token file {path} is open to other users (mode {stat.S_IMODE(mode):04o}): "
                    f"run chmod 600 {path}"
                )
            text = f.read().decode().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise AuthError(f"cannot read token file {path}: {reason}") from exc
    if not text:
        raise AuthError(f"token file {path} is empty")
    return text.splitlines()[0].strip()


def load_token(
    token: str | None = None, token_file: str | os.PathLike[str] | None = None
) -> str | None:
    """*token*, else the first line of *token_file*, else ``$VACCELRAY_TOKEN``, else None."""
    if token:
        return token
    if token_file is not None:
        return read_token_file(token_file)
    return os.environ.get(TOKEN_ENV) or None


def _private_dir(path: Path) -> Path:
    """*path*, made if missing; refused unless it is a directory of ours nobody else may use."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        found = os.lstat(path)
    except OSError as exc:
        raise AuthError(f"cannot make the token directory {path}: {exc.strerror or exc}") from exc
    uid = os.geteuid()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != uid or found.st_mode & 0o077:
        raise AuthError(
            f"{path} is not a private directory of uid {uid} (owner uid {found.st_uid}, "
            f"mode {stat.S_IMODE(found.st_mode):04o}): remove it, or give a token with {_HOW}"
        )
    return path


def private_dir() -> Path:
    """The user's private directory of the default token (and node identity), made if missing."""
    return _private_dir(default_token_path().parent)


def default_token_path() -> Path:
    """The user's default token: ``$XDG_RUNTIME_DIR/vaccelray/token``, else under the temp dir.

    Without an ``XDG_RUNTIME_DIR`` of this user's own (root in a container,
    or one left by ``su``) it is ``<temp dir>/vaccelray-<uid>/token``.
    Nothing is made here.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    uid = os.geteuid()
    if runtime and os.path.isabs(runtime):
        with contextlib.suppress(OSError):  # missing: not the user's
            if os.stat(runtime).st_uid == uid:
                return Path(runtime) / "vaccelray" / "token"
    return Path(tempfile.gettempdir()) / f"vaccelray-{uid}" / "token"


def daemon_token(token: str | None = None) -> tuple[str, Path | None]:
    """The token a daemon demands: *token*, else the user's default one (made if missing).

    Returns the token and, for the default one, its file (named in refusals).
    """
    if token:
        return token, None
    path = default_token_path()
    _private_dir(path.parent)
    try:
        return read_token_file(path), path
    except AuthError:
        if path.exists():
            raise
    new = secrets.token_urlsafe()  # 32 random bytes
    spare = path.with_name(f".token-{secrets.token_hex(4)}")
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new + "\n")
        try:
            os.link(spare, path)  # never replaces a token another daemon made meanwhile
        except FileExistsError:
            return read_token_file(path), path
    finally:
        os.unlink(spare)
    log.info("Made the default token %s (mode 0600)", path)
    return new, path


def _tcp_loopback(address: str) -> bool:
    endpoint = parse_endpoint(address)
    return isinstance(endpoint, TcpEndpoint) and is_loopback(address)


def client_token(
    address: str, token: str | None = None, token_file: str | os.PathLike[str] | None = None
) -> str | None:
    """The token a connection to *address* presents.

    *token*, else *token_file*, else ``$VACCELRAY_TOKEN``, else (to TCP
    loopback only) the user's default token when there is one. On a unix
    socket a daemon of the same user needs none.
    """
    given = load_token(token, token_file)
    if given is not None or not _tcp_loopback(address):
        return given
    path = default_token_path()
    try:
        return read_token_file(path)
    except AuthError as exc:
        if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in (
            errno.ENOENT,
            errno.EACCES,
        ):
            return None  # no daemon of ours made one: nothing to present
        raise


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


# -- listeners -------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCheck:
    """What a listener demands of task callers, and the check itself.

    A call passes with the token, or from a unix socket peer whose uid is
    the daemon's own or root. *hop* names the daemon in refusals
    ("worker", "scheduler"); *token_path* is the default token's file, when
    that is the token (named in refusals: the user finds it there).
    """

    token: str | None = field(default=None, repr=False)
    required: bool = True
    hop: str = "worker"
    token_path: Path | None = None
    uid: int = field(default_factory=os.geteuid)
    #: Refusal lines: a peer without the token must not decide how much the daemon logs.
    refusals: Throttle = field(
        default_factory=lambda: Throttle(logging.WARNING, "calls refused", log),
        repr=False,
        compare=False,
    )

    def check(self, ctx: CallContext) -> None:
        """Raise UNAUTHENTICATED unless the call presents the token or a uid that passes."""
        if not self.required:
            return
        link = ctx.link
        if link is not None and link.member:
            return  # proved the token on this TLS connection (vaccelray.membership)
        presented = ctx.get_metadata(METADATA_KEY)
        origin = ctx.origin
        if presented is None and origin.uid is not None and origin.uid in (self.uid, 0):
            return
        if self.token is None:
            reason = (
                f"this {self.hop} has no cluster token, so it runs tasks only for its own "
                f"user on a unix socket: start it with {_HOW}"
            )
        elif presented is None:
            reason = self._missing(ctx)
        elif origin.uid is None:
            reason = (
                "a token sent over the network is never taken (it would cross the wire in "
                "clear): a vaccelray client holding it proves it over TLS instead"
            )
        elif not hmac.compare_digest(presented.encode(), (_SCHEME + self.token).encode()):
            reason = f"wrong cluster token: present this {self.hop}'s token with {_HOW}"
        else:
            return
        # time.monotonic() is the loop's clock on asyncio, and needs no running loop.
        if self.refusals(time.monotonic()):
            log.warning("Refused %s/%s from %s: %s", ctx.service, ctx.method, ctx.peer, reason)
        raise RPCError(StatusCode.UNAUTHENTICATED, f"{self.hop} {origin.listener}: {reason}")

    def _missing(self, ctx: CallContext) -> str:
        uid = ctx.origin.uid
        who = (
            f"uid {uid} is not this {self.hop}'s user (uid {self.uid}) and presented "
            "no cluster token"
            if uid is not None
            else "the cluster token is required and none was presented (over the network "
            "a vaccelray client holding it proves it over TLS, never sends it)"
        )
        if self.token_path is not None:
            return (
                f"{who}: its own user finds the token without flags, others pass a copy of "
                f"{self.token_path} with {_HOW}"
            )
        return f"{who}: pass it with {_HOW}"


def protect(services: Sequence[Service], check: TokenCheck) -> list[Service]:
    """*services* with every method checking the token first (no-op when not required)."""
    if not check.required:
        return list(services)
    return [
        Service(s.name, {n: _guarded(m, check) for n, m in s.methods.items()}) for s in services
    ]


def _guarded(method: Method, check: TokenCheck) -> Method:
    handler = method.handler
    if method.inline or method.future or method.callback:
        # All run on the loop as plain functions: check, then pass on what the
        # handler returns (the answer, its future, its work), keeping the kind.
        def on_loop(payload: bytes, ctx: CallContext) -> Any:
            check.check(ctx)
            return handler(payload, ctx)

        return replace(method, handler=on_loop)

    async def guarded(payload: bytes, ctx: CallContext) -> bytes:
        check.check(ctx)
        return await cast(Awaitable[bytes], handler(payload, ctx))

    return Method(guarded)


@dataclass(frozen=True)
class ExecPolicy:
    """Whether vAccel requests that load a library (exec) are served, by where they come from.

    From loopback and unix sockets always; from other hosts only with
    *allow_exec* (``--allow-exec``). *hop* names the daemon in refusals.
    """

    allow_exec: bool = False
    hop: str = "worker"

    def check(self, ctx: CallContext, what: str) -> None:
        """Raise PERMISSION_DENIED for *what* (a request loading a library) off loopback."""
        origin = ctx.origin
        if self.allow_exec or origin.loopback:
            return
        log.warning("Refused %s from %s: exec off loopback", what, ctx.peer)
        raise RPCError(
            StatusCode.PERMISSION_DENIED,
            f"{self.hop} {origin.listener}: {what} loads a library, which this {self.hop} "
            f"serves to other hosts only when started with --allow-exec",
        )


def client_tls(tls: bool | str | ssl.SSLContext | None) -> tuple[ssl.SSLContext | None, str | None]:
    """``tls=`` of the client API as (a context of the caller's, the cluster CA's file).

    None or False: neither (TLS with the membership proof is the default to
    TCP addresses, see ``vaccelray.membership``); a path: the cluster CA;
    True: the system CAs with the host name checked; a context: itself.
    """
    if tls is None or tls is False:
        return None, None
    if isinstance(tls, ssl.SSLContext):
        return tls, None
    if tls is True:
        return ssl.create_default_context(), None
    if not os.path.isfile(tls):
        raise AuthError(f"cannot load TLS CA file {tls}: no such file")
    return None, tls
