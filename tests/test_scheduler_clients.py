"""A client's connections through a scheduler process (on a unix socket, as a local
client's blocking lanes need): a Cancel reaches a task whichever of the client's
connections it came by, and no other client's; a gone client's objects are released
after the worker's grace period, counted from the client's last connection to the
scheduler, not the scheduler's to the worker."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import vaccelray
from tests.processes import Proc, scheduler_argv, start_daemon
from tests.test_objects_cluster import blob, held_by
from tests.test_objects_store import get, put, served
from tests.test_offload_api import Custom, add, raises
from tests.test_scheduler_tasks import (  # noqa: F401
    cluster,
    held,
    running_on,
    task_worker_argv,
    workers,
)
from tests.waiting import until
from vaccelray.client import Client
from vaccelray.client.objects import INLINE
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import objects as objects_wire
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.services import (
    CANCEL,
    CLIENT_PRESENCE,
    GET_OBJECT,
    PUT_OBJECT,
    RELEASE_OBJECTS,
    SUBMIT,
)
from vaccelray.scheduler import clients as clients_module
from vaccelray.scheduler.clients import (
    MAX_CANCELLED_EARLY,
    MAX_CLIENTS_PER_CONNECTION,
    ClientTable,
)
from vaccelray.testing import connect_member
from vaccelray.transport.client import Client as TransportClient


@contextmanager
def scheduler_and_worker(
    tmp_path: Path, *worker_args: str, scheduler_args: Sequence[str] = ()
) -> Iterator[tuple[Proc, Proc, str]]:
    """A task worker behind a scheduler on a unix socket: (the worker, the scheduler,
    its address), once the scheduler has seen the worker up."""
    worker, worker_address = start_daemon([*task_worker_argv(), *worker_args])
    try:
        sched, address = start_daemon(
            scheduler_argv(
                "-a", f"unix://{tmp_path}/sched.sock", "--no-discover", "--worker", worker_address,
                *scheduler_args,
            )
        )  # fmt: skip
        try:
            sched.wait_for(f"Worker {worker_address} is up")
            yield worker, sched, address
        finally:
            sched.stop()
    finally:
        worker.stop()


@contextmanager
def behind_a_scheduler(tmp_path: Path, *worker_args: str) -> Iterator[tuple[Proc, str]]:
    """The same, without the scheduler: (the worker, the scheduler's address)."""
    with scheduler_and_worker(tmp_path, *worker_args) as (worker, _, address):
        yield worker, address


@pytest.fixture
def scheduled(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    with behind_a_scheduler(tmp_path) as started:
        yield started


async def _cancel(address: str, task_id: str, client: str) -> tuple[str, ...]:
    async with connect_member(address) as conn:
        reply = await conn.call_rpc(CANCEL, wire.Cancel((task_id,), client))
    return reply.task_ids


def test_a_lane_call_is_cancelled_through_the_scheduler_by_its_client_only(
    scheduled: tuple[Proc, str], tmp_path: Path
) -> None:
    worker, address = scheduled
    warm, marks = tmp_path / "warm", tmp_path / "marks"
    for path in (warm, marks, warm / "go"):
        path.mkdir()
    with Client(address) as client:
        task = held.options(retries=0)
        assert client.submit(task, str(warm)).result(timeout=60) == worker.pid  # registered
        ref = client.submit(task, str(marks))
        assert ref._lane is not None  # the call went by its own connection
        until(lambda: running_on(marks, worker) == 1, "the task runs in a pool process")
        # Another connection cannot: not by the task's id, nor with another client's id.
        assert asyncio.run(_cancel(address, ref.task_id, "")) == ()
        assert asyncio.run(_cancel(address, ref.task_id, "f" * 32)) == ()
        # Its client can, by its main connection.
        assert ref.cancel()
        with pytest.raises(vaccelray.TaskCancelledError):
            ref.result(timeout=60)
        worker.wait_for(f"Cancelled task {ref.task_id} ")
        worker.wait_for(r"Killing pool process \d+ to stop task held")
        # The lane's call was answered (cancelled): the lane is free again.
        lane = ref._lane
        lane.pump(lambda: lane.idle, 60)
        assert lane.idle
        assert client.submit(add, 2, 2).result(timeout=60) == 4


def test_a_cancel_that_comes_before_its_submit_stops_it(scheduled: tuple[Proc, str]) -> None:
    """A lane's Submit and its client's Cancel race to the scheduler by two connections."""
    _, address = scheduled
    with Client(address) as client:
        assert client.submit(add, 1, 1).result(timeout=60) == 2  # the scheduler has add
        spec = add.spec()
        args = cloudpickle.dumps(((2, 3), {}))
        me = client._core.client_id

        async def race() -> None:
            assert await _cancel(address, "early", me) == ()
            async with connect_member(address) as conn:
                # Another client's task of the same id runs; this client's is cancelled.
                other = wire.Submit("early", spec.digest, spec.name, args, client="f" * 32)
                done = await conn.call_rpc(SUBMIT, other)
                assert isinstance(done, wire.TaskDone)
                assert cloudpickle.loads(done.result) == 5
                mine = wire.Submit("early", spec.digest, spec.name, args, client=me)
                with pytest.raises(RPCError) as cancelled:
                    await conn.call_rpc(SUBMIT, mine)
                assert cancelled.value.code == StatusCode.CANCELLED
                # Once: the same id again runs.
                done = await conn.call_rpc(SUBMIT, mine)
                assert isinstance(done, wire.TaskDone)

        asyncio.run(race())


# -- a gone client's objects ------------------------------------------------------------


def test_a_gone_clients_objects_are_released_after_the_grace_through_a_scheduler(
    tmp_path: Path,
) -> None:
    with (
        behind_a_scheduler(tmp_path, "--object-grace", "1") as (worker, address),
        Client(address) as staying,
    ):
        worker_address = worker.address
        kept = staying.put(b"s" * 1000)
        with Client(address) as leaving:
            put = leaving.put(b"l" * 1000)
            large = leaving.submit(blob, 2 * INLINE)  # its result stays on the worker
            large.result(timeout=60)
            gone_ids = [put.object_id, large._future.result().object_id]
            me = leaving._core.client_id
            assert all(asyncio.run(held_by(worker_address, i)) for i in gone_ids)
            start = len(worker.lines)
        # Its connections to the scheduler closed; the scheduler's to the worker did not.
        worker.wait_for(
            f"Client {me} has no connection left: its 2 objects are released in 1 s",
            start=start,
        )
        worker.wait_for(f"Released 2 objects of client {me} ", start=start)
        assert not any(asyncio.run(held_by(worker_address, i)) for i in gone_ids)
        # The other client's are not.
        assert vaccelray.get(kept, timeout=60) == b"s" * 1000
        assert staying._core.client_id not in worker.text()


def test_a_client_that_only_put_objects_is_told_gone_to_their_worker(tmp_path: Path) -> None:
    """Its puts alone tie it to its connection (no task named it)."""
    with behind_a_scheduler(tmp_path, "--object-grace", "1") as (worker, address):
        with Client(address) as leaving:
            put = leaving.put(b"l" * 1000)
            me = leaving._core.client_id
            assert asyncio.run(held_by(worker.address, put.object_id))
            start = len(worker.lines)
        worker.wait_for(f"Released 1 objects of client {me} ", start=start)
        assert not asyncio.run(held_by(worker.address, put.object_id))


def test_a_ref_handed_to_another_client_outlives_its_maker_through_a_scheduler(
    tmp_path: Path,
) -> None:
    with behind_a_scheduler(tmp_path, "--object-grace", "1") as (worker, address):
        taker = vaccelray.init(address)
        try:
            with Client(address) as maker:
                ref = maker.put(b"h" * 1000)
                maker_id = maker._core.client_id
                handed = pickle.loads(pickle.dumps(ref))  # a ref of the default client
                start = len(worker.lines)
            worker.wait_for(f"Released 1 objects of client {maker_id} ", start=start)
            assert vaccelray.get(handed, timeout=60) == b"h" * 1000
            taker_id = taker._core.client_id
            start = len(worker.lines)
        finally:
            vaccelray.shutdown()
        # The taker left holding its ref: the scheduler told the worker, whose grace ends it.
        worker.wait_for(f"Released 1 objects of client {taker_id} ", start=start)
        assert not asyncio.run(held_by(worker.address, handed.object_id))


def test_a_clients_objects_outlive_its_worker_being_down_a_while(tmp_path: Path) -> None:
    """The scheduler closed its connection to a worker it saw down, and the worker began
    the grace of every client on it: once up again, the scheduler renews the claims of
    the clients still present at once (not at their next call, which may come late)."""
    quick = ("--health-interval", "0.2", "--health-timeout", "0.5")
    with (
        scheduler_and_worker(tmp_path, "--object-grace", "600", scheduler_args=quick) as (
            worker,
            sched,
            address,
        ),
        Client(address) as client,
    ):
        kept = client.put(b"k" * 1000)
        me = client._core.client_id
        start, mark = len(worker.lines), len(sched.lines)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            sched.wait_for(f"Worker {worker.address} is down", start=mark)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        worker.wait_for(f"Client {me} has no connection left", start=start)
        worker.wait_for(f"Client {me} is back: its 1 objects are kept", start=start)
        assert vaccelray.get(kept, timeout=60) == b"k" * 1000


@pytest.mark.anyio
async def test_client_presence_ends_and_renews_one_connections_claim(tmp_path: Path) -> None:
    async with (
        served(tmp_path, grace=600) as small,
        small.connect() as scheduler,
        small.connect() as other,
    ):
        store = small.store

        async def presence(conn: TransportClient, client: str, present: bool) -> int:
            reply = await conn.call_rpc(
                CLIENT_PRESENCE, objects_wire.ClientPresence(client, present)
            )
            return reply.objects

        mine = await put(scheduler, b"mine", who="c")
        await put(scheduler, b"theirs", who="d")
        # Another connection cannot end c's claim on this one.
        assert await presence(other, "c", False) == 1
        assert store.in_grace() == frozenset()
        # c left the scheduler: its grace starts, d's does not.
        assert await presence(scheduler, "c", False) == 1
        assert store.in_grace() == {"c"}
        # Back: the grace stops.
        assert await presence(scheduler, "c", True) == 1
        assert store.in_grace() == frozenset()
        # A client that also speaks on a connection of its own keeps its objects by it.
        assert await get(other, mine, who="c") == b"mine"
        assert await presence(scheduler, "c", False) == 1
        assert store.in_grace() == frozenset()
        assert await presence(scheduler, "", False) == 0  # names no client: nothing


class _Pool:
    """Records the calls a ClientTable starts (on open connections to these workers)."""

    def __init__(self, *open_to: str) -> None:
        self.open_to = open_to
        self.sent: list[tuple[str, str, bool]] = []
        self.connected: list[Callable[[str], None]] = []

    def add_connected_listener(self, listener: Callable[[str], None]) -> None:
        self.connected.append(listener)

    def start(
        self, address: str, service: str, method: str, payload: bytes, *args: Any, **kw: Any
    ) -> object:
        assert (service, method) == (CLIENT_PRESENCE.service, CLIENT_PRESENCE.method)
        if address not in self.open_to:
            return None
        request = CLIENT_PRESENCE.request.decode(payload)
        self.sent.append((address, request.client, request.present))
        return object()


def test_the_scheduler_tells_the_workers_a_client_used_when_its_last_connection_closes() -> None:
    pool = _Pool("w1", "w2", "w3")
    table = ClientTable(pool)  # type: ignore[arg-type]
    table.seen("c", 1)
    table.seen("c", 2)  # a lane
    table.used("c", "w1")
    table.used("c", "w2", owns=True)
    table.seen("d", 3)
    assert table.holds_state(1)  # c owns objects: its connections are kept open
    assert table.holds_state(2)
    assert not table.holds_state(3)
    table.connection_closed(2)
    assert pool.sent == []  # c has a connection left
    table.connection_closed(1)
    assert sorted(pool.sent) == [("w1", "c", False), ("w2", "c", False)]
    assert not table.holds_state(1)
    table.connection_closed(3)  # d used no worker: nothing to tell
    assert len(pool.sent) == 2
    pool.sent.clear()
    table.seen("c", 4)  # back: its workers hold its objects for it again
    assert sorted(pool.sent) == [("w1", "c", True), ("w2", "c", True)]
    pool.sent.clear()
    table.seen("c", 5)
    table.seen("", 5)  # names no client: nothing to track
    assert pool.sent == []
    # A new connection to a worker: the clients owning objects there claim them on it.
    table.seen("e", 6)
    table.used("e", "w2", owns=True)
    table.seen("f", 7)
    table.used("f", "w2")  # sent tasks there, owns nothing: no claim to renew
    table.used("d", "w2", owns=True)  # d is gone: its claims ended (its grace runs)
    [connected] = pool.connected
    connected("w2")
    assert sorted(pool.sent) == [("w2", "c", True), ("w2", "e", True)]
    pool.sent.clear()
    connected("w3")  # no client used it
    assert pool.sent == []


def test_a_connection_names_few_clients_and_few_gone_ones_are_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = _Pool("w")
    table = ClientTable(pool)  # type: ignore[arg-type]
    for i in range(MAX_CLIENTS_PER_CONNECTION):
        table.seen(f"c{i}", 1)
    table.seen("c0", 1)  # known: no more room needed
    with pytest.raises(RPCError) as refused:
        table.seen("one-more", 1)
    assert refused.value.code == StatusCode.RESOURCE_EXHAUSTED
    table.seen("one-more", 2)  # another connection has room
    monkeypatch.setattr(clients_module, "MAX_GONE", 2)
    for i in range(3):
        table.seen(f"g{i}", 10 + i)
        table.used(f"g{i}", "w")
        table.connection_closed(10 + i)
    pool.sent.clear()
    for i in range(3):
        table.seen(f"g{i}", 20)
    # The oldest gone one was forgotten: its worker learns it is back by its next request.
    assert pool.sent == [("w", "g1", True), ("w", "g2", True)]


def test_wait_takes_object_refs_beside_task_refs(
    scheduled: tuple[Proc, str], tmp_path: Path
) -> None:
    _, address = scheduled
    with Client(address) as client:
        stored = client.put([1, 2])
        assert vaccelray.wait([stored]) == ([stored], [])
        ref = client.submit(held.options(retries=0), str(tmp_path))  # runs until "go"
        # The stored object is done at once; the task is not.
        assert vaccelray.wait([ref, stored], timeout=60) == ([stored], [ref])
        assert vaccelray.get(stored) == [1, 2]
        with pytest.raises(TypeError, match="takes TaskRefs and ObjectRefs, not int"):
            vaccelray.wait([stored, 3])  # type: ignore[list-item]
        (tmp_path / "go").touch()
        assert vaccelray.wait([ref, stored], num_returns=2, timeout=60) == ([ref, stored], [])


# -- refs in an actor's arguments ----------------------------------------------------------


@vaccelray.offload
class Keeper:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def combine(self, items: list[Any], extra: Any = None) -> tuple[Any, list[Any], Any]:
        return self.config, items, extra


def test_refs_in_an_actors_arguments_stand_for_their_values(
    scheduled: tuple[Proc, str], tmp_path: Path
) -> None:
    worker, address = scheduled
    with Client(address) as client:
        stored = client.put({"w": [1, 2]})
        keeper = Keeper.remote_on(client, {"weights": stored})
        done = client.submit(add, 2, 3)
        large = client.submit(blob, INLINE + 1000)  # its result stays on the worker
        call = keeper.combine.remote([done, stored], extra=large)
        assert vaccelray.get(call, timeout=60) == (
            {"weights": {"w": [1, 2]}},
            [5, {"w": [1, 2]}],
            b"b" * (INLINE + 1000),
        )
        # A TaskRef without a result yet: the call waits for it, the next one behind it.
        waiting = client.submit(held.options(retries=0), str(tmp_path))
        first = keeper.combine.remote({"k": (waiting,)})  # type: ignore[arg-type]
        second = keeper.combine.remote([])
        (tmp_path / "go").touch()
        assert vaccelray.get([first, second], timeout=60) == [
            ({"weights": {"w": [1, 2]}}, {"k": (worker.pid,)}, None),
            ({"weights": {"w": [1, 2]}}, [], None),
        ]
        # A failed one fails the call with its error.
        with pytest.raises(Custom, match="bad 4"):
            vaccelray.get(keeper.combine.remote([client.submit(raises, 4)]), timeout=60)


# -- the object methods on the scheduler -----------------------------------------------------


@pytest.mark.anyio
async def test_object_calls_are_checked_at_the_scheduler_and_released_on_each_worker(
    workers: list[tuple[Proc, str]],  # noqa: F811
) -> None:
    async with cluster(workers) as (sched, _), connect_member(sched.addresses[0]) as conn:
        # Out-of-bounds fields are refused at the door (not looked up: NOT_FOUND).
        long_id = "0" * (objects_wire.MAX_OBJECT_ID + 1)
        for rpc, request in (
            (PUT_OBJECT, objects_wire.PutObject(long_id, 0, b"x", 1, True, "c")),
            (GET_OBJECT, objects_wire.GetObject(long_id, 0, 1, "c")),
            (RELEASE_OBJECTS, objects_wire.ReleaseObjects((long_id,), "c")),
        ):
            with pytest.raises(RPCError) as refused:
                await conn.call_rpc(rpc, request)
            assert refused.value.code == StatusCode.INVALID_ARGUMENT, rpc.method
        # One object on each worker; one release names both, and one of a worker gone.
        ids = []
        for _, address in workers:
            async with connect_member(address) as direct:
                ids.append(await put(direct, b"mine", who="c"))
        lost = "0" * 16 + "-" + "1" * 32
        reply = await conn.call_rpc(RELEASE_OBJECTS, objects_wire.ReleaseObjects((lost, *ids), "c"))
        assert reply.released == 2
        assert not any(
            [await held_by(address, i) for (_, address), i in zip(workers, ids, strict=True)]
        )


def test_each_client_has_its_own_early_cancels_while_it_is_connected() -> None:
    table = ClientTable(_Pool())  # type: ignore[arg-type]
    table.cancel_early("me", 1, "t0")
    # Another client's flood pushes out none of mine.
    for i in range(MAX_CANCELLED_EARLY + 10):
        table.cancel_early("flood", 2, f"x{i}")
    assert not table.cancelled_before("flood", "x9")  # its own oldest went
    assert table.cancelled_before("flood", f"x{MAX_CANCELLED_EARLY + 9}")
    assert not table.cancelled_before("other", "t0")  # by client: not another's
    assert table.cancelled_before("me", "t0")
    assert not table.cancelled_before("me", "t0")  # once
    # A client's own are bounded: its newest are kept.
    for i in range(MAX_CANCELLED_EARLY + 1):
        table.cancel_early("me", 1, f"t{i}")
    assert not table.cancelled_before("me", "t0")
    assert table.cancelled_before("me", "t1")
    assert table.cancelled_before("me", f"t{MAX_CANCELLED_EARLY}")
    # Named by a connection like any request: a few clients each.
    for i in range(MAX_CLIENTS_PER_CONNECTION - 1):
        table.cancel_early(f"c{i}", 1, "t")
    with pytest.raises(RPCError) as refused:
        table.cancel_early("one-more", 1, "t")
    assert refused.value.code == StatusCode.RESOURCE_EXHAUSTED
    # Gone with the client's last connection (back, it has none).
    table.cancel_early("me", 1, "late")
    table.used("me", "w")  # (remembered while gone, to tell w when it comes back)
    table.connection_closed(1)
    table.seen("me", 3)
    assert not table.cancelled_before("me", "late")
