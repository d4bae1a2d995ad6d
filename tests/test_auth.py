"""The cluster token and TLS, against real worker processes on 127.0.0.1."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import vaccelray
from tests.conftest import start_worker
from tests.processes import Proc, scheduler_argv, start_daemon
from vaccelray.auth import TokenCheck, is_loopback, load_token, token_metadata
from vaccelray.client import Client
from vaccelray.errors import RPCError, StatusCode
from vaccelray.membership import Credential
from vaccelray.protocol.services import CREATE_SESSION, SUBMIT
from vaccelray.transport import connect
from vaccelray.transport.client import open_client
from vaccelray.transport.server import CallContext, Link
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
    # A wrong token: the worker cannot prove holding the client's, so nothing is sent.
    with pytest.raises(vaccelray.AuthenticationError, match="did not prove it holds your"):
        Client(guarded.address, token="wrong")
    # Plaintext, no token: the data-only vAccel ops, not the task service.
    with Client(guarded.address, tls=False) as client:
        with pytest.raises(vaccelray.AuthenticationError, match="none was presented"):
            client.submit(add, 1, 2).result(timeout=10)
        assert client.classify(b"\xff\xd8") == NOOP_TAG  # data-only vAccel op: open
    with Client(guarded.address, token=TOKEN) as client:
        assert client.submit(add, 1, 2).result(timeout=30) == 3
    guarded.wait_for("Refused vaccelray.v1.Worker/RegisterFunction")  # lines come in batches


@pytest.mark.anyio
async def test_refused_before_the_payload_is_even_decoded(guarded: Proc) -> None:
    async with connect(guarded.address) as conn:  # plaintext: even the right token is refused
        for metadata in ((), token_metadata("nope"), token_metadata(TOKEN)):
            with pytest.raises(RPCError) as info:
                await conn.call(
                    SUBMIT.service, SUBMIT.method, b"\xc1 not msgpack", metadata=metadata
                )
            assert info.value.code == StatusCode.UNAUTHENTICATED
    member = Credential(TOKEN)
    conn = await open_client(
        guarded.address,
        ssl=member.ssl_for(guarded.address),
        setup=member.setup_for(guarded.address),
    )
    try:
        with pytest.raises(RPCError) as info:
            await conn.call(SUBMIT.service, SUBMIT.method, b"\xc1")
        assert info.value.code == StatusCode.INVALID_ARGUMENT
    finally:
        await conn.aclose()


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
        # Refused when it connects (the proof) or at the latest when it calls.
        with (
            pytest.raises(vaccelray.AuthenticationError),
            Client(worker.address, tls=str(cert)) as client,
        ):
            client.classify(b"\xff\xd8")
        # Without the CA, the worker's certificate is taken on the membership proof alone.
        with Client(worker.address, token=TOKEN) as client:
            assert client.submit(add, 1, 1).result(timeout=30) == 2
        # Plaintext: --protect-vaccel asks a proof there too, which plaintext cannot carry.
        with (
            pytest.raises(vaccelray.AuthenticationError),
            Client(worker.address, tls=False) as client,
        ):
            client.classify(b"\xff\xd8")
    finally:
        worker.stop()


@pytest.mark.anyio
async def test_a_flood_of_refused_calls_logs_one_line_and_a_count(token_file: Path) -> None:
    # A peer without the token decides how often it is refused, not how much is logged.
    worker = start_worker(
        "-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0",
        "--token-file", str(token_file), "--protect-vaccel",
    )  # fmt: skip
    refused = 200
    try:
        async with connect(worker.address) as conn:  # plaintext: no proof
            for _ in range(refused):
                with pytest.raises(RPCError) as info:
                    await conn.call(CREATE_SESSION.service, CREATE_SESSION.method, b"")
                assert info.value.code == StatusCode.UNAUTHENTICATED
    finally:
        worker.stop()  # the refusals held back are counted on the way out
    logged, counted = refusals_in(worker.lines)
    assert logged + counted == refused  # each one logged or counted...
    assert logged <= refused // 2  # ...and most counted (one line a 10 s window)


def refusals_in(lines: list[str]) -> tuple[int, int]:
    """How many refusals *lines* log one by one, and how many their summary lines count."""
    logged = sum("Refused" in line for line in lines)
    summary = re.compile(r"(\d+) more calls refused since the last report")
    return logged, sum(int(m.group(1)) for line in lines if (m := summary.search(line)))


def test_a_scheduler_with_protect_vaccel_serves_vaccel_calls_to_token_holders_only(
    token_file: Path,
) -> None:
    worker = start_worker(
        "-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0",
        "--token-file", str(token_file),
    )  # fmt: skip
    scheduler, address = start_daemon(
        scheduler_argv(
            "-a", "tcp://127.0.0.1:0", "--no-discover", "--worker", worker.address,
            "--token-file", str(token_file), "--protect-vaccel",
        )
    )  # fmt: skip
    try:
        with Client(address, token=TOKEN) as client:  # proves the token over TLS
            assert client.classify(b"\xff\xd8") == NOOP_TAG
        for _ in range(2):
            with (
                pytest.raises(vaccelray.AuthenticationError),
                Client(address, tls=False) as client,
            ):
                client.classify(b"\xff\xd8")
    finally:
        scheduler.stop()  # the second refusal is counted on the way out
        worker.stop()
    assert "Refused vaccel.VaccelAgent/CreateSession" in scheduler.text()
    assert sum(refusals_in(scheduler.lines)) == 2


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
    ctx.metadata = token_metadata("t0ken")  # sent over the network: never taken
    with pytest.raises(RPCError, match="never taken"):
        guarded.methods["I"].handler(b"x", ctx)
    ctx.link = Link(tls=True, member=True)  # proved on its TLS connection instead
    assert guarded.methods["I"].handler(b"x", ctx) == b"x"
    # A check that is not required leaves the services as they are.
    assert protect([service], TokenCheck(required=False)) == [service]
    TokenCheck(required=False).check(CallContext("s", "F", (), None, "peer"))
