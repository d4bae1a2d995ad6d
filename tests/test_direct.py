"""A thread's own pool process: sync calls go to a process the worker leased to the client.

Against a real worker on a unix socket, run in this process (so that mutation
testing sees which tests reach its lease code). A thread's first calls go by
the worker, its second starts the lease; each test waits for the lease (a
condition, never the clock) before the calls it is about.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

import vaccelray
from tests.processes import Proc, start_daemon, worker_argv
from tests.test_offload_api import ADDRESS_VARS, add, pid
from tests.waiting import eventually, until
from vaccelray.auth import TokenCheck
from vaccelray.client import Client, core
from vaccelray.client.core import _CALLED as CALLED
from vaccelray.client.core import _LEASING as LEASING
from vaccelray.client.direct import DirectLane, _LeasedProcess, fetch_lane
from vaccelray.client.lane import Lane
from vaccelray.client.objects import INLINE
from vaccelray.client.refs import TaskRef
from vaccelray.client.remote import FunctionSpec, function_spec
from vaccelray.errors import RPCError, StatusCode, TransportError
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.objects import MAX_CLIENT_ID
from vaccelray.protocol.services import END_LEASE, LEASE, SUBMIT
from vaccelray.transport.client import open_client
from vaccelray.transport.server import CallContext, Link, Origin
from vaccelray.worker import leases
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.leases import LeaseService
from vaccelray.worker.poolchild import FRAME_MARGIN, Done, Run, encode_frame
from vaccelray.worker.sandbox import SandboxConfig


@contextmanager
def running(sock: Path, **options: Any) -> Iterator[str]:
    """A noop worker in this process (a thread of its own), on the unix socket *sock*, while
    the block runs: its address. Its pool runs tasks as the test's user (they see its files);
    what the worker does runs here, where its logs are captured."""
    address = f"unix://{sock}"
    config = WorkerConfig(
        addresses=(address,),
        backend="noop",
        pool_size=2,
        sandbox=SandboxConfig(mode="embedded"),
        **options,
    )
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def serve() -> None:
        try:
            async with run_worker(config):
                box["stop"] = asyncio.Event()
                box["loop"] = asyncio.get_running_loop()
                ready.set()
                await box["stop"].wait()
        except BaseException as exc:  # told by the fixture, not left to the thread's end
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(60), "the worker did not start"
    assert "error" not in box, box.get("error")
    try:
        yield address
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(60)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running(tmp_path_factory.mktemp("direct") / "w.sock") as address:
        yield address


@pytest.fixture(autouse=True)
def leasing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients made here lease pool processes (the suite's are told not to: conftest)."""
    monkeypatch.delenv("VACCELRAY_DIRECT", raising=False)


@pytest.fixture
def client(worker: str) -> Iterator[Client]:
    with Client(worker) as c:
        yield c


def leased(client: Client) -> DirectLane:
    """This thread's lane to its leased process, once leased (a call starts the lease)."""
    assert client.submit(add, 1).result(timeout=60) == 1

    def ready() -> bool:
        lane = client._core._direct.get(threading.get_ident())
        if not isinstance(lane, DirectLane) or lane.closed:
            client.submit(add, 1).result(timeout=60)  # (a lost one is leased again)
            return False
        return True

    until(ready, "the thread's pool process is leased")
    lane = client._core._direct[threading.get_ident()]
    assert isinstance(lane, DirectLane)
    return lane


def direct(ref: TaskRef[object]) -> TaskRef[object]:
    assert isinstance(ref._lane, DirectLane), "the call went by the worker"
    return ref


@vaccelray.offload
def boom(text: str) -> None:
    raise KeyError(text)


@vaccelray.offload
def blob(size: int) -> bytes:
    return b"x" * size


@vaccelray.offload
def length(data: bytes) -> int:
    return len(data)


@vaccelray.offload
def crash() -> None:
    os._exit(3)


