"""A thread's own pool process: sync calls go to a process the worker leased to the client.

Against a real worker process on a unix socket. The first call of a thread
goes by the worker and starts the lease; each test waits for the lease (a
condition, never the clock) before the calls it is about.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vaccelray
from tests.processes import Proc, start_daemon, worker_argv
from tests.test_offload_api import ADDRESS_VARS, add, pid
from tests.test_scheduler_tasks import _ME
from tests.waiting import until
from vaccelray.client import Client
from vaccelray.client.core import _LEASING as LEASING
from vaccelray.client.direct import DirectLane
from vaccelray.client.objects import INLINE
from vaccelray.client.refs import TaskRef
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.services import LEASE
from vaccelray.transport.client import open_client


def _worker(sock: Path, *extra: str) -> tuple[Proc, str]:
    # Unsandboxed, tasks as the test's user: they see the test's tmp_path.
    return start_daemon(
        worker_argv(
            "-a", f"unix://{sock}", "--backend", "noop", "--no-announce", "--pool-size", "2",
            "--unsafe-no-sandbox", "--task-user", _ME, "--log-level", "debug", *extra,
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, str]]:
    proc, address = _worker(tmp_path_factory.mktemp("direct") / "w.sock")
    try:
        yield proc, address
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def leasing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients made here lease pool processes (the suite's are told not to: conftest)."""
    monkeypatch.delenv("VACCELRAY_DIRECT", raising=False)


@pytest.fixture
def client(worker: tuple[Proc, str]) -> Iterator[Client]:
    with Client(worker[1]) as c:
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


def test_sync_calls_go_to_a_process_of_the_threads_own(worker: tuple[Proc, str]) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VACCELRAY_DIRECT", "0")
        by_worker = Client(worker[1])
    with by_worker, Client(worker[1]) as client:
        pool = {by_worker.submit(pid).result(timeout=60) for _ in range(20)}
        assert by_worker._core._direct == {}  # (VACCELRAY_DIRECT=0 leases nothing)
        leased(client)
        mine = {direct(client.submit(pid)).result(timeout=60) for _ in range(20)}
        assert len(mine) == 1
        assert not mine & pool
    # It dies with the client's connection.
    until(lambda: not Path(f"/proc/{mine.pop()}").exists(), "the leased process is gone")


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
    assert type(ref._future.result(0)).__name__ == "Stored"  # kept there, then fetched
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
    client: Client, worker: tuple[Proc, str]
) -> None:
    leased(client)
    start = len(worker[0].lines)
    with pytest.raises(vaccelray.WorkerLostError, match="SIGKILL"):
        direct(client.submit(scribbles_on_its_channel)).result(timeout=60)
    worker[0].wait_for("sent on its channel what is not a result", start=start)


def test_a_worker_leases_at_most_its_bound(tmp_path: Path) -> None:
    proc, address = _worker(tmp_path / "w.sock", "--max-leases", "1")
    try:
        with Client(address) as client:
            leased(client)  # this thread's
            other: list[object] = []

            def elsewhere() -> None:
                me = threading.get_ident()
                other.append(client.submit(add, 1).result(timeout=60))
                until(lambda: me in client._core._direct, "a lease was asked for")
                until(lambda: client._core._direct[me] is not LEASING, "the lease was answered")
                other.append(client._core._direct[me])
                other.append(client.submit(add, 2).result(timeout=60))

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join(60)
            # Refused (RESOURCE_EXHAUSTED): its calls go by the worker, and it asks no more.
            assert other == [1, None, 2]
            assert proc.text().count("Leased pool process") == 1
    finally:
        proc.stop()


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


def test_the_handoff_gives_the_socket_once_to_the_ticket_holder(
    worker: tuple[Proc, str],
) -> None:
    # The lease lives as long as the connection that made it: kept open to the end.
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(open_client(worker[1]))
    try:
        leased_ = loop.run_until_complete(conn.call_rpc(LEASE, wire.Lease("a-client")))
        _check_handoff(leased_)
    finally:
        loop.run_until_complete(conn.aclose())
        loop.close()


def _check_handoff(leased_: wire.Leased) -> None:
    path, lease_id = leased_.path, leased_.lease_id.encode()
    wrong = bytes(b ^ 1 for b in leased_.ticket)
    assert _handoff(path, lease_id + wrong) == (b"no", [])
    assert _handoff(path, b"0" * len(lease_id) + leased_.ticket) == (b"no", [])
    if os.getuid() == 0:  # another user, with the right ticket: refused too
        assert _handoff_as(65534, path, lease_id + leased_.ticket) == b"no"
    answer, fds = _handoff(path, lease_id + leased_.ticket)
    assert answer == b"ok"
    assert len(fds) == 1
    os.close(fds[0])
    assert _handoff(path, lease_id + leased_.ticket) == (b"no", [])  # taken already


def test_no_lease_over_tcp(worker_process: Proc) -> None:
    with Client(worker_process.address) as client:
        for _ in range(3):
            assert client.submit(add, 1).result(timeout=60) == 1
        assert client._core._direct == {}
