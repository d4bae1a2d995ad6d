"""The membership proof on the wire: msgspec MessagePack structs and the transcript (no I/O).

``vaccelray.v1.Membership`` has two methods, called once each, first on a
TLS connection, before anything else:

1. ``Hello``: the client sends a fresh nonce; the server answers its own
   nonce and its proof: ``HMAC(token, "server" | transcript)``.
2. The client checks that proof (a server without the token cannot make
   it), then ``Prove``: ``HMAC(token, "client" | transcript)``.

The transcript holds both nonces and the SHA-256 fingerprints of the
server's and the client's TLS certificates *as each end sees this very
connection*: a relay that terminates TLS with its own certificate makes
the two ends compute different transcripts, so neither proof passes. The
token itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

import msgspec

__all__ = [
    "HELLO_METHOD",
    "MEMBERSHIP_SERVICE",
    "NONCE_SIZE",
    "PROOF_SIZE",
    "PROVE_METHOD",
    "Challenge",
    "Hello",
    "Proof",
    "Proven",
    "proof",
]

MEMBERSHIP_SERVICE: Final = "vaccelray.v1.Membership"
HELLO_METHOD: Final = "Hello"
PROVE_METHOD: Final = "Prove"
NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32  # HMAC-SHA256
_VERSION: Final = b"vaccelray membership v1"


class Hello(msgspec.Struct, frozen=True, kw_only=True):
    """The client's fresh nonce."""

    nonce: bytes = b""


class Challenge(msgspec.Struct, frozen=True, kw_only=True):
    """The server's fresh nonce and its proof over the transcript."""

    nonce: bytes = b""
    proof: bytes = b""


class Proof(msgspec.Struct, frozen=True, kw_only=True):
    """The client's proof over the transcript."""

    proof: bytes = b""


class Proven(msgspec.Struct, frozen=True, kw_only=True):
    """The server took the client's proof: the connection is a member's."""


def proof(
    token: str,
    role: bytes,
    client_nonce: bytes,
    server_nonce: bytes,
    server_cert: bytes,
    client_cert: bytes,
) -> bytes:
    """``HMAC-SHA256(token, version | role | nonces | certificate fingerprints)``.

    *role* is ``b"server"`` or ``b"client"`` (a proof of one side is never
    one of the other); the fingerprints are 32 bytes, or empty for a side
    that showed no certificate; every part is length-prefixed.
    """
    mac = hmac.new(token.encode(), digestmod=hashlib.sha256)
    for part in (_VERSION, role, client_nonce, server_nonce, server_cert, client_cert):
        mac.update(len(part).to_bytes(2, "big") + part)
    return mac.digest()
