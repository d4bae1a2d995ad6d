"""TLS on every hop: node identities, the cluster CA command, and whole clusters over TLS.

Client -> scheduler -> worker with real processes on 127.0.0.1, through the
CLI and the Python API: with the cluster token alone (each daemon's own
self-signed key pair, the membership proof authenticates), and with a
cluster CA made by ``vaccelray cert``. Plaintext still reaches the vAccel
agent service on the same listeners.
"""

from __future__ import annotations

import hashlib
import json
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import vaccelray
from tests.conftest import start_worker
from tests.processes import REPO, Proc, child_env, scheduler_argv, start_daemon
from tests.waiting import eventually
from vaccelray.agent_client import AgentClient
from vaccelray.cli import main
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol.services import SUBMIT
from vaccelray.tls import TlsError, client_context, load_identity, node_identity, server_context
from vaccelray.transport.client import connect
from vaccelray.transport.server import Method, Server, Service, serve
from vaccelray.worker.noop import NOOP_TAG

TOKEN = "a cluster token for the TLS tests"


def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


# -- identities ---------------------------------------------------------------------------


def _name(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value)


def test_a_node_identity_is_made_once_private_and_kept(tmp_path: Path) -> None:
    first = node_identity(tmp_path / "state")
    path = tmp_path / "state" / "node.pem"
    assert first.cert == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert _name(path).startswith("vaccelray-node-")
    assert len(first.fingerprint) == 32
    assert node_identity(tmp_path / "state") == first  # the same key pair at every start
    assert node_identity(tmp_path / "other").fingerprint != first.fingerprint
    path.chmod(0o644)
    with pytest.raises(TlsError, match="open to other users"):
        node_identity(tmp_path / "state")


def test_a_certificate_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsError, match=f"cannot load TLS certificate {missing}"):
        load_identity(str(missing))


# -- the cert command ---------------------------------------------------------------------


def _cert(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["cert", *args])
    return result.exit_code, result.output


