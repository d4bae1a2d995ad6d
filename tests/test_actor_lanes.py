"""An actor's lane: a thread's sync calls on an actor go to the actor's process directly.

Against real workers on unix sockets, run in this process (so that mutation
testing sees which tests reach the lane code). A thread's first call on an
actor goes by the worker, its second asks for the lane; each test waits for
the lane (a condition, never the clock) before the calls it is about. The
raw tests speak the lane's frames themselves, as a hostile client would.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import vaccelray
from tests.clusters import serving_scheduler
from tests.processes import Proc
from tests.test_direct import _ctx, _service, running
from tests.test_offload_api import Custom
from tests.test_scheduler_routing import config
from tests.test_scheduler_tasks import workers  # noqa: F401
from tests.waiting import until
from vaccelray.client import Client, core
from vaccelray.client.actorlanes import ActorLane
from vaccelray.client.actors import ActorHandle
from vaccelray.client.core import _LEASING as LEASING
from vaccelray.client.direct import handed
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol import actors as actor_wire
from vaccelray.protocol.services import CANCEL_ACTOR_CALL, LEASE_ACTOR
from vaccelray.transport.client import open_client
from vaccelray.worker import leases
from vaccelray.worker.poolchild import (
    FRAME_MARGIN,
    MAX_LANES,
    OK,
    REJECTED,
    Done,
    Run,
    encode_frame,
)

_HEADER = struct.Struct(">I")


@vaccelray.offload
class Keeper:
    def __init__(self) -> None:
        self.log: list[str] = []

    def note(self, what: str) -> int:
        self.log.append(what)
        return len(self.log)

    def history(self) -> list[str]:
        return self.log

    def pid(self) -> int:
        return os.getpid()

    def fail(self, x: int) -> None:
        raise Custom(f"bad {x}", x)

    def crash(self) -> None:
        os._exit(3)

    def wait_for(self, path: str) -> str:
        """Runs until *path* exists: the test decides when this call ends."""
        self.log.append("wait")
        Path(path + ".started").touch()
        while not os.path.exists(path):
            time.sleep(0.01)
        return "seen"

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def stubborn(self, seconds: float) -> None:
        """Sleeps on past its timeout: the exception that says so is swallowed."""
        try:
            time.sleep(seconds)
        except BaseException:
            time.sleep(seconds)

    def blob(self, size: int) -> bytes:
        return b"x" * size


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running(tmp_path_factory.mktemp("lanes") / "w.sock") as address:
        yield address


@pytest.fixture(scope="module")
def hasty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker whose task timeout (2 s) the tests run past."""
    with running(tmp_path_factory.mktemp("hasty") / "w.sock", task_timeout=2.0) as address:
        yield address