@vaccelray.offload
def pid_then_wait(pid_file: str, path: str) -> None:
    import time

    Path(pid_file).write_text(str(os.getpid()))
    while not os.path.exists(path):
        time.sleep(0.01)


@vaccelray.offload
def sleeps(seconds: float) -> None:
    import time

    time.sleep(seconds)


@vaccelray.offload
def scribbles_on_its_channel() -> None:
    # A leased process's channel to the worker is the fd its command line names.
    channel = socket.socket(fileno=int(sys.argv[6]))
    channel.send(b"not a result")
    channel.detach()
    signal.pause()  # the worker stops this process


def test_sync_calls_go_to_a_process_of_the_threads_own(worker: str) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VACCELRAY_DIRECT", "0")
        by_worker = Client(worker)
    with by_worker, Client(worker) as client:
        pool = {by_worker.submit(pid).result(timeout=60) for _ in range(20)}
        assert by_worker._core._direct == {}  # (VACCELRAY_DIRECT=0 leases nothing)
        leased(client)
        mine = {direct(client.submit(pid)).result(timeout=60) for _ in range(20)}
        assert len(mine) == 1
        assert not mine & pool
    # It dies with the client's connection.
    (leased_pid,) = mine
    until(lambda: not Path(f"/proc/{leased_pid}").exists(), "the leased process is gone")


