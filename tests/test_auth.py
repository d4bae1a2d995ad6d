"""The cluster token and TLS, against real worker processes on 127.0.0.1."""

from __future__ import annotations

import logging
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import vaccelray
from tests.conftest import start_worker
from tests.processes import Proc
from vaccelray.auth import TokenCheck, is_loopback, load_token, token_metadata
from vaccelray.client import Client
from vaccelray.errors import ConnectError, RPCError, StatusCode, TransportError
from vaccelray.protocol.services import SUBMIT
from vaccelray.transport import connect
from vaccelray.transport.server import CallContext
from vaccelray.worker.noop import NOOP_TAG

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def guarded(token_file: Path) -> Iterator[Proc]:
    worker = start_worker(
        "-a",
        "tcp://127.0.0.1:0",
        "--backend",
        "noop",
        "--pool-size",
        "1",
        "--token-file",
        str(token_file),
    )
    yield worker
    worker.stop()


def add(a: int, b: int) -> int:
    return a + b


def test_loopback_rules() -> None:
    for address in (
        "tcp://127.0.0.1:1",
        "tcp://[::1]:1",
        "tcp://localhost:1",
        "unix:///x",
        "unix:@y",
    ):
        assert is_loopback(address), address
    for address in ("tcp://0.0.0.0:1", "tcp://10.1.2.3:1", "vsock://3:1", "tcp://example.test:1"):
        assert not is_loopback(address), address
    # The task service always asks a credential, loopback included.
    assert TokenCheck().required


def test_a_check_without_token_refuses_every_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "vaccelray.auth")
    check = TokenCheck(None)
    ctx = CallContext(
        SUBMIT.service, SUBMIT.method, token_metadata("anything"), None, "10.0.0.9:5000"
    )
    with pytest.raises(RPCError) as info:
        check.check(ctx)
    assert info.value.code == StatusCode.UNAUTHENTICATED
    reason = info.value.message.removeprefix("worker ?: ")  # an origin nobody asked
    assert reason.startswith("this worker has no cluster token")
    assert [r.getMessage() for r in caplog.records] == [
        f"Refused vaccelray.v1.Worker/Submit from 10.0.0.9:5000: {reason}"
    ]


def test_load_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VACCELRAY_TOKEN", "from-env")
    assert load_token("given") == "given"
    assert load_token() == "from-env"
    (tmp_path / "t").write_text("from-file\nignored\n")
    (tmp_path / "t").chmod(0o600)
    assert load_token(None, tmp_path / "t") == "from-file"


def test_tasks_need_the_token_but_vaccel_calls_stay_open(guarded: Proc) -> None:
    with Client(guarded.address, token="wrong") as client:
        with pytest.raises(vaccelray.AuthenticationError, match="wrong cluster token"):
            client.submit(add, 1, 2).result(timeout=10)
        assert client.classify(b"\xff\xd8") == NOOP_TAG  # data-only vAccel op: open
    with Client(guarded.address, token=TOKEN) as client:
        assert client.submit(add, 1, 2).result(timeout=30) == 3
    assert "Refused vaccelray.v1.Worker/RegisterFunction" in guarded.text()


