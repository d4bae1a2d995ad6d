"""Credentials by default: who may run a task, on each kind of endpoint, and who says no.

The cross-user tests run the client as ``nobody`` (a subprocess with another
uid) against a worker of this process's user; each has its positive control:
the same call with the token, or as the worker's own user, succeeds.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import start_worker
from tests.netns import Topology, require_netns
from tests.processes import Proc, child_env, worker_argv
from vaccelray.agent_client import AgentClient
from vaccelray.auth import (
    AuthError,
    ExecPolicy,
    TokenCheck,
    client_token,
    daemon_token,
    default_token_path,
    read_token_file,
    token_metadata,
)
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.services import GENOP, genop_loads_library
from vaccelray.testing import connected_client
from vaccelray.transport.server import CallContext, Link, Origin
from vaccelray.worker.agent import Agent
from vaccelray.worker.noop import NoopBackend

NOBODY = 65534
TOKEN = "correct horse battery staple"

#: A task client: prints "ok RESULT", "refused MESSAGE" or "error TYPE MESSAGE". With a
#: uid as its third argument, it becomes that user once everything is imported (the
#: interpreter may live where only its owner can read).
CLIENT = """
import os, sys
import vaccelray
import vaccelray.client.core, vaccelray.functions, vaccelray.auth, cloudpickle
import anyio._backends._asyncio, encodings.idna
from vaccelray.client import Client

def add(a, b):
    return a + b

address, token, uid = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.environ.pop("XDG_RUNTIME_DIR", None)  # the user's own: it has none
    os.environ.pop("VACCELRAY_TOKEN", None)
try:
    with Client(address, token=token, connect_timeout=10) as client:
        print("ok", client.submit(add, 2, 3).result(timeout=60))
except vaccelray.AuthenticationError as exc:
    print("refused", exc)
except Exception as exc:
    print("error", type(exc).__name__, exc)