def test_the_cert_command_makes_a_ca_and_node_certificates_it_signed(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    code, out = _cert("ca", str(ca_dir), "--json")
    assert code == 0, out
    made = json.loads(out)
    assert made == {"cert": str(ca_dir / "ca.pem"), "key": str(ca_dir / "ca-key.pem")}
    assert stat.S_IMODE((ca_dir / "ca-key.pem").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    node = tmp_path / "gpu1.pem"
    code, out = _cert("node", "--ca", str(ca_dir), "gpu1", "-o", str(node), "--json")
    assert code == 0, out
    assert json.loads(out) == {"name": "gpu1", "cert": str(node)}
    assert stat.S_IMODE(node.stat().st_mode) == 0o600
    issued = x509.load_pem_x509_certificate(node.read_bytes())
    issued.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert _name(node) == "gpu1"
    assert (
        load_identity(str(node)).fingerprint
        == hashlib.sha256(issued.public_bytes(serialization.Encoding.DER)).digest()
    )
    assert not issued.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Nothing is overwritten, and bad input is one line with exit code 2.
    code, out = _cert("ca", str(ca_dir))
    assert (code, out.strip()) == (
        2,
        f"vaccelray: {ca_dir} holds a CA already (ca.pem): remove it first",
    )
    code, out = _cert("node", "--ca", str(ca_dir), "gpu1", "-o", str(node))
    assert (code, out.strip()) == (2, f"vaccelray: {node} exists: remove it first")
    code, out = _cert("node", "--ca", str(ca_dir), "../etc", "-o", str(tmp_path / "x.pem"))
    assert code == 2
    assert "bad node name '../etc'" in out
    code, out = _cert("node", "--ca", str(tmp_path), "n1", "-o", str(tmp_path / "n1.pem"))
    assert code == 2
    assert f"cannot load the CA in {tmp_path}" in out


def test_the_cert_command_says_what_it_made(tmp_path: Path) -> None:
    code, out = _cert("ca", str(tmp_path / "ca"))
    assert code == 0
    assert "give it to every node: --tls-ca" in out
    code, out = _cert("node", "--ca", str(tmp_path / "ca"), "n1", "-o", str(tmp_path / "n1.pem"))
    assert code == 0
    assert f"--tls-cert {tmp_path / 'n1.pem'}" in out


# -- whole clusters -------------------------------------------------------------------------


@contextmanager
def cluster(token_file: Path, *tls: str, worker_tls: tuple[str, ...] = ()) -> Iterator[str]:
    """A worker and a scheduler in front of it (real processes); yields the scheduler."""
    worker = start_worker(
        "-a",
        "tcp://127.0.0.1:0",
        "--backend",
        "noop",
        "--pool-size",
        "1",
        "--token-file",
        str(token_file),
        *(worker_tls or tls),
    )
    sched: Proc | None = None
    try:
        sched, address = start_daemon(
            scheduler_argv(
                "-a",
                "tcp://127.0.0.1:0",
                "--worker",
                worker.address,
                "--no-discover",
                "--token-file",
                str(token_file),
                *tls,
            )
        )
        yield address
    finally:
        if sched is not None:
            sched.stop()
        worker.stop()


def _submit_cli(address: str, token_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vaccelray",
            "submit",
            "run",
            "operator:add",
            "2",
            "3",
            "--address",
            address,
            "--token-file",
            str(token_file),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=120,  # liveness only
        check=False,
    )


def test_a_token_file_alone_gives_tls_on_every_hop_cli_and_api(token_file: Path) -> None:
    with cluster(token_file) as address:
        done = _submit_cli(address, token_file)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "5"
        with vaccelray.Client(address, token=TOKEN) as client:
            assert client.submit(add, 20, 22).result(timeout=60) == 42
        # The same listener still serves plaintext: the vAccel agent (forwarded to the
        # worker over TLS), but not tasks.
        anyio.run(_plaintext_agent_but_no_tasks, address)


async def _plaintext_agent_but_no_tasks(address: str) -> None:
    async with connect(address) as conn:
        agent = AgentClient(conn)
        session = await agent.create_session()
        assert await agent.classify(session, b"\xff\xd8") == NOOP_TAG
        with pytest.raises(RPCError) as info:
            await conn.call(SUBMIT.service, SUBMIT.method, b"")
        assert info.value.code == StatusCode.UNAUTHENTICATED


def test_a_cluster_ca_gives_each_node_its_identity(tmp_path: Path, token_file: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert _cert("ca", str(ca_dir))[0] == 0
    for name in ("worker1", "sched"):
        assert _cert("node", "--ca", str(ca_dir), name, "-o", str(tmp_path / f"{name}.pem"))[0] == 0
    ca = str(ca_dir / "ca.pem")
    sched_tls = ("--tls-cert", str(tmp_path / "sched.pem"), "--tls-ca", ca)
    worker_tls = ("--tls-cert", str(tmp_path / "worker1.pem"), "--tls-ca", ca)
    with cluster(token_file, *sched_tls, worker_tls=worker_tls) as address:
        done = _submit_cli(address, token_file, "--tls-ca", ca)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "5"
        with vaccelray.Client(address, token=TOKEN, tls=ca) as client:
            assert client.submit(add, 1, 2).result(timeout=60) == 3
        # A client that trusts another CA does not take the scheduler's certificate.
        other = tmp_path / "other"
        assert _cert("ca", str(other))[0] == 0
        refused = _submit_cli(address, token_file, "--tls-ca", str(other / "ca.pem"))
        assert refused.returncode == 3
        assert "TLS handshake failed (certificate" in refused.stderr


def test_a_scheduler_with_a_ca_passes_over_a_worker_it_did_not_sign(
    tmp_path: Path, token_file: Path
) -> None:
    ca_dir = tmp_path / "ca"
    assert _cert("ca", str(ca_dir))[0] == 0
    assert _cert("node", "--ca", str(ca_dir), "sched", "-o", str(tmp_path / "s.pem"))[0] == 0
    sched_tls = ("--tls-cert", str(tmp_path / "s.pem"), "--tls-ca", str(ca_dir / "ca.pem"))
    # The worker holds the token but shows its own self-signed certificate.
    with cluster(token_file, *sched_tls, worker_tls=("--log-level", "info")) as address:
        done = _submit_cli(address, token_file, "--tls-ca", str(ca_dir / "ca.pem"))
        assert done.returncode == 1
        assert "no worker" in done.stderr.lower() or "unavailable" in done.stderr.lower()


def test_the_daemons_document_their_tls_options() -> None:
    for command in ("worker", "scheduler"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        for option in ("--tls-cert", "--tls-key", "--tls-ca"):
            assert option in result.output, (command, option)
    assert "--tls-ca" in CliRunner().invoke(main, ["submit", "run", "--help"]).output


# -- the listener: sniff and handshake ------------------------------------------------------


@asynccontextmanager
async def tls_listener(tmp_path: Path, **options: Any) -> AsyncIterator[Server]:
    identity = node_identity(tmp_path / "node")
    echo = Service("test.Echo", {"Echo": Method(lambda p, ctx: p, inline=True)})
    async with serve(
        [echo], ["tcp://127.0.0.1:0"], ssl=server_context(identity), grace=0.5, **options
    ) as server:
        yield server


def _closed_by_peer(address: str, first: bytes) -> bytes:
    """Send *first*, then read until the server closes the connection."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(first)
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
        return got


@pytest.mark.anyio
async def test_a_stalled_tls_handshake_is_closed_and_frees_its_slot(tmp_path: Path) -> None:
    async with tls_listener(tmp_path, frame_timeout=0.2, max_connections=1) as server:
        address = server.addresses[0]
        # A handshake record that never completes: closed at the frame timeout, no answer.
        assert await anyio.to_thread.run_sync(_closed_by_peer, address, b"\x16\x03\x01") == b""
        await eventually(lambda: server.connections == 0, "the slot given back")
        # The one slot serves again: a whole TLS client echoes.
        async with connect(address, ssl=client_context()) as client:
            assert await client.call("test.Echo", "Echo", b"hi") == b"hi"
            assert client.peer_cert is not None
        # And plaintext on the same listener.
        async with connect(address) as client:
            assert await client.call("test.Echo", "Echo", b"plain") == b"plain"
            assert client.peer_cert is None


@pytest.mark.anyio
async def test_garbage_after_a_tls_first_byte_is_dropped(tmp_path: Path) -> None:
    async with tls_listener(tmp_path) as server:
        # 0x16, then not a TLS record: the handshake fails, the connection is closed.
        junk = b"\x16" + b"\xff" * 64
        answer = await anyio.to_thread.run_sync(_closed_by_peer, server.addresses[0], junk)
        assert b"\xff" * 8 not in answer  # nothing of ours echoed, at most a TLS alert
        await eventually(lambda: server.connections == 0, "dropped")
        async with connect(server.addresses[0], ssl=client_context()) as client:
            assert await client.call("test.Echo", "Echo", b"ok") == b"ok"


@pytest.mark.anyio
async def test_tls_carries_large_and_pipelined_calls_whole(tmp_path: Path) -> None:
    async with (
        tls_listener(tmp_path) as server,
        connect(server.addresses[0], ssl=client_context()) as client,
    ):
        # Larger than the shared read buffer (256 KiB): delivered in several goes.
        big = bytes(range(256)) * 4096  # 1 MiB
        assert await client.call("test.Echo", "Echo", big) == big
        # Many calls in flight: their records arrive together, each answered once.
        payloads = [str(i).encode() * (i % 7 + 1) for i in range(200)]
        answers: dict[int, bytes] = {}

        async def one(i: int) -> None:
            answers[i] = await client.call("test.Echo", "Echo", payloads[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(payloads)):
                tg.start_soon(one, i)
        assert [answers[i] for i in range(len(payloads))] == payloads