@pytest.mark.anyio
async def test_refused_before_the_payload_is_even_decoded(guarded: Proc) -> None:
    async with connect(guarded.address) as conn:
        for metadata in ((), token_metadata("nope")):
            with pytest.raises(RPCError) as info:
                await conn.call(
                    SUBMIT.service, SUBMIT.method, b"\xc1 not msgpack", metadata=metadata
                )
            assert info.value.code == StatusCode.UNAUTHENTICATED
        with pytest.raises(RPCError) as info:
            await conn.call(SUBMIT.service, SUBMIT.method, b"\xc1", metadata=token_metadata(TOKEN))
        assert info.value.code == StatusCode.INVALID_ARGUMENT


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_and_protected_vaccel(tmp_path: Path, token_file: Path) -> None:
    cert, key = _self_signed(tmp_path)
    worker = start_worker(
        "-a",
        "tcp://127.0.0.1:0",
        "--backend",
        "noop",
        "--pool-size",
        "1",
        "--token-file",
        str(token_file),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--protect-vaccel",
    )
    try:
        with Client(worker.address, token=TOKEN, tls=str(cert)) as client:
            assert client.submit(add, 2, 3).result(timeout=30) == 5
            assert client.classify(b"\xff\xd8") == NOOP_TAG
        with (
            Client(worker.address, tls=str(cert)) as client,
            pytest.raises(vaccelray.AuthenticationError),
        ):
            client.classify(b"\xff\xd8")
        no_tls = (ConnectError, TransportError, vaccelray.WorkerLostError)
        with (
            pytest.raises(no_tls),
            Client(worker.address, token=TOKEN, connect_timeout=2) as client,
        ):
            client.submit(add, 1, 1).result(timeout=5)
    finally:
        worker.stop()


def test_protect_keeps_each_method_kind_and_checks_first() -> None:
    import asyncio

    from vaccelray.auth import protect
    from vaccelray.transport.server import Method, Service

    calls: list[str] = []

    def inline(payload: bytes, ctx: CallContext) -> bytes:
        calls.append("inline")
        return payload

    def future(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        calls.append("future")
        raise AssertionError("not reached without the token")

    service = Service("s", {"I": Method(inline, inline=True), "F": Method(future, future=True)})
    (guarded,) = protect([service], TokenCheck("t0ken", required=True))
    assert (guarded.methods["I"].inline, guarded.methods["F"].future) == (True, True)
    ctx = CallContext("s", "F", (), None, "peer")
    for name in ("I", "F"):
        with pytest.raises(RPCError) as info:
            guarded.methods[name].handler(b"x", ctx)
        assert info.value.code == StatusCode.UNAUTHENTICATED
    assert calls == []
    ctx.metadata = token_metadata("t0ken")
    assert guarded.methods["I"].handler(b"x", ctx) == b"x"
    # A check that is not required leaves the services as they are.
    assert protect([service], TokenCheck(required=False)) == [service]
    TokenCheck(required=False).check(CallContext("s", "F", (), None, "peer"))


def test_server_tls_contexts_load_the_pair_or_say_why(tmp_path: Path) -> None:
    from vaccelray.auth import AuthError, server_ssl_context

    cert, key = _self_signed(tmp_path)
    context = server_ssl_context(str(cert), str(key))
    assert context.verify_mode == ssl.CERT_NONE  # a server asks no client certificate
    both = tmp_path / "both.pem"
    both.write_text(key.read_text() + cert.read_text())
    assert server_ssl_context(str(both)).verify_mode == ssl.CERT_NONE
    with pytest.raises(AuthError, match=f"cannot load TLS certificate {cert}: "):
        server_ssl_context(str(cert))  # no key in it
    missing = tmp_path / "missing.pem"
    with pytest.raises(AuthError, match=f"cannot load TLS certificate {missing}: "):
        server_ssl_context(str(missing), str(key))


def test_client_tls_contexts(tmp_path: Path) -> None:
    from vaccelray.auth import AuthError, client_ssl_context

    assert client_ssl_context(None) is None
    assert client_ssl_context(False) is None
    system = client_ssl_context(True)
    assert system is not None
    assert system.verify_mode == ssl.CERT_REQUIRED
    assert system.check_hostname
    given = ssl.create_default_context()
    assert client_ssl_context(given) is given
    cert, _ = _self_signed(tmp_path)
    pinned = client_ssl_context(str(cert))
    assert pinned is not None
    assert [c["subject"] for c in pinned.get_ca_certs()] == [((("commonName", "127.0.0.1"),),)]
    missing = tmp_path / "missing.pem"
    with pytest.raises(AuthError, match=f"^cannot load TLS CA file {missing}: "):
        client_ssl_context(str(missing))