@pytest.fixture(autouse=True)
def leasing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients made here take lanes (the suite's are told not to: conftest)."""
    monkeypatch.delenv("VACCELRAY_DIRECT", raising=False)


@pytest.fixture
def client(worker: str) -> Iterator[Client]:
    with Client(worker) as c:
        yield c


def laned(client: Client, handle: ActorHandle[Any]) -> ActorLane:
    """This thread's lane to *handle*'s actor, once it has one (calls ask for it)."""
    key = (threading.get_ident(), handle.actor_id)

    def ready() -> bool:
        lane = client._core._direct.get(key)
        if isinstance(lane, ActorLane) and not lane.closed:
            return True
        handle.pid.remote().result(timeout=60)  # (a lost one is asked for again)
        return False

    until(ready, "the thread's lane to the actor")
    lane = client._core._direct[key]
    assert isinstance(lane, ActorLane)
    assert lane.owner == threading.get_ident()  # this thread reads it, no helper
    return lane


def test_sync_calls_go_to_the_actors_process_and_answer_as_the_worker_would(
    client: Client,
) -> None:
    keeper = Keeper.remote_on(client)
    by_worker = keeper.pid.remote().result(timeout=60)
    lane = laned(client, keeper)
    ref = keeper.note.remote("a")
    assert ref._lane is lane, "the call went by the worker"
    first = ref.result(timeout=60)
    assert keeper.pid.remote().result(timeout=60) == by_worker  # the same process
    # A call with a timeout of its own goes by the worker, and sees the same instance.
    timed = keeper.note.options(timeout=60).remote("b")
    assert not isinstance(timed._lane, ActorLane)
    assert timed.result(timeout=60) == first + 1
    raised = keeper.fail.remote(7)
    assert raised._lane is lane
    with pytest.raises(Custom) as info:
        raised.result(timeout=60)
    assert (info.value.args, info.value.code) == (("bad 7",), 7)
    assert keeper.history.remote().result(timeout=60)[-2:] == ["a", "b"]


def test_a_request_made_while_a_lane_call_is_out_waits_for_its_answer(
    client: Client, tmp_path: Path
) -> None:
    keeper = Keeper.remote_on(client)
    laned(client, keeper)
    gate = str(tmp_path / "gate")
    held = keeper.wait_for.remote(gate)
    assert isinstance(held._lane, ActorLane)
    later = keeper.note.remote("later")
    line = client._core.actors._lines

    def placed() -> bool:
        waiting = line.get(keeper.actor_id)
        return later.task_id in client._core._running or (
            waiting is not None and any(r.ref is later for r in waiting.backlog)
        )

    until(placed, "the later request was taken up by the client's loop")
    assert later.task_id not in client._core._running, "it left before the lane's call ended"
    Path(gate).touch()
    assert later.result(timeout=60) == len(keeper.history.remote().result(timeout=60))
    assert held.result(timeout=60) == "seen"
    assert keeper.history.remote().result(timeout=60)[-2:] == ["wait", "later"]


def test_a_lane_ends_with_its_actors_process_and_the_next_call_finds_it_again(
    client: Client,
) -> None:
    keeper = Keeper.options(max_restarts=1).remote_on(client)
    old = keeper.pid.remote().result(timeout=60)
    lane = laned(client, keeper)
    crashed = keeper.crash.remote()
    assert crashed._lane is lane
    lost = f"actor {keeper.actor_id} was lost while running Keeper.crash: its process ended"
    with pytest.raises(vaccelray.ActorDiedError, match=re.escape(lost)):
        crashed.result(timeout=60)
    assert lane.closed
    assert laned(client, keeper) is not lane  # a lane to the process created again
    assert keeper.pid.remote().result(timeout=60) != old


def test_an_unused_lane_is_let_go_and_asked_for_again(
    worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "LEASE_IDLE", 0.05)
    with Client(worker) as client:
        keeper = Keeper.remote_on(client)
        lane = laned(client, keeper)
        assert keeper.note.remote("used").result(timeout=60) == 1  # (on the lane)
        key = (threading.get_ident(), keeper.actor_id)
        until(lambda: lane.closed and key not in client._core._direct, "the idle lane was closed")
        assert keeper.note.remote("again").result(timeout=60) == 2
        assert laned(client, keeper) is not lane


def test_kill_ends_the_lane_and_later_calls_fail(client: Client) -> None:
    keeper = Keeper.remote_on(client)
    lane = laned(client, keeper)
    assert vaccelray.kill(keeper) is True
    with pytest.raises(vaccelray.ActorDiedError):
        keeper.pid.remote().result(timeout=60)
    until(lambda: lane.closed or lane._peer_closed(), "the lane saw its process end")


def test_cancel_of_a_lane_call_runs_on_unless_forced(client: Client, tmp_path: Path) -> None:
    keeper = Keeper.options(max_restarts=1).remote_on(client)
    old = keeper.pid.remote().result(timeout=60)
    laned(client, keeper)
    gate = str(tmp_path / "gate")
    running = keeper.wait_for.remote(gate)
    assert isinstance(running._lane, ActorLane)
    until(lambda: os.path.exists(gate + ".started"), "the call started")
    with pytest.raises(vaccelray.CallRunningError, match="is running"):
        running.cancel()
    assert running.cancel(force=True) is True
    with pytest.raises(vaccelray.TaskCancelledError):
        running.result(timeout=60)
    assert keeper.pid.remote().result(timeout=60) != old  # created again


def test_a_lane_call_past_the_task_timeout_fails_and_its_actor_is_created_again(
    hasty: str,
) -> None:
    with Client(hasty) as client:
        keeper = Keeper.options(max_restarts=2).remote_on(client)
        old = keeper.pid.remote().result(timeout=60)
        laned(client, keeper)
        slow = keeper.sleep.remote(60)
        assert isinstance(slow._lane, ActorLane)
        with pytest.raises(vaccelray.TaskTimeoutError, match=r"Keeper\.sleep did not finish"):
            slow.result(timeout=60)
        assert keeper.pid.remote().result(timeout=60) != old
        # A call that swallows the timeout's exception is ended a little later all the same.
        laned(client, keeper)
        stubborn = keeper.stubborn.remote(60)
        assert isinstance(stubborn._lane, ActorLane)
        with pytest.raises(vaccelray.ActorDiedError, match="was lost while running"):
            stubborn.result(timeout=60)


def test_an_actor_with_lanes_gives_the_workers_calls_twice_the_task_timeout(
    hasty: str,
) -> None:
    """One of the worker's calls may wait in the process behind a lane's."""
    with Client(hasty) as client:
        plain = Keeper.remote_on(client)
        with pytest.raises(vaccelray.TaskTimeoutError):
            plain.sleep.options(timeout=60).remote(3).result(timeout=60)
        keeper = Keeper.remote_on(client)
        laned(client, keeper)
        assert keeper.sleep.options(timeout=60).remote(3).result(timeout=60) == 3


# -- the lane's frames, as a hostile client writes them -------------------------------


def _ask(address: str, rpc: Any, request: Any) -> Any:
    """*request*'s answer, asked on a connection of its own."""

    async def ask() -> Any:
        conn = await open_client(address)
        try:
            return await conn.call_rpc(rpc, request, timeout=30)
        finally:
            await conn.aclose()

    return asyncio.run(ask())


def _lease(address: str, actor_id: str) -> socket.socket:
    """A lane to the actor's process, asked for and fetched without the client library."""
    sock = handed(_ask(address, LEASE_ACTOR, actor_wire.LeaseActor(actor_id)), 30)
    sock.settimeout(60)
    return sock


def _lease_if_room(address: str, actor_id: str) -> socket.socket | None:
    """A lane, or None while the actor's process serves its most (RESOURCE_EXHAUSTED)."""
    try:
        return _lease(address, actor_id)
    except RPCError as exc:
        if exc.code != StatusCode.RESOURCE_EXHAUSTED:
            raise
        return None


def _cancel(address: str, request: actor_wire.CancelActorCall) -> actor_wire.CallState:
    state: actor_wire.CallState = _ask(address, CANCEL_ACTOR_CALL, request).state
    return state


def _call(sock: socket.socket, run: Run) -> Done:
    sock.sendall(encode_frame(msgspec.msgpack.Encoder(), run))
    return _read(sock)


def _read(sock: socket.socket) -> Done:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            assert more, "the lane closed"
            data += more
        return data

    (size,) = _HEADER.unpack(exactly(_HEADER.size))
    return msgspec.msgpack.decode(exactly(size), type=Done)


def _method(seq: int, method: str, *args: Any) -> Run:
    import pickle

    return Run(seq, "", f"Keeper.{method}", None, pickle.dumps((args, {})), method=method)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_lane_carries_method_calls_only(client: Client, worker: str) -> None:
    keeper = Keeper.remote_on(client)
    keeper.ready().result(timeout=60)
    with _lease(worker, keeper.actor_id) as lane:
        done = _call(lane, _method(1, "note", "raw"))
        assert (done.seq, done.status) == (1, OK)
        for run in (
            _method(2, "__init__"),
            _method(3, "_private"),
            Run(4, "d", "f", b"code", b""),  # a function to load: code of the caller's choice
            Run(5, "", "Keeper.note", None, b"", method="note", objects={"o": b"x"}),
            Run(6, "", "Keeper.note", None, b"", method="note", segments=("s",)),
            Run(7, "", "Keeper.note", None, b"", method="note", args_object="o"),
            Run(8, "", "Keeper.note", None, b"", method="note", forget=("d",)),
            Run(9, "", "Keeper.note", None, b"", method="note", segment_min=1),
        ):
            refused = _call(lane, run)
            assert (refused.seq, refused.status) == (run.seq, REJECTED), run
            assert "a lane carries method calls only" in refused.message
        assert keeper.history.remote().result(timeout=60) == ["raw"]


@pytest.mark.parametrize(
    "frame",
    [_HEADER.pack(DEFAULT_MAX_MESSAGE_SIZE + FRAME_MARGIN + 1), _HEADER.pack(3) + b"\xc1\xc1\xc1"],
    ids=["oversized", "undecodable"],
)
def test_a_lane_that_breaks_the_protocol_is_dropped_and_the_actor_serves_on(
    client: Client, worker: str, frame: bytes
) -> None:
    keeper = Keeper.remote_on(client)
    keeper.ready().result(timeout=60)
    with _lease(worker, keeper.actor_id) as bad, _lease(worker, keeper.actor_id) as good:
        bad.sendall(frame)
        assert _closed(bad)
        assert _call(good, _method(1, "note", "still")).status == OK
    assert keeper.history.remote().result(timeout=60) == ["still"]


def test_a_lane_that_does_not_read_its_answer_does_not_stall_the_actor(
    client: Client, worker: str
) -> None:
    keeper = Keeper.remote_on(client)
    keeper.ready().result(timeout=60)
    with _lease(worker, keeper.actor_id) as lazy:
        # 2 MiB: more than a socket's buffer holds, less than a reply may carry.
        lazy.sendall(encode_frame(msgspec.msgpack.Encoder(), _method(1, "blob", 2 << 20)))
        lazy.sendall(encode_frame(msgspec.msgpack.Encoder(), _method(2, "note", "queued")))
        # The answer waits in the process while others are served.
        for i in range(3):
            assert keeper.note.options(timeout=60).remote(str(i)).result(timeout=60) == i + 1
        assert keeper.history.remote().result(timeout=60) == ["0", "1", "2"]
        done = _read(lazy)
        assert (done.seq, done.status, len(done.result) > 2 << 20) == (1, OK, True)
        assert _read(lazy).status == OK  # read once its answer was written
    assert keeper.history.remote().result(timeout=60)[-1] == "queued"


def test_an_actors_process_serves_a_bounded_number_of_lanes(client: Client, worker: str) -> None:
    keeper = Keeper.remote_on(client)
    keeper.ready().result(timeout=60)
    lanes = [_lease(worker, keeper.actor_id) for _ in range(MAX_LANES)]
    try:
        with pytest.raises(RPCError) as refused:
            _lease(worker, keeper.actor_id)
        assert refused.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert f"serves {MAX_LANES}, its most" in refused.value.message
        lanes.pop().close()  # the process sees it close, and has room again

        def room() -> bool:
            lane = _lease_if_room(worker, keeper.actor_id)
            if lane is not None:
                lanes.append(lane)
            return lane is not None

        until(room, "a closed lane made room for another")
        assert _call(lanes[-1], _method(1, "note", "last")).status == OK
    finally:
        for lane in lanes:
            lane.close()


def test_lease_actor_names_what_is_wrong(client: Client, worker: str) -> None:
    with pytest.raises(RPCError) as unknown:
        _lease(worker, "f" * 32)
    assert unknown.value.code == StatusCode.NOT_FOUND
    keeper = Keeper.remote_on(client)
    keeper.ready().result(timeout=60)
    vaccelray.kill(keeper)
    with pytest.raises(RPCError) as dead:
        _lease(worker, keeper.actor_id)
    assert dead.value.code == StatusCode.ABORTED


def test_cancel_of_a_direct_call_kills_the_process_only_when_forced(
    client: Client, worker: str
) -> None:
    keeper = Keeper.options(max_restarts=1).remote_on(client)
    old = keeper.pid.remote().result(timeout=60)
    ask = actor_wire.CancelActorCall
    # No lane yet: nothing of the worker's to kill for it.
    assert _cancel(worker, ask(keeper.actor_id, "x", True, True)) == actor_wire.CallState.ENDED
    with _lease(worker, keeper.actor_id) as lane:
        assert _call(lane, _method(1, "pid")).status == OK
        assert _cancel(worker, ask(keeper.actor_id, "x", False, True)) == (
            actor_wire.CallState.RUNNING
        )
        assert keeper.pid.remote().result(timeout=60) == old
        assert _cancel(worker, ask(keeper.actor_id, "x", True, True)) == (
            actor_wire.CallState.KILLED
        )
        assert _closed(lane)
    until(lambda: keeper.pid.remote().result(timeout=60) != old, "the actor was created again")


@pytest.mark.anyio
async def test_through_a_scheduler_on_a_unix_socket_calls_go_by_the_scheduler(
    workers: list[tuple[Proc, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A scheduler hands out no lanes: the lease is refused, and the calls go on as before."""
    cfg = replace(config(*(a for _, a in workers)), addresses=(f"unix://{tmp_path}/s.sock",))
    async with serving_scheduler(cfg) as sched:

        def calls() -> tuple[list[int], object]:
            with Client(sched.addresses[0]) as client:
                keeper = Keeper.remote_on(client)
                key = (threading.get_ident(), keeper.actor_id)
                counts = [keeper.note.remote(str(i)).result(timeout=60) for i in range(2)]
                until(lambda: client._core._direct.get(key) is not LEASING, "the lease answered")
                counts += [keeper.note.remote(str(i)).result(timeout=60) for i in range(2, 4)]
                return counts, client._core._direct[key]

        counts, lane = await anyio.to_thread.run_sync(calls)
    assert counts == [1, 2, 3, 4]
    assert lane is None  # (asked once, refused: never again for this thread and actor)


def test_a_forced_cancel_of_a_lane_call_kills_an_actor_without_restarts(
    client: Client, worker: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = Keeper.remote_on(client)
    lane = laned(client, keeper)
    for i in range(3):
        assert keeper.note.remote(str(i)).result(timeout=60) == i + 1
    assert lane._process.calls == {}  # (each call leaves the table with its answer)
    gate = str(tmp_path / "gate")
    running = keeper.wait_for.remote(gate)
    until(lambda: os.path.exists(gate + ".started"), "the call started")
    assert running.cancel(force=True) is True
    why = "was killed to stop a call of a lane (cancelled with force)"
    with pytest.raises(vaccelray.ActorDiedError, match=re.escape(why)):
        keeper.pid.remote().result(timeout=60)
    assert f"Actor Keeper {keeper.actor_id} {why}" in caplog.messages
    with pytest.raises(RPCError) as gone:  # lost, not killed: its id may be created again
        _lease(worker, keeper.actor_id)
    assert gone.value.code == StatusCode.NOT_FOUND


def test_a_forced_cancel_with_restarts_left_says_so(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = Keeper.options(max_restarts=1).remote_on(client)
    laned(client, keeper)
    gate = str(tmp_path / "gate")
    running = keeper.wait_for.remote(gate)
    until(lambda: os.path.exists(gate + ".started"), "the call started")
    assert running.cancel(force=True) is True
    assert keeper.note.remote("after").result(timeout=60) == 1  # a new instance
    assert (
        f"Actor Keeper {keeper.actor_id} was killed to stop a call of a lane (cancelled with "
        "force)" in caplog.messages
    )


@pytest.mark.anyio
async def test_lease_actor_is_refused_off_unix_without_actors_and_with_leases_off() -> None:
    request = LEASE_ACTOR.request.encode(actor_wire.LeaseActor("a" * 32))
    with _service() as service:
        with pytest.raises(RPCError) as off_unix:
            await service._lease_actor(request, _ctx(1))
        assert (off_unix.value.code, off_unix.value.message) == (
            StatusCode.FAILED_PRECONDITION,
            "an actor's lane is leased only on a unix socket (the client must be on this host)",
        )
        with pytest.raises(RPCError) as none:
            await service._lease_actor(request, _ctx(1, os.getuid()))
        assert (none.value.code, none.value.message) == (
            StatusCode.FAILED_PRECONDITION,
            "this worker runs no actors",
        )
    with _service(max_leases=0) as service:
        with pytest.raises(RPCError) as off:
            await service._lease_actor(request, _ctx(1, os.getuid()))
        assert (off.value.code, off.value.message) == (
            StatusCode.FAILED_PRECONDITION,
            "this worker leases no actor lanes (worker option --max-leases)",
        )


def test_a_lanes_answers_read_as_the_workers_replies() -> None:
    """The codec alone: each Done becomes the reply (or the status) the worker would send."""
    import pickle

    from vaccelray.client.actorlanes import _ActorProcess
    from vaccelray.protocol.services import CALL_ACTOR
    from vaccelray.protocol.tasks import TaskDone
    from vaccelray.worker.poolchild import TIMED_OUT

    process = _ActorProcess("an-actor", 1000)
    encoder = msgspec.msgpack.Encoder()
    seqs = [process.call(f"Keeper.m{i}", f"m{i}", b"")[0] for i in range(4)]
    assert process.next_event() is None  # nothing came yet
    for done in (
        Done(seqs[0], OK, pickle.dumps(7)),
        Done(seqs[1], TIMED_OUT, message="Keeper.m1 ran past its timeout"),
        Done(seqs[2], OK, b"x" * 2000),  # more than a reply may carry here
    ):
        process.receive_data(bytes(encode_frame(encoder, done)))
    ok, late, large = process.next_event(), process.next_event(), process.next_event()
    assert ok is not None
    assert late is not None
    assert large is not None
    assert (ok.stream_id, ok.code, ok.message, ok.details) == (seqs[0], 0, "", ())
    reply = CALL_ACTOR.reply.decode(ok.payload)
    assert isinstance(reply, TaskDone)
    assert pickle.loads(reply.result) == 7
    assert (late.stream_id, late.code, late.payload) == (seqs[1], StatusCode.DEADLINE_EXCEEDED, b"")
    assert late.message.startswith("Keeper.m1 ran past its timeout, the worker's task timeout")
    assert process.ending  # the process ends after that answer
    assert (large.stream_id, large.code, large.payload) == (
        seqs[2],
        StatusCode.RESOURCE_EXHAUSTED,
        b"",
    )
    assert large.message.startswith("CallActor response of ")
    assert list(process.calls) == [seqs[3]]  # answered calls leave the table
    # An answer to a call never made is let by (the lane has no one waiting for it).
    process.receive_data(bytes(encode_frame(encoder, Done(999, OK))))
    stray = process.next_event()
    assert stray is not None
    assert stray.stream_id == 999
    lost = process.lost(seqs[3])
    assert (lost.code, lost.message) == (
        StatusCode.UNAVAILABLE,
        "actor an-actor was lost while running Keeper.m3: its process ended",
    )
    assert process.calls == {}


def test_a_lane_not_fetched_in_time_is_withdrawn_and_frees_its_place(
    client: Client, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leases, "TICKET_TTL", 0.05)
    keeper = Keeper.remote_on(client)
    keeper.ready().result(timeout=60)
    for _ in range(MAX_LANES):  # asked for, never fetched
        _ask(worker, LEASE_ACTOR, actor_wire.LeaseActor(keeper.actor_id))

    def room() -> bool:
        lane = _lease_if_room(worker, keeper.actor_id)
        if lane is not None:
            lane.close()
        return lane is not None

    until(room, "the lanes not fetched were withdrawn")
