"""The blocking path: a plain thread that waits for its call does its own I/O (a lane)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vaccelray
from tests.processes import start_daemon, worker_argv
from tests.test_actors import Counter, closed_by_peer
from tests.test_offload_api import ADDRESS_VARS, add, waits_for
from tests.test_scheduler_tasks import _ME
from tests.waiting import until
from vaccelray.client import Client
from vaccelray.client.lane import open_lane
from vaccelray.errors import TransportError


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A client of a worker process (an embedded worker would share the client's loop)."""
    sock = tmp_path_factory.mktemp("lanes") / "w.sock"
    # Unsandboxed, tasks as the test's user: they see the test's tmp_path.
    proc, address = start_daemon(
        worker_argv(
            "-a", f"unix://{sock}", "--backend", "noop", "--no-announce", "--pool-size", "2",
            "--unsafe-no-sandbox", "--task-user", _ME,
        )
    )  # fmt: skip
    try:
        with Client(address) as c:
            yield c
    finally:
        proc.stop()


@vaccelray.offload(retries=1)
def crash_once(marker: str) -> str:
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return "ok"


def test_sync_calls_come_back_while_the_clients_loop_is_blocked(client: Client) -> None:
    counter = Counter.remote_on(client, 1)
    assert client.submit(add, 1).result() == 1  # the function is registered
    assert vaccelray.get(counter.add.remote(1)) == 2
    blocked, release = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(60)

    client._core.loop.call_soon_threadsafe(block)
    try:
        assert blocked.wait(60)
        # Neither needs the loop thread: this thread writes and reads them itself.
        assert client.submit(add, 2, 3).result(timeout=60) == 5
        assert vaccelray.get(counter.add.remote(10), timeout=60) == 12
    finally:
        release.set()
    assert vaccelray.get(counter.history.remote()) == [1, 10]


def test_a_lane_call_waited_for_elsewhere_comes_back(client: Client) -> None:
    assert client.submit(add, 1).result() == 1
    ref = client.submit(add, 2, 3)
    assert ref._lane is not None  # this test is about such a call
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(ref.result(60)))
    thread.start()
    thread.join(60)
    assert out == [5]
    awaited = client.submit(add, 4, 5)
    assert awaited._lane is not None

    async def wait_for_it() -> object:
        return await awaited

    assert asyncio.run(wait_for_it()) == 9
    later = client.submit(add, 6)
    done, pending = vaccelray.wait([later], timeout=60)
    assert (done, pending) == ([later], [])


def test_a_lane_call_whose_process_dies_is_retried(client: Client, tmp_path: Path) -> None:
    assert crash_once.remote_on(client, str(tmp_path / "warm")).result(timeout=60) == "ok"
    ref = crash_once.remote_on(client, str(tmp_path / "again"))
    assert ref._lane is not None
    assert ref.result(timeout=60) == "ok"
    assert (tmp_path / "again").exists()


def test_cancelling_a_lane_call_stops_it_on_the_worker(client: Client, tmp_path: Path) -> None:
    (tmp_path / "now").touch()
    assert client.submit(waits_for, str(tmp_path / "now")).result(timeout=60) == "seen"
    marker = tmp_path / "never"
    ref = client.submit(waits_for, str(marker))
    assert ref._lane is not None
    assert ref.cancel()
    with pytest.raises(vaccelray.TaskCancelledError):
        ref.result(timeout=60)
    # The worker stopped it: the lane's reply is the cancellation, and the lane is free.
    ref._lane.pump(lambda: ref._lane is None or ref._lane.idle, 60)
    assert ref._lane.idle
    assert client.submit(add, 7).result(timeout=60) == 7


