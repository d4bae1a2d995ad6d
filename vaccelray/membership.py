"""Membership: both ends of a TLS connection prove they hold the cluster token.

A peer is a cluster member once it has proved, on the connection at hand,
that it holds the cluster token, without sending it (the wire protocol is
in :mod:`vaccelray.protocol.membership`). The client speaks first but the
server proves first, so a client (a scheduler reaching a worker it found on
the LAN, a user's client reaching a scheduler) checks who it talks to
before it sends anything: no proof of its own, no function, argument or
image. A worker becomes routable only after a connection to it passed
(the scheduler opens its connections through :meth:`Credential.open`).

Why a first RPC rather than something inside the TLS handshake: Python's
``ssl`` cannot take a self-signed client certificate, nor export keying
material, so the proof binds the certificates each end sees instead; as an
ordinary ttrpc call it has the server's framing, bounds, deadlines and
status codes, and plaintext listeners (vAccel clients) are unchanged. It
costs two round trips per connection, never one per call.

:class:`MembershipService` is the server's side; :class:`Credential` is a
node's or a client's: the token, its TLS identity and the cluster CA, and
from them how to open a connection to an address (TLS and the proof to TCP
and vsock addresses; plaintext and the token as metadata, kernel-checked
uid, to unix sockets, which never leave the host).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final

from vaccelray.auth import private_dir, token_metadata
from vaccelray.errors import ConnectError, RPCError, StatusCode
from vaccelray.protocol.membership import (
    MEMBERSHIP_SERVICE,
    NONCE_SIZE,
    PROOF_SIZE,
    Challenge,
    Hello,
    Proof,
    Proven,
    proof,
)
from vaccelray.protocol.services import HELLO, PROVE
from vaccelray.tls import (
    Identity,
    client_context,
    fingerprint,
    load_identity,
    node_identity,
    server_context,
)
from vaccelray.transport.client import Client
from vaccelray.transport.endpoints import UnixEndpoint, parse_endpoint
from vaccelray.transport.server import CallContext, Link, Method, Service

__all__ = ["Credential", "MembershipError", "MembershipService", "node_credential", "prove"]

log = logging.getLogger("vaccelray.auth")

_SERVER: Final = b"server"
_CLIENT: Final = b"client"
#: A connection's proof state once Prove was tried: one attempt per connection.
_SPENT: Final = object()


class MembershipError(ConnectError):
    """The peer did not prove it holds the cluster token: nothing was sent to it."""


class MembershipService:
    """``vaccelray.v1.Membership``: a daemon proves itself, then takes a client's proof.

    *fingerprint*: SHA-256 of the certificate this daemon serves TLS with.
    *hop* names the daemon in refusals.
    """

    def __init__(self, token: str | None, fingerprint: bytes, *, hop: str = "worker") -> None:
        self._token = token
        self._fingerprint = fingerprint
        self.hop = hop

    def service(self) -> Service:
        return Service(
            MEMBERSHIP_SERVICE,
            {
                HELLO.method: Method(self._hello, inline=True),
                PROVE.method: Method(self._prove, inline=True),
            },
        )

    def _link(self, ctx: CallContext) -> Link:
        link = ctx.link
        if link is None or not link.tls:
            raise RPCError(
                StatusCode.FAILED_PRECONDITION,
                f"{self.hop} {ctx.origin.listener}: membership is proved over TLS only",
            )
        if self._token is None:
            raise RPCError(
                StatusCode.UNAUTHENTICATED,
                f"{self.hop} {ctx.origin.listener}: this {self.hop} has no cluster token",
            )
        return link

    def _hello(self, payload: bytes, ctx: CallContext) -> bytes:
        link = self._link(ctx)
        if link.challenge is not None or link.member:
            raise RPCError(
                StatusCode.FAILED_PRECONDITION, "Hello was sent on this connection already"
            )
        request = HELLO.request.decode(payload)
        if len(request.nonce) != NONCE_SIZE:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT, f"Hello: the nonce must be {NONCE_SIZE} bytes"
            )
        assert self._token is not None  # _link checked it
        nonce = secrets.token_bytes(NONCE_SIZE)
        client_cert = fingerprint(link.peer_cert)
        link.challenge = (request.nonce, nonce, client_cert)
        mine = proof(self._token, _SERVER, request.nonce, nonce, self._fingerprint, client_cert)
        return HELLO.reply.encode(Challenge(nonce=nonce, proof=mine))

    def _prove(self, payload: bytes, ctx: CallContext) -> bytes:
        link = self._link(ctx)
        challenge, link.challenge = link.challenge, _SPENT
        if not isinstance(challenge, tuple):
            raise RPCError(
                StatusCode.FAILED_PRECONDITION, "Prove comes once, after Hello, on a connection"
            )
        client_nonce, nonce, client_cert = challenge
        assert self._token is not None
        expected = proof(self._token, _CLIENT, client_nonce, nonce, self._fingerprint, client_cert)
        if not hmac.compare_digest(PROVE.request.decode(payload).proof, expected):
            log.warning("Refused the membership proof of %s", ctx.peer)
            raise RPCError(
                StatusCode.UNAUTHENTICATED,
                f"{self.hop} {ctx.origin.listener}: wrong membership proof (the peer does not "
                "hold this cluster's token, or a relay sits between the two ends)",
            )
        link.member = True
        return PROVE.reply.encode(Proven())


async def prove(client: Client, token: str, own_cert: bytes = b"") -> None:
    """Prove membership on a fresh TLS connection, the server first; raises MembershipError.

    *own_cert*: the fingerprint of the certificate this end showed (empty: none).
    Nothing but a nonce is sent before the server's proof has passed.
    """
    where = client.endpoint
    server_der = client.peer_cert
    if server_der is None:
        raise MembershipError(f"{where}: membership is proved over TLS only")
    server_cert = fingerprint(server_der)
    nonce = secrets.token_bytes(NONCE_SIZE)
    try:
        challenge = await client.call_rpc(HELLO, Hello(nonce=nonce))
        ok = len(challenge.nonce) == NONCE_SIZE and len(challenge.proof) == PROOF_SIZE
        theirs = proof(token, _SERVER, nonce, challenge.nonce, server_cert, own_cert)
        if not (ok and hmac.compare_digest(challenge.proof, theirs)):
            raise MembershipError(
                f"{where} did not prove it holds your cluster token (its token differs, "
                "it is no member, or a relay sits in the middle): nothing was sent to it"
            )
        mine = proof(token, _CLIENT, nonce, challenge.nonce, server_cert, own_cert)
        await client.call_rpc(PROVE, Proof(proof=mine))
    except RPCError as exc:
        raise MembershipError(f"{where} refused the membership proof: {exc.message}") from exc


@dataclass(frozen=True)
class Credential:
    """What a node or a client holds: the cluster token, its TLS identity, the cluster CA.

    *identity* is the certificate it serves TLS with (a daemon's; a client
    needs none) and, with a *ca*, shows to the servers it connects to.
    *tls* overrides the client context (a caller's own ``SSLContext``).
    """

    token: str | None = field(default=None, repr=False)
    identity: Identity | None = None
    ca: str | None = None
    tls: ssl.SSLContext | None = None
    #: The token is the user's default one: proved, never sent (a unix socket peer
    #: of the same user needs none, another user gets none).
    default: bool = False

    def server_ssl(self) -> ssl.SSLContext | None:
        """The listeners' TLS context (None: no identity, plaintext only)."""
        if self.identity is None:
            return None
        return server_context(self.identity, self.ca)

    def service(self, hop: str = "worker") -> Service:
        """The membership service of a daemon serving TLS with this credential."""
        own = self.identity.fingerprint if self.identity is not None else b""
        return MembershipService(self.token, own, hop=hop).service()

    @cached_property
    def _client_ssl(self) -> ssl.SSLContext:
        if self.tls is not None:
            return self.tls
        # A certificate is shown only where a CA can check it.
        return client_context(self.identity if self.ca else None, self.ca)

    def uses_tls(self, address: str) -> bool:
        """TLS to TCP and vsock addresses, with a token to prove or a context/CA asked for."""
        if isinstance(parse_endpoint(address), UnixEndpoint):
            return False
        return self.token is not None or self.ca is not None or self.tls is not None

    def ssl_for(self, address: str) -> ssl.SSLContext | None:
        return self._client_ssl if self.uses_tls(address) else None

    def setup_for(self, address: str) -> Callable[[Client], Awaitable[None]] | None:
        """The membership proof a connection to *address* makes first (None: none)."""
        token = self.token
        if token is None or not self.uses_tls(address):
            return None
        own = self.identity.fingerprint if self.identity is not None and self.ca else b""

        async def setup(client: Client) -> None:
            await prove(client, token, own)

        return setup

    def metadata_for(self, address: str) -> tuple[tuple[str, str], ...]:
        """Metadata every call to *address* carries: the token on unix sockets only."""
        if isinstance(parse_endpoint(address), UnixEndpoint) and not self.default:
            return token_metadata(self.token)
        return ()


def node_credential(
    token: str | None,
    *,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    default: bool = False,
) -> Credential:
    """A daemon's credential: *token*, the identity in *cert*/*key*, else (with a token)
    its own self-signed one beside the user's default token (made on first start).
    *default*: the token is the user's default one (see :class:`Credential`)."""
    if cert is not None:
        identity: Identity | None = load_identity(cert, key)
    elif token is not None:
        identity = node_identity(private_dir())
    else:
        identity = None
    return Credential(token, identity, ca, default=default)
