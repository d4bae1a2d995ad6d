"""TLS: each daemon's key pair, the contexts of both ends, and an optional cluster CA.

Every daemon holding a cluster token serves TLS beside plaintext on each
listener (a listener tells them apart by the first byte, see
``vaccelray.transport.server``). Its key pair is its **node identity**: a
self-signed certificate made on first start (``node.pem``, key and
certificate, mode 0600) in the directory of the user's default token, or
the ``--tls-cert``/``--tls-key`` an operator gives (one issued by a cluster
CA made with ``vaccelray cert``).

Without a CA nothing is verified by TLS itself: the peer is authenticated
by the membership proof (:mod:`vaccelray.membership`), which binds the
certificates of the very connection, so a self-signed certificate is
enough and a relay in the middle is caught. With a CA (``--tls-ca``) the
peer's certificate must also chain to it; certificates name a node (its
common name), never an address, so no host name is checked.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vaccelray.errors import VaccelrayError

__all__ = [
    "NODE_FILE",
    "Identity",
    "TlsError",
    "client_context",
    "fingerprint",
    "issue_certificate",
    "make_ca",
    "node_identity",
    "server_context",
]

#: The node identity's file (key and self-signed certificate) beside the default token.
NODE_FILE: Final = "node.pem"
_DAYS: Final = 3650
_NODE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TlsError(VaccelrayError):
    """A certificate, key or CA that cannot be made or used."""


def fingerprint(der: bytes | None) -> bytes:
    """SHA-256 of a DER certificate; empty for no certificate."""
    return hashlib.sha256(der).digest() if der else b""


@dataclass(frozen=True)
class Identity:
    """A node's certificate (chain) and key, PEM files, and the certificate's fingerprint."""

    cert: str
    key: str | None
    fingerprint: bytes


_PEM_CERT: Final = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_identity(cert: str, key: str | None = None) -> Identity:
    """The identity in *cert* (and *key*, when not in the same file).

    Read with the ssl module alone: a daemon loads ``cryptography`` only to
    make a key pair (~10 MiB of memory it would otherwise keep).
    """
    try:
        with open(cert) as f:
            found = _PEM_CERT.search(f.read())
        if found is None:
            raise ValueError("no PEM certificate in it")
        der = ssl.PEM_cert_to_DER_cert(found.group(0))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise TlsError(f"cannot load TLS certificate {cert}: {exc}") from exc
    return Identity(cert, key, fingerprint(der))


def _write_private(path: Path, data: bytes) -> None:
    """Write *data* to *path* with mode 0600, never replacing a file another made meanwhile."""
    spare = path.with_name(f".{path.name}-{secrets.token_hex(4)}")
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with contextlib.suppress(FileExistsError):  # another daemon made it first: theirs
            os.link(spare, path)
    finally:
        os.unlink(spare)


def _new_key_pem() -> tuple[object, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, pem


def _certificate(
    name: str, key: object, *, issuer: tuple[str, object] | None = None, ca: bool = False
) -> bytes:
    """A PEM certificate for *name*'s *key*, self-signed unless *issuer* (name, key) is given."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM)


def node_identity(directory: Path) -> Identity:
    """This node's self-signed identity in *directory* (a private one), made on first use."""
    path = directory / NODE_FILE
    if not path.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key, key_pem = _new_key_pem()
        name = f"vaccelray-node-{secrets.token_hex(8)}"
        _write_private(path, key_pem + _certificate(name, key))
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise TlsError(f"{path} is open to other users (mode {mode & 0o777:04o}): run chmod 600")
    return load_identity(str(path))


def make_ca(directory: Path, name: str = "vaccelray cluster CA") -> Path:
    """A cluster CA in *directory*: ``ca.pem`` (give it to every node) and ``ca-key.pem`` (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() or key_path.exists():
        raise TlsError(f"{directory} holds a CA already ({cert_path.name}): remove it first")
    key, key_pem = _new_key_pem()
    _write_private(key_path, key_pem)
    cert_path.write_bytes(_certificate(name, key, ca=True))
    return cert_path


def issue_certificate(ca_directory: Path, name: str, out: Path) -> Path:
    """Key and certificate of node *name*, signed by the CA in *ca_directory*, at *out* (0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    if not _NODE_NAME.fullmatch(name):
        raise TlsError(f"bad node name {name!r}: 1 to 64 letters, digits, '.', '_' or '-'")
    if out.exists():
        raise TlsError(f"{out} exists: remove it first")
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_directory / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key(
            (ca_directory / "ca-key.pem").read_bytes(), None
        )
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot load the CA in {ca_directory}: {exc}") from exc
    ca_name = str(ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    key, key_pem = _new_key_pem()
    _write_private(out, key_pem + _certificate(name, key, issuer=(ca_name, ca_key)))
    return out


def _context(purpose: ssl.Purpose, identity: Identity | None, ca: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # certificates name nodes, not addresses
    try:
        if identity is not None:
            context.load_cert_chain(identity.cert, identity.key)
        if ca is not None:
            context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        what = f"TLS CA file {ca}" if identity is None else f"TLS certificate {identity.cert}"
        raise TlsError(f"cannot load {what}: {exc}") from exc
    return context


def server_context(identity: Identity, ca: str | None = None) -> ssl.SSLContext:
    """A listener's TLS context: *identity*; with *ca*, clients that show a certificate
    must have one the CA signed (clients without one prove membership alone)."""
    context = _context(ssl.Purpose.CLIENT_AUTH, identity, ca)
    context.verify_mode = ssl.CERT_OPTIONAL if ca is not None else ssl.CERT_NONE
    # No session tickets: our clients keep their connections and never resume, and an
    # idle connection holds less (the TLS 1.3 default is two per handshake).
    context.num_tickets = 0
    return context


def client_context(identity: Identity | None = None, ca: str | None = None) -> ssl.SSLContext:
    """A connection's TLS context: without *ca* any server certificate is taken (the
    membership proof authenticates it); with *ca* it must chain to the CA."""
    context = _context(ssl.Purpose.SERVER_AUTH, identity, ca)
    context.verify_mode = ssl.CERT_REQUIRED if ca is not None else ssl.CERT_NONE
    return context