"""


def run_client(address: str, token: str = "", *, as_nobody: bool) -> str:
    """Run :data:`CLIENT` as ``nobody``, or as this process's user."""
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, address, token, str(NOBODY if as_nobody else -1)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd="/",
        timeout=120,  # liveness only
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def other_users_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (for socket files another user connects to)."""
    path = Path(tempfile.mkdtemp(prefix="vaccelray-creds-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


# -- another user ---------------------------------------------------------------------


def test_another_user_needs_the_token_on_every_endpoint_kind(
    shared_dir: Path, token_file: Path
) -> None:
    other_users_possible()
    name = f"vaccelray-creds-{secrets.token_hex(4)}"
    private = shared_dir / "private.sock"
    worker = start_worker(
        "-a",
        "tcp://127.0.0.1:0",
        "-a",
        f"unix:@{name}",
        "-a",
        f"unix://{private}",
        "--backend",
        "noop",
        "--pool-size",
        "1",
        "--token-file",
        str(token_file),
    )
    try:
        tcp, abstract = worker.address, f"unix:@{name}"
        for address in (tcp, abstract):
            refused = run_client(address, as_nobody=True)
            assert refused.startswith("refused "), (address, refused)
            assert f"worker {address}: " in refused
            assert "--token-file FILE or VACCELRAY_TOKEN" in refused
            assert run_client(address, TOKEN, as_nobody=True) == "ok 5", address
            assert run_client(address, "wrong", as_nobody=True).startswith("refused ")
        assert "uid 65534 is not this worker's user (uid 0)" in run_client(abstract, as_nobody=True)
        assert "none was presented" in run_client(tcp, as_nobody=True)
        # A path socket is its owner's only: another user cannot even connect...
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
        denied = run_client(f"unix://{private}", TOKEN, as_nobody=True)
        assert denied.startswith("error ConnectError")
        assert "Permission denied" in denied
        # ...while the worker's own user needs no token there, nor on the abstract socket.
        assert run_client(f"unix://{private}", as_nobody=False) == "ok 5"
        assert run_client(abstract, as_nobody=False) == "ok 5"
    finally:
        worker.stop()
    assert "Refused vaccelray.v1.Worker/RegisterFunction" in worker.text()


def test_an_open_path_socket_still_asks_other_users_the_token(
    shared_dir: Path, token_file: Path
) -> None:
    other_users_possible()
    path = shared_dir / "open.sock"
    worker = start_worker(
        "-a",
        f"unix://{path}",
        "--socket-mode",
        "666",
        "--backend",
        "noop",
        "--pool-size",
        "1",
        "--token-file",
        str(token_file),
    )
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        refused = run_client(f"unix://{path}", as_nobody=True)
        assert refused.startswith(f"refused add refused: worker unix://{path}: ")
        assert "uid 65534 is not this worker's user" in refused
        assert run_client(f"unix://{path}", TOKEN, as_nobody=True) == "ok 5"
    finally:
        worker.stop()


def test_same_user_zero_config_over_loopback_tcp() -> None:
    worker = start_worker("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "1")
    try:
        path = default_token_path()
        assert f"Made the default token {path}" in worker.text() or path.exists()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert run_client(worker.address, as_nobody=False) == "ok 5"
        if os.geteuid() == 0:
            # Another user has no default token of this user's, and is told how to get it.
            refused = run_client(worker.address, as_nobody=True)
            assert refused.startswith(f"refused add refused: worker {worker.address}: ")
            assert f"others pass a copy of {path} with --token-file FILE" in refused
    finally:
        worker.stop()


# -- token files ------------------------------------------------------------------------


def test_a_token_file_open_to_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(AuthError) as info:
            read_token_file(path)
        assert str(info.value) == (
            f"token file {path} is open to other users (mode {mode:04o}): run chmod 600 {path}"
        )
    path.chmod(0o600)
    assert read_token_file(path) == "s3cret"
    path.chmod(0o400)
    assert read_token_file(path) == "s3cret"
    path.chmod(0o644)
    proc = Proc(worker_argv("-a", "tcp://127.0.0.1:0", "--token-file", str(path)))
    assert proc.process.wait(60) == 2
    proc.stop()
    assert proc.lines[-1:] == [
        f"vaccelray: token file {path} is open to other users (mode 0644): run chmod 600 {path}"
    ]


def test_empty_and_missing_token_files(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(AuthError, match=f"cannot read token file {path}: No such file"):
        read_token_file(path)
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(AuthError, match=f"token file {path} is empty"):
        read_token_file(path)
    path.write_bytes(b"\xff\xfe token\n")
    with pytest.raises(AuthError, match=f"cannot read token file {path}: 'utf-8' codec"):
        read_token_file(path)


def test_default_token_is_made_once_private_and_found_by_loopback_tcp_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("VACCELRAY_TOKEN", raising=False)
    path = tmp_path / "vaccelray" / "token"
    assert default_token_path() == path
    assert client_token("tcp://127.0.0.1:8194") is None  # no daemon made one yet
    token, where = daemon_token()
    assert where == path
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert daemon_token() == (token, path)  # a second daemon shares it
    assert daemon_token("given") == ("given", None)
    assert [p.name for p in path.parent.iterdir()] == ["token"]
    # Presented to loopback TCP only: never to another host, nor where the uid says it all.
    assert client_token("tcp://127.0.0.1:8194") == token
    assert client_token("tcp://[::1]:8194") == token
    for elsewhere in ("tcp://10.0.0.5:8194", "unix:@w", "unix:///run/w.sock", "vsock://3:1"):
        assert client_token(elsewhere) is None, elsewhere
    assert client_token("tcp://10.0.0.5:8194", "given") == "given"
    given = tmp_path / "given"
    given.write_text("from-file\n")
    given.chmod(0o600)
    assert client_token("tcp://10.0.0.5:8194", token_file=given) == "from-file"
    monkeypatch.setenv("VACCELRAY_TOKEN", "env")
    assert client_token("tcp://127.0.0.1:8194") == "env"
    monkeypatch.delenv("VACCELRAY_TOKEN")
    path.chmod(0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        client_token("tcp://127.0.0.1:8194")
    with pytest.raises(AuthError, match="chmod 600"):
        daemon_token()


def test_the_first_daemon_says_it_made_the_default_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vaccelray.auth")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    daemon_token()
    daemon_token()
    made = [r.getMessage() for r in caplog.records if r.name == "vaccelray.auth"]
    assert made == [f"Made the default token {default_token_path()} (mode 0600)"]


def test_two_daemons_making_the_default_token_at_once_share_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = tmp_path / "vaccelray" / "token"
    link = os.link

    def beaten(spare: str, target: str) -> None:
        # Another daemon's token lands first; linking ours over it then fails.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"the other daemon's\n")
        os.close(fd)
        link(spare, target)

    monkeypatch.setattr(os, "link", beaten)
    assert daemon_token() == ("the other daemon's", path)
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # ours was removed


def test_default_token_without_a_runtime_dir_lives_in_a_private_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    home = tmp_path / f"vaccelray-{os.geteuid()}"
    assert default_token_path() == home / "token"
    token, where = daemon_token()
    assert where == home / "token"
    assert read_token_file(where) == token
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_a_runtime_dir_that_is_not_the_users_own_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fallback = tmp_path / f"vaccelray-{os.geteuid()}" / "token"
    for runtime in ("relative/dir", str(tmp_path / "missing")):
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        assert default_token_path() == fallback
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"  # another user's, left in the environment by su
        theirs.mkdir()
        os.chown(theirs, NOBODY, NOBODY)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(theirs))
        assert default_token_path() == fallback
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(mine))
    assert default_token_path() == mine / "vaccelray" / "token"


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_token_dir_others_may_use_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "vaccelray").mkdir(mode=0o700)
    (tmp_path / "vaccelray").chmod(mode)
    with pytest.raises(AuthError) as info:
        daemon_token()
    assert f"is not a private directory of uid {os.geteuid()}" in str(info.value)
    assert f"mode {mode:04o}" in str(info.value)
    assert not (tmp_path / "vaccelray" / "token").exists()


def test_a_token_dir_that_cannot_be_made_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "vaccelray").write_text("a file where the directory goes")
    with pytest.raises(AuthError) as info:
        daemon_token()
    assert str(info.value) == (
        f"cannot make the token directory {tmp_path / 'vaccelray'}: File exists"
    )


def test_a_token_dir_that_is_a_symlink_or_another_users_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "vaccelray").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AuthError, match="is not a private directory"):
        daemon_token()
    if os.geteuid() == 0:
        (tmp_path / "vaccelray").unlink()
        (tmp_path / "vaccelray").mkdir(mode=0o700)
        os.chown(tmp_path / "vaccelray", NOBODY, NOBODY)
        with pytest.raises(AuthError, match=f"owner uid {NOBODY}"):
            daemon_token()


# -- the check itself -------------------------------------------------------------------


def _ctx(origin: Origin, token: str | None = None) -> CallContext:
    return CallContext("s", "Submit", token_metadata(token), None, "peer", 1, origin)


def test_unix_peers_pass_by_uid_others_by_token() -> None:
    check = TokenCheck("t0ken", hop="scheduler", uid=1000)
    for uid in (1000, 0):
        check.check(_ctx(Origin("unix:@s", loopback=True, uid=uid)))
    check.check(_ctx(Origin("unix:@s", loopback=True, uid=1001), "t0ken"))
    cases = {
        Origin("unix:@s", loopback=True, uid=1001): "scheduler unix:@s: uid 1001 is not this "
        "scheduler's user (uid 1000) and presented no cluster token: pass it with "
        "--token-file FILE or VACCELRAY_TOKEN",
        Origin("tcp://127.0.0.1:8190", loopback=True): "scheduler tcp://127.0.0.1:8190: the "
        "cluster token is required and none was presented (over the network a vaccelray "
        "client holding it proves it over TLS, never sends it): pass it with --token-file "
        "FILE or VACCELRAY_TOKEN",
    }
    for origin, message in cases.items():
        with pytest.raises(RPCError) as info:
            check.check(_ctx(origin))
        assert info.value.code == StatusCode.UNAUTHENTICATED
        assert info.value.message == message
    # Over the network a token sent as metadata is refused, even the right one: it is
    # proved over TLS (a member's connection passes whatever it sends).
    for sent in ("nope", "t0ken"):
        with pytest.raises(RPCError) as info:
            check.check(_ctx(Origin("tcp://127.0.0.1:8190", loopback=True), sent))
        assert info.value.message == (
            "scheduler tcp://127.0.0.1:8190: a token sent over the network is never taken "
            "(it would cross the wire in clear): a vaccelray client holding it proves it "
            "over TLS instead"
        )
    member = _ctx(Origin("tcp://10.0.0.9:8190", loopback=False))
    member.link = Link(tls=True, member=True)
    check.check(member)
    member.link = Link(tls=True)  # TLS alone is not membership
    with pytest.raises(RPCError, match="none was presented"):
        check.check(member)
    # A token presented on a unix socket is checked like any other.
    with pytest.raises(RPCError, match="wrong cluster token"):
        check.check(_ctx(Origin("unix:@s", loopback=True, uid=1000), "nope"))


def test_a_daemon_with_no_token_serves_only_its_own_user_and_says_so() -> None:
    check = TokenCheck(None, uid=1000)
    check.check(_ctx(Origin("unix:@w", loopback=True, uid=1000)))
    with pytest.raises(RPCError) as info:
        check.check(_ctx(Origin("tcp://127.0.0.1:8194", loopback=True), "any"))
    assert info.value.message == (
        "worker tcp://127.0.0.1:8194: this worker has no cluster token, so it runs tasks only "
        "for its own user on a unix socket: start it with --token-file FILE or VACCELRAY_TOKEN"
    )


def test_the_default_token_refusal_says_where_it_is() -> None:
    check = TokenCheck("t", uid=0, token_path=Path("/run/user/0/vaccelray/token"))
    with pytest.raises(RPCError) as info:
        check.check(_ctx(Origin("tcp://0.0.0.0:8194", loopback=False)))
    assert info.value.message == (
        "worker tcp://0.0.0.0:8194: the cluster token is required and none was presented "
        "(over the network a vaccelray client holding it proves it over TLS, never sends "
        "it): its own user finds the token without flags, others pass a copy of "
        "/run/user/0/vaccelray/token with --token-file FILE or VACCELRAY_TOKEN"
    )


# -- exec -------------------------------------------------------------------------------


def _genop(op: int | bytes, session_id: int = 1) -> pb.GenopRequest:
    head = struct.pack("=I", op) if isinstance(op, int) else op
    request = pb.GenopRequest(session_id=session_id)
    for buf in (head, b"libexample.so\0", b"run\0"):
        request.read_args.add(buf=buf, size=len(buf))
    request.write_args.add(buf=b"\0" * 4, size=4)
    return request


def test_which_genops_load_a_library() -> None:
    assert genop_loads_library(_genop(7))
    assert genop_loads_library(_genop(20))
    assert genop_loads_library(_genop(struct.pack("=Q", 7)))
    assert genop_loads_library(_genop(b"\x07\0"))  # unreadable: counts as one
    for op in (0, 2, 8, 19, 21):
        assert not genop_loads_library(_genop(op)), op
    assert not genop_loads_library(pb.GenopRequest(session_id=1))
    assert GENOP.loads_library is genop_loads_library


REMOTE = Origin("tcp://10.1.2.3:8194", loopback=False)
LOCAL = Origin("tcp://127.0.0.1:8194", loopback=True)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("origin", "allow", "allowed"),
    [(REMOTE, False, False), (REMOTE, True, True), (LOCAL, False, True), (None, False, True)],
)
async def test_exec_off_loopback_needs_allow_exec(
    origin: Origin | None, allow: bool, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    backend = NoopBackend()
    backend.start()
    agent = Agent(backend, exec_policy=ExecPolicy(allow))
    try:
        async with connected_client(agent.services(), origin=origin) as (client, _):
            agent_client = AgentClient(client)
            session = await agent_client.create_session()
            # Classification and other genops are never refused.
            await agent_client.call(GENOP, _genop(2, session))
            if allowed:
                reply = await agent_client.call(GENOP, _genop(7, session))
                assert [a.buf for a in reply.write_args] == [b"\0" * 4]
            else:
                with pytest.raises(RPCError) as info:
                    await agent_client.call(GENOP, _genop(7, session))
                assert info.value.code == StatusCode.PERMISSION_DENIED
                assert info.value.message == (
                    "worker tcp://10.1.2.3:8194: Genop (exec) loads a library, which this "
                    "worker serves to other hosts only when started with --allow-exec"
                )
    finally:
        backend.close()
    assert ("Calling exec" in caplog.text) is allowed


def _exec_over(netns: str, address: str) -> str:
    script = """