def test_shutdown_fails_a_lane_call_in_flight(tmp_path: Path) -> None:
    saved = {k: os.environ.pop(k) for k in ADDRESS_VARS if k in os.environ}
    try:
        client = Client(backend="noop")
        try:
            (tmp_path / "now").touch()
            assert client.submit(waits_for, str(tmp_path / "now")).result(timeout=60) == "seen"
            ref = client.submit(waits_for, str(tmp_path / "never"))
            assert ref._lane is not None
        finally:
            client.shutdown()
        with pytest.raises(vaccelray.WorkerLostError, match="shut down"):
            ref.result(timeout=60)
    finally:
        os.environ.update(saved)


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
def test_a_lane_whose_server_closed_it_sends_nothing(scheme: str, tmp_path: Path) -> None:
    """The caller then goes by the loop: over TCP the write would succeed and the call be lost."""
    family = socket.AF_UNIX if scheme == "unix" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "s.sock") if scheme == "unix" else ("127.0.0.1", 0))
        server.listen()
        name = server.getsockname()
        address = f"unix://{name}" if scheme == "unix" else f"tcp://{name[0]}:{name[1]}"
        lane = open_lane(address, 1 << 20, 10.0)
        assert lane is not None
        peer, _ = server.accept()
        answers: list[object] = []
        assert lane.send("s", "m", b"1", answers.append, timeout=None, metadata=())
        assert not lane.idle
        peer.recv(1 << 16)  # the request came
        peer.close()
        lane.pump(lambda: bool(answers), 30)
        assert isinstance(answers[0], vaccelray.WorkerLostError | TransportError)
        assert lane.closed
    # A lane found closed while idle: nothing is written, the caller is told.
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "t.sock") if scheme == "unix" else ("127.0.0.1", 0))
        server.listen()
        name = server.getsockname()
        address = f"unix://{name}" if scheme == "unix" else f"tcp://{name[0]}:{name[1]}"
        lane = open_lane(address, 1 << 20, 10.0)
        assert lane is not None
        peer, _ = server.accept()
        peer.close()
        until(lambda: closed_by_peer(lane.sock), "the close reaches the lane")
        assert lane.send("s", "m", b"2", answers.append, timeout=None, metadata=()) is False
        assert lane.closed
        assert not lane.idle


def test_an_actor_calls_timeout_holds_on_the_lane(client: Client, tmp_path: Path) -> None:
    counter = Counter.remote_on(client)
    assert vaccelray.get(counter.add.remote(1)) == 1
    ref = counter.wait_for.options(timeout=0.5).remote(str(tmp_path / "never"))
    assert ref._lane is not None
    with pytest.raises(vaccelray.TaskTimeoutError):
        vaccelray.get(ref)  # the worker applied the deadline the lane sent
    vaccelray.kill(counter)


def test_a_lane_call_waited_on_with_a_timeout_times_out_then_comes_back(
    client: Client, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    assert client.submit(waits_for, str(tmp_path)).result() == "seen"  # registered
    ref = client.submit(waits_for, str(gate))
    assert ref._lane is not None  # it went by this thread's lane
    with pytest.raises(vaccelray.GetTimeoutError):
        ref.result(timeout=0.05)  # the lane's read gives up at the timeout
    gate.touch()
    assert ref.result() == "seen"


def test_a_lane_read_by_a_helper_for_a_long_call_blocks_no_one(
    client: Client, tmp_path: Path
) -> None:
    """While a helper thread waits in recv for a lane call that runs on, this thread's
    next calls, its looks at that call and a wait() go on (they used to wait for its lock)."""
    gate = tmp_path / "go"
    assert client.submit(waits_for, str(tmp_path)).result() == "seen"  # registered
    long = client.submit(waits_for, str(gate))
    lane = long._lane
    assert lane is not None  # it went by this thread's lane
    assert not long.done()  # someone else waits: a helper thread reads the lane
    # The helper holds the lane's read lock while it waits in recv for the long call.
    until(lambda: lane._lock.locked(), "the helper reads the lane")
    assert not long.done()
    short = client.submit(add, 2, 3)
    assert short.result(timeout=60) == 5
    done, pending = vaccelray.wait([long, short], num_returns=1, timeout=60)
    assert (done, pending) == ([short], [long])
    gate.touch()
    assert long.result(timeout=60) == "seen"