def test_the_embedded_worker_leases_too(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ADDRESS_VARS:
        monkeypatch.delenv(name, raising=False)
    with Client(backend="noop") as client:
        leased(client)
        assert direct(client.submit(add, 20, 22)).result(timeout=60) == 42


def test_results_and_errors_come_back_as_through_the_worker(client: Client) -> None:
    leased(client)
    assert direct(client.submit(add, 2, b=3)).result(timeout=60) == 5
    ref = direct(client.submit(boom, "why"))
    with pytest.raises(KeyError) as info:
        ref.result(timeout=60)
    assert info.value.args == ("why",)
    assert "in boom\nKeyError: 'why'" in str(info.value.__cause__)  # the remote traceback


def test_a_large_result_stays_in_the_workers_store(client: Client) -> None:
    leased(client)
    size = INLINE + (1 << 20)
    ref = direct(client.submit(blob, size))
    assert ref.result(timeout=60) == b"x" * size
    stored = ref._future.result(0)
    assert type(stored).__name__ == "Stored"  # kept there, then fetched
    assert stored.size > size  # (its pickled size: a scheduler routes by it)
    # Given to another task, it is read on the worker.
    assert length.remote_on(client, ref).result(timeout=60) == size


def test_a_lost_process_fails_its_call_as_a_crash_and_a_new_one_is_leased(
    client: Client,
) -> None:
    lane = leased(client)
    with pytest.raises(vaccelray.WorkerLostError, match="running crash exited with status 3"):
        direct(client.submit(crash)).result(timeout=60)
    assert lane.closed
    assert leased(client) is not lane


def test_a_call_past_its_timeout_ends_its_process(client: Client) -> None:
    lane = leased(client)
    ref = direct(client.submit(sleeps.options(timeout=0.2), 600))
    with pytest.raises(vaccelray.TaskTimeoutError, match=r"sleeps did not finish within 0\.2 s"):
        ref.result(timeout=60)
    assert lane.closed  # its process ended it (SIGALRM): nothing is left sleeping
    assert leased(client) is not lane
    assert direct(client.submit(add, 4)).result(timeout=60) == 4


def test_cancelling_a_call_kills_its_process(client: Client, tmp_path: Path) -> None:
    leased(client)
    pid_file = tmp_path / "pid"
    ref = direct(client.submit(pid_then_wait, str(pid_file), str(tmp_path / "never")))
    until(lambda: pid_file.exists() and pid_file.read_text() != "", "the task started")
    task_pid = int(pid_file.read_text())
    assert ref.cancel()
    with pytest.raises(vaccelray.TaskCancelledError):
        ref.result(timeout=60)
    until(lambda: not Path(f"/proc/{task_pid}").exists(), "the leased process is gone")
    assert leased(client) is not ref._lane


def test_a_process_breaking_its_channel_is_stopped(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    leased(client)
    with pytest.raises(vaccelray.WorkerLostError, match="SIGKILL"):
        direct(client.submit(scribbles_on_its_channel)).result(timeout=60)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "vaccelray.leases"]
    assert re.fullmatch(
        r"Leased pool process \d+ sent on its channel what is not a result \(.*\): it is "
        r"stopped",
        line,
    ), line


def test_a_worker_leases_at_most_its_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vaccelray.leases")
    with running(tmp_path / "w.sock", max_leases=1) as address, Client(address) as client:
        leased(client)  # this thread's
        other: list[object] = []

        def elsewhere() -> None:
            me = threading.get_ident()
            other.append(client.submit(add, 1).result(timeout=60))
            other.append(client._core._direct[me] is CALLED)  # called once: nothing asked
            other.append(client.submit(add, 1).result(timeout=60))
            until(lambda: client._core._direct[me] is not LEASING, "the lease was answered")
            other.append(client._core._direct[me])
            other.append(client.submit(add, 2).result(timeout=60))

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(60)
        # Refused (RESOURCE_EXHAUSTED): its calls go by the worker, and it asks no more.
        assert other == [1, True, 1, None, 2]
        assert len(re.findall(r"Leased pool process \d+ to connection", caplog.text)) == 1


def _handoff(path: str, message: bytes) -> tuple[bytes, list[int]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect("\0" + path[1:])
        s.sendall(message)
        answer, fds, _, _ = socket.recv_fds(s, 16, 2)
        return answer, fds


def _handoff_as(uid: int, path: str, message: bytes) -> bytes:
    """What the handoff answers a process of user *uid* (forked: it only uses a socket)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.setuid(uid)
            answer, _ = _handoff(path, message)
            os.write(write, answer)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        text = answer.read()
    os.waitpid(child, 0)
    return text


@contextmanager
def _a_lease(worker: str) -> Iterator[wire.Leased]:
    """A lease of *worker*'s, asked on a connection kept open (the lease ends with it)."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(open_client(worker))
    try:
        yield loop.run_until_complete(conn.call_rpc(LEASE, wire.Lease("a-client")))
    finally:
        loop.run_until_complete(conn.aclose())
        loop.close()


def test_the_handoff_gives_the_socket_once_to_the_ticket_holder(worker: str) -> None:
    with _a_lease(worker) as leased_:
        _check_handoff(leased_)


def test_a_silent_handoff_is_dropped_at_its_deadline_and_at_most_16_are_served_at_once(
    worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def connected(address: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(address)
        return s

    with _a_lease(worker) as leased_:
        address = "\0" + leased_.path[1:]
        # One that says nothing is closed at its deadline.
        monkeypatch.setattr(leases, "HANDOFF_TIMEOUT", 0.05)
        with connected(address) as quiet:
            assert quiet.recv(16) == b""
        monkeypatch.setattr(leases, "HANDOFF_TIMEOUT", 600.0)
        silent = [connected(address) for _ in range(16)]  # the most served at once
        try:
            with connected(address) as extra:
                assert extra.recv(16) == b""  # past them: closed at once
            silent[0].setblocking(False)
            with pytest.raises(BlockingIOError):  # while those are still served
                silent[0].recv(16)
        finally:
            for s in silent:
                s.close()

        def served() -> bool:  # (closed, the silent ones give their places back)
            try:
                return _handoff(leased_.path, b"0" * 48) == (b"no", [])
            except ConnectionResetError:  # still past the bound: closed at once
                return False

        until(served, "a handoff is served again")
        answer, fds = _handoff(leased_.path, leased_.lease_id.encode() + leased_.ticket)
        assert answer == b"ok"
        for fd in fds:
            os.close(fd)


def test_a_handoff_that_fails_is_logged_and_the_next_one_is_served(
    worker: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: LeaseService, conn: socket.socket, data: bytes) -> None:
        raise RuntimeError("a bug")

    with _a_lease(worker) as leased_:
        message = leased_.lease_id.encode() + leased_.ticket
        monkeypatch.setattr(LeaseService, "_take", broken)
        assert _handoff(leased_.path, message) == (b"", [])  # closed, nothing handed
        until(lambda: "a bug" in caplog.text, "the failure was logged")
        assert "A lease handoff failed" in caplog.text
        monkeypatch.undo()
        answer, fds = _handoff(leased_.path, message)  # the service goes on
        assert answer == b"ok"
        for fd in fds:
            os.close(fd)


def _check_handoff(leased_: wire.Leased) -> None:
    path, lease_id = leased_.path, leased_.lease_id.encode()
    wrong = bytes(b ^ 1 for b in leased_.ticket)
    assert _handoff(path, lease_id + wrong) == (b"no", [])
    assert _handoff(path, b"0" * len(lease_id) + leased_.ticket) == (b"no", [])
    if os.getuid() == 0:  # another user, with the right ticket: refused too
        assert _handoff_as(65534, path, lease_id + leased_.ticket) == b"no"
    # Not even text: refused, and the handoff goes on serving.
    assert _handoff(path, b"\xff" * len(lease_id) + leased_.ticket) == (b"no", [])
    answer, fds = _handoff(path, lease_id + leased_.ticket)
    assert answer == b"ok"
    assert len(fds) == 1
    os.close(fds[0])
    assert _handoff(path, lease_id + leased_.ticket) == (b"no", [])  # taken already


def test_an_unused_leased_process_is_let_go(worker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "LEASE_IDLE", 0.05)
    with Client(worker) as client:
        lane = leased(client)
        me = threading.get_ident()
        until(lambda: lane.closed and me not in client._core._direct, "the idle lane was closed")
        assert client.submit(add, 3).result(timeout=60) == 3  # and the thread leases again
        until(lambda: me in client._core._direct, "a new lease was asked for")


def test_a_lane_with_a_call_outstanding_is_not_closed_for_being_idle() -> None:
    mine, theirs = socket.socketpair()
    with theirs:
        lane = Lane(mine, 1 << 20)
        lane._pending[1] = lambda outcome: None
        assert not lane.close_if_idle()
        assert not lane.closed
        lane._pending.clear()
        assert lane.close_if_idle()
        assert lane.closed


def test_no_lease_over_tcp(worker_process: Proc) -> None:
    with Client(worker_process.address) as client:
        for _ in range(3):
            assert client.submit(add, 1).result(timeout=60) == 1
        assert client._core._direct == {}


# -- the lease service's own rules, on this loop (a stand-in pool spawns a plain process) --


class _Pool:
    """Spawns a process that only waits to be stopped, as a leased one would (with sockets
    nobody serves)."""

    process: type[subprocess.Popen[bytes]] = subprocess.Popen

    def spawn_process(
        self, lease_timeout: float
    ) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket]:
        sock, child = socket.socketpair()
        channel, child_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel.setblocking(False)
        child.close()
        child_channel.close()
        return self.process(["sleep", "600"], stdin=subprocess.DEVNULL), sock, channel


def _ctx(connection_id: int, uid: int | None = None) -> CallContext:
    """A call from *connection_id*: a unix peer of *uid*, or a TLS member off unix (None)."""
    origin = Origin("unix:///w.sock" if uid is not None else "tcp://10.0.0.1:1", False, uid)
    link = None if uid is not None else Link(tls=True, member=True)
    return CallContext("s", "m", (), None, "peer", connection_id, origin, link)


@contextmanager
def _service(**bounds: int) -> Iterator[LeaseService]:
    service = LeaseService(
        _Pool(),  # type: ignore[arg-type]
        TokenCheck("a-token"),
        None,  # type: ignore[arg-type]
        max_leases=bounds.get("max_leases", 2),
        max_per_connection=bounds.get("max_per_connection", 1),
        task_timeout=0.0,
    )
    listener = service.listen()
    try:
        yield service
    finally:
        listener.close()


def _lease(service: LeaseService, ctx: CallContext) -> wire.Leased:
    return LEASE.reply.decode(service._lease(LEASE.request.encode(wire.Lease("c")), ctx))


async def _ended(service: LeaseService, lease_id: str) -> None:
    lease = service.leases.get(lease_id)
    if lease is not None:
        await lease.ended.wait()


@pytest.mark.anyio
async def test_a_lease_is_refused_off_a_unix_socket_and_past_its_bounds() -> None:
    me = os.getuid()
    with _service(max_leases=2, max_per_connection=1) as service:
        with pytest.raises(RPCError) as off_unix:
            _lease(service, _ctx(1))
        assert off_unix.value.code == StatusCode.FAILED_PRECONDITION
        assert off_unix.value.message == (
            "a pool process is leased only on a unix socket (the client must be on this host)"
        )
        first = _lease(service, _ctx(1, me))
        assert service.holds_state(1)
        assert not service.holds_state(2)
        with pytest.raises(RPCError) as per:
            _lease(service, _ctx(1, me))
        assert per.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert per.value.message == (
            "this connection leased 1 pool processes, its most (worker option "
            "--max-leases-per-connection)"
        )
        second = _lease(service, _ctx(2, me))
        with pytest.raises(RPCError) as whole:
            _lease(service, _ctx(3, me))
        assert whole.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert whole.value.message == (
            "this worker has 2 leased pool processes, its most (worker option --max-leases)"
        )
        # A connection's leases end with it, and make room.
        service.connection_closed(1)
        await _ended(service, first.lease_id)
        assert not service.holds_state(1)
        assert second.lease_id in service.leases
        _lease(service, _ctx(3, me))
        await service.aclose()
        assert service.leases == {}
        with pytest.raises(RPCError) as closing:
            _lease(service, _ctx(4, me))
        assert closing.value.code == StatusCode.UNAVAILABLE
        assert closing.value.message == "the worker is shutting down"


@pytest.mark.anyio
async def test_a_connection_may_hold_as_many_leases_as_its_bound() -> None:
    me = os.getuid()
    with _service(max_leases=4, max_per_connection=2) as service:
        _lease(service, _ctx(1, me))
        _lease(service, _ctx(1, me))
        assert service.leased_by(1) == 2
        with pytest.raises(RPCError, match="leased 2 pool processes"):
            _lease(service, _ctx(1, me))
        await service.aclose()


@pytest.mark.anyio
async def test_a_lease_naming_a_client_id_past_its_bound_is_refused() -> None:
    with _service() as service:
        request = LEASE.request.encode(wire.Lease("x" * (MAX_CLIENT_ID + 1)))
        with pytest.raises(RPCError) as info:
            service._lease(request, _ctx(1, os.getuid()))
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert service.leases == {}
        _lease(service, _ctx(1, os.getuid()))  # (a short one is taken)
        await service.aclose()


@pytest.mark.anyio
async def test_no_lease_when_leases_are_off() -> None:
    with _service(max_leases=0) as service:
        with pytest.raises(RPCError) as info:
            _lease(service, _ctx(1, os.getuid()))
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        assert info.value.message == (
            "this worker leases no pool processes (worker option --max-leases)"
        )


@pytest.mark.anyio
async def test_end_lease_tells_how_it_ended_and_only_to_its_connection() -> None:
    with _service() as service:
        leased_ = _lease(service, _ctx(1, os.getuid()))
        request = END_LEASE.request.encode(wire.EndLease(leased_.lease_id))
        with pytest.raises(RPCError) as other:
            await service._end(request, _ctx(2, os.getuid()))
        assert other.value.code == StatusCode.NOT_FOUND
        assert other.value.message == f"no lease {leased_.lease_id} here"
        long_id = END_LEASE.request.encode(wire.EndLease("x" * 50))
        with pytest.raises(RPCError) as unknown:
            await service._end(long_id, _ctx(1, os.getuid()))
        assert unknown.value.message == f"no lease {'x' * 40} here"  # (a peer's text, cut)
        ended = END_LEASE.reply.decode(await service._end(request, _ctx(1, os.getuid())))
        assert ended.status == "was killed by signal SIGKILL"
        assert leased_.lease_id not in service.leases
        # Asked again once it is gone (a client asks after its lane broke): the same answer.
        again = END_LEASE.reply.decode(await service._end(request, _ctx(1, os.getuid())))
        assert again.status == ended.status
        with pytest.raises(RPCError):
            await service._end(request, _ctx(2, os.getuid()))


class _Stubborn(subprocess.Popen[bytes]):
    """A leased process that a kill does not end (the test ends it)."""

    def kill(self) -> None:
        pass


class _StubbornPool(_Pool):
    process = _Stubborn


@pytest.mark.anyio
async def test_end_lease_of_a_process_that_does_not_end_says_it_stopped_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(leases, "_REAP_WAIT", 0.01)
    with _service() as service:
        service.pool = _StubbornPool()  # type: ignore[assignment]
        leased_ = _lease(service, _ctx(1, os.getuid()))
        process = service.leases[leased_.lease_id].process
        try:
            request = END_LEASE.request.encode(wire.EndLease(leased_.lease_id))
            ended = END_LEASE.reply.decode(await service._end(request, _ctx(1, os.getuid())))
            assert ended.status == "stopped answering"
            assert leased_.lease_id in service.leases  # still there: it never ended
        finally:
            os.kill(process.pid, signal.SIGKILL)
            await service.leases[leased_.lease_id].ended.wait()


@pytest.mark.anyio
async def test_a_ticket_not_used_in_time_ends_its_lease(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(leases, "TICKET_TTL", 0.01)
    caplog.set_level(logging.INFO, logger="vaccelray.leases")
    with _service() as service:
        leased_ = _lease(service, _ctx(1, os.getuid()))
        lease = service.leases[leased_.lease_id]
        await lease.ended.wait()
        assert lease.status == "was killed by signal SIGKILL"
        assert [r.getMessage() for r in caplog.records if r.name == "vaccelray.leases"] == [
            f"Lease {leased_.lease_id} was not taken within 0.01 s: its process is stopped"
        ]


def test_the_cli_sets_the_bounds(tmp_path: Path) -> None:
    from vaccelray import cli

    assert cli.DEFAULT_MAX_LEASES_PER_CONNECTION == leases.DEFAULT_MAX_LEASES_PER_CONNECTION
    proc, address = start_daemon(
        worker_argv(
            "-a", f"unix://{tmp_path / 'w.sock'}", "--backend", "noop", "--no-announce",
            "--pool-size", "1", "--max-leases", "0",
        )
    )  # fmt: skip
    try:
        with Client(address) as client:
            me = threading.get_ident()
            for _ in range(2):
                assert client.submit(add, 1).result(timeout=60) == 1
            direct = client._core._direct
            until(lambda: me in direct and direct[me] is None, "the lease was refused")
            assert client.submit(add, 2).result(timeout=60) == 2
    finally:
        proc.stop()


# -- a lane against a stand-in process (this test writes its frames) ----------------------


def _plain_add(a: int, b: int = 0) -> int:
    return a + b


_ADD = function_spec(_plain_add)


def _lane(ended: list[str], status: str) -> tuple[DirectLane, socket.socket]:
    """A lane whose "process" is the other end returned; asked how it ended, it is *status*."""
    mine, theirs = socket.socketpair()

    def asked(lease_id: str) -> str:
        # Asked from a thread of its own (the reader holds the lane's lock), which must not
        # keep the program from exiting: the test looks at it.
        me = threading.current_thread()
        ended.append(f"{lease_id} from {me.name}{' (daemon)' if me.daemon else ''}")
        return status

    leased_ = wire.Leased("lease-1", b"t" * 32, "@x")
    return DirectLane(mine, leased_, 1 << 20, asked, threading.get_ident()), theirs


def _outcome(lane: DirectLane, outcomes: list[object]) -> object:
    lane.pump(lambda: bool(outcomes), 60)
    until(lambda: bool(outcomes), "the call ended")
    (outcome,) = outcomes
    return outcome


@pytest.mark.parametrize(
    ("status", "kind", "message"),
    [
        ("exited with status 3", "crashed", "the pool process running {} exited with status 3"),
        ("was killed by signal SIGALRM", "timeout", "{} ran past its timeout"),
    ],
)
def test_a_lost_process_is_answered_as_the_worker_would(
    status: str, kind: str, message: str
) -> None:
    ended: list[str] = []
    lane, process = _lane(ended, status)
    outcomes: list[object] = []
    assert lane.send_task(_ADD, b"", None, outcomes.append)
    process.close()  # it died
    outcome = _outcome(lane, outcomes)
    assert ended == ["lease-1 from vaccelray-lease-lost (daemon)"]
    assert lane.closed
    message = message.format(_ADD.name)
    if kind == "crashed":
        assert isinstance(outcome, bytes)
        reply = SUBMIT.reply.decode(outcome)
        assert reply == wire.TaskFailed(wire.FailureKind.CRASHED, message)
    else:
        assert isinstance(outcome, RPCError)
        assert outcome.code == StatusCode.DEADLINE_EXCEEDED
        assert message in outcome.message


def test_a_cancelled_calls_lost_process_is_not_asked_about() -> None:
    ended: list[str] = []
    lane, process = _lane(ended, "was killed by signal SIGKILL")
    outcomes: list[object] = []
    assert lane.send_task(_ADD, b"", None, outcomes.append)
    lane.abandoned = True
    process.close()
    assert isinstance(_outcome(lane, outcomes), asyncio.CancelledError)
    assert ended == []  # nothing asked: a cancelled call is not answered as a crash


def test_a_done_answers_its_call_as_the_worker_would() -> None:
    ended: list[str] = []
    lane, process = _lane(ended, "unused")
    outcomes: list[object] = []
    with process:
        before = time.monotonic()
        assert lane.send_task(_ADD, b"", None, outcomes.append)
        assert lane.used >= before  # (the idle check goes by it)
        done = Done(1, 0, pickle.dumps(5))
        process.sendall(encode_frame(msgspec.msgpack.Encoder(), done))
        outcome = _outcome(lane, outcomes)
    assert outcome == SUBMIT.reply.encode(wire.TaskDone(pickle.dumps(5)))
    assert lane._process.calls == {}  # nothing kept of an answered call
    assert lane.close_if_idle()


def test_a_result_larger_than_the_clients_messages_is_refused_as_by_the_worker() -> None:
    process = _LeasedProcess(1024)
    process.receive_data(encode_frame(msgspec.msgpack.Encoder(), Done(1, 0, b"x" * 2000)))
    event = process.next_event()
    assert event is not None
    assert event.stream_id == 1
    assert event.code == StatusCode.RESOURCE_EXHAUSTED
    assert event.message == "Submit response of 2014 bytes exceeds the limit of 1024 bytes"


def test_runs_carry_each_function_once_and_forget_the_least_recently_used() -> None:
    process = _LeasedProcess(1 << 20)
    decode = msgspec.msgpack.Decoder(Run).decode
    specs = [FunctionSpec(f"{i:064x}", f"f{i}", b"pickled %d" % i) for i in range(65)]

    def run(spec: FunctionSpec, timeout: float | None = None) -> Run:
        seq, frame = process.run(spec, b"args", timeout)
        sent = decode(frame[4:])
        assert (sent.seq, sent.digest, sent.name, sent.args) == (
            seq,
            spec.digest,
            spec.name,
            b"args",
        )
        return sent

    first = [run(spec) for spec in specs[:64]]
    assert [r.function for r in first] == [s.pickled for s in specs[:64]]
    assert all(r.forget == () and r.timeout == 0.0 for r in first)
    again = run(specs[0], 2.5)  # known: not sent again, and now the most recently used
    assert (again.function, again.timeout) == (None, 2.5)
    assert again.segment_min == INLINE + 1
    past = run(specs[64])  # one function too many: the least recently used goes
    assert (past.function, past.forget) == (specs[64].pickled, (specs[1].digest,))
    assert run(specs[1]).function == specs[1].pickled  # forgotten: sent again


@pytest.mark.parametrize("answer", [b"no", None])
def test_a_handoff_that_refuses_or_never_answers_fails_the_lease(answer: bytes | None) -> None:
    name = f"vaccelray-test-handoff-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("\0" + name)
        listener.listen(1)
        leased_ = wire.Leased("lease-1", b"t" * 32, "@" + name)
        taken: list[socket.socket] = []

        def serve() -> None:
            conn, _ = listener.accept()
            taken.append(conn)
            conn.recv(64)
            if answer is not None:
                conn.sendall(answer)

        server = threading.Thread(target=serve)
        server.start()
        try:
            error = TransportError if answer is not None else TimeoutError
            with pytest.raises(error):
                fetch_lane(leased_, 1 << 20, 0.2, lambda lease_id: "", threading.get_ident())
        finally:
            server.join(60)
            for conn in taken:
                conn.close()


def test_a_handoff_elsewhere_than_an_abstract_socket_is_refused() -> None:
    leased_ = wire.Leased("lease-1", b"t" * 32, "/tmp/handoff.sock")
    with pytest.raises(TransportError, match="a handoff this client cannot use"):
        fetch_lane(leased_, 1 << 20, 60, lambda lease_id: "", threading.get_ident())


def test_a_frame_of_the_bound_is_read_and_one_past_it_is_refused() -> None:
    process = _LeasedProcess(1 << 20)
    bound = INLINE + 1 + FRAME_MARGIN
    process.receive_data(bound.to_bytes(4, "big"))
    assert process.next_event() is None  # waits for the body
    past = _LeasedProcess(1 << 20)
    past.receive_data((bound + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError, match=f"a frame of {bound + 1} bytes"):
        past.next_event()


def test_a_frame_past_the_bound_breaks_the_lane(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vaccelray.client")
    ended: list[str] = []
    lane, process = _lane(ended, "was killed by signal SIGKILL")
    outcomes: list[object] = []
    with process:
        assert lane.send_task(_ADD, b"", None, outcomes.append)
        process.sendall((INLINE + 1 + FRAME_MARGIN + 1).to_bytes(4, "big"))
        outcome = _outcome(lane, outcomes)
    assert ended == ["lease-1 from vaccelray-lease-lost (daemon)"]  # the worker says how
    assert isinstance(outcome, bytes)
    assert "SIGKILL" in SUBMIT.reply.decode(outcome).message  # type: ignore[union-attr]
    assert (
        "Lost the leased process of lease lease-1: the worker's answer cannot be read: a "
        "frame of" in caplog.text
    )


@pytest.mark.anyio
async def test_an_expired_ticket_is_withdrawn_as_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not only once its process is gone: from then on no handoff gives its socket."""
    monkeypatch.setattr(leases, "TICKET_TTL", 0.01)
    stopped: list[str] = []
    monkeypatch.setattr(leases._Lease, "kill", lambda lease: stopped.append(lease.lease_id))
    with _service() as service:
        leased_ = _lease(service, _ctx(1, os.getuid()))
        assert leased_.lease_id in service.offers
        await eventually(lambda: stopped == [leased_.lease_id], "the ticket expired")
        assert leased_.lease_id not in service.offers
        monkeypatch.undo()  # (the real kill, to end the process)
        service.leases[leased_.lease_id].kill()
        await _ended(service, leased_.lease_id)