import struct, sys, anyio
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.services import GENOP
from vaccelray.transport.client import connect

async def main():
    async with connect(sys.argv[1]) as client:
        agent = AgentClient(client)
        request = pb.GenopRequest(session_id=await agent.create_session())
        for buf in (struct.pack("=I", 7), b"libexample.so\\0", b"run\\0"):
            request.read_args.add(buf=buf, size=len(buf))
        try:
            await agent.call(GENOP, request)
            print("ok")
        except RPCError as exc:
            print(exc.code.name, exc.message)

anyio.run(main)
"""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script, address],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,  # liveness only
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_exec_from_another_address_is_refused_unless_allowed() -> None:
    require_netns()
    with Topology(1) as topo:
        host, ip = topo.hosts[0], topo.addresses[0]
        for flags, expected in (
            ((), "PERMISSION_DENIED worker tcp://{ip}:{port}: Genop (exec) loads a library"),
            (("--allow-exec",), "ok"),
        ):
            worker = Proc(
                worker_argv(
                    *("-a", f"tcp://{ip}:0", "-a", "tcp://127.0.0.1:0", "--backend", "noop"),
                    *("--pool-size", "0", "--no-announce", *flags),
                ),
                netns=host,
            )
            try:
                remote = worker.wait_for(r"Listening on (tcp://10\S+)").group(1)
                local = worker.wait_for(r"Listening on (tcp://127\S+)").group(1)
                port = remote.rsplit(":", 1)[1]
                assert _exec_over(host, remote).startswith(expected.format(ip=ip, port=port))
                assert _exec_over(host, local) == "ok"  # loopback: always served
            finally:
                worker.stop()


class _NoSessions:
    """A session table that knows no session: reaching it means the call got through."""

    def get(self, session_id: int) -> None:
        raise RPCError(StatusCode.NOT_FOUND, f"Unknown session {session_id}")


@pytest.mark.parametrize(
    ("origin", "allow", "allowed"),
    [(REMOTE, False, False), (REMOTE, True, True), (LOCAL, False, True)],
)
def test_the_scheduler_forwards_exec_off_loopback_only_with_allow_exec(
    origin: Origin, allow: bool, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from vaccelray.protocol.agent import SERVICE_NAMES
    from vaccelray.scheduler.forwarding import AgentForwarder

    forwarder = AgentForwarder(
        _NoSessions(),  # type: ignore[arg-type]
        exec_policy=ExecPolicy(allow, hop="scheduler"),
    )
    genop = forwarder.services()[0].methods["Genop"].handler
    ctx = CallContext(SERVICE_NAMES[0], "Genop", (), None, "peer", 1, origin)
    # Not an exec: always on its way.
    with pytest.raises(RPCError) as info:
        genop(_genop(2, 9).SerializeToString(), ctx)
    assert info.value.code == StatusCode.NOT_FOUND
    with pytest.raises(RPCError) as info:
        genop(_genop(20, 9).SerializeToString(), ctx)
    if allowed:
        assert info.value.code == StatusCode.NOT_FOUND
    else:
        assert info.value.code == StatusCode.PERMISSION_DENIED
        assert info.value.message == (
            "scheduler tcp://10.1.2.3:8194: Genop (exec) loads a library, which this "
            "scheduler serves to other hosts only when started with --allow-exec"
        )
    refusals = [r.getMessage() for r in caplog.records if r.name == "vaccelray.auth"]
    expected = [] if allowed else ["Refused Genop (exec) from peer: exec off loopback"]
    assert refusals == expected


def test_the_scheduler_sends_its_token_only_on_unix_sockets_and_never_the_default() -> None:
    from vaccelray.membership import Credential
    from vaccelray.scheduler.pool import WorkerPool

    cluster = WorkerPool(credential=Credential("cluster"))
    default = WorkerPool(credential=Credential("mine", default=True))
    # Over the network the token is proved over TLS, never sent.
    for address in ("tcp://127.0.0.1:8194", "tcp://10.0.0.3:8194", "vsock://3:8194"):
        for pool in (cluster, default):
            assert pool.credential(address) == (), address
    assert cluster.credential("unix:@w") == token_metadata("cluster")
    # The user's default token stays home: on a unix socket the uid speaks.
    for address in ("unix:@w", "unix:///run/w.sock"):
        assert default.credential(address) == (), address
    assert WorkerPool().credential("unix:@w") == ()
    # A client's token never goes on: the scheduler's replaces it, other metadata stays.
    client = (*token_metadata("the client's"), ("x-other", "1"))
    assert cluster._metadata("unix:@w", client) == (
        *token_metadata("cluster"),
        ("x-other", "1"),
    )
    assert cluster._metadata("tcp://10.0.0.3:8194", client) == (("x-other", "1"),)
