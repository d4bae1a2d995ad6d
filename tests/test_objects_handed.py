"""Refs handed from one client to another: the receiver owns the object too, so it stays
while any of its owners holds a ref (or is within its grace period).

On a store served in this process (each test its own) for the store's rules, and on a
real worker process with real client programs for the pickled refs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pickle
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import vaccelray
from tests.processes import Proc, start_daemon, worker_argv
from tests.test_objects_client import blob, held_by_worker, stored, wait_until
from tests.test_objects_store import gone, put, release, served
from tests.test_objects_store import until as until_async
from tests.waiting import until
from vaccelray.addressing import ADDRESS_ENV_VARS
from vaccelray.auth import token_metadata
from vaccelray.client import objects as objects_module
from vaccelray.client.errors import ObjectLostError
from vaccelray.client.objects import INLINE, ObjectRef
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import GET_OBJECT, HOLD_OBJECTS, PUT_OBJECT, WORKER
from vaccelray.transport.client import Client, open_client
from vaccelray.transport.server import CallContext, Method, Service, serve
from vaccelray.worker.objects import DEFAULT_MAX_OWNERS

#: Liveness only.
PATIENCE = 60.0


async def hold(client: Client, *ids: str, who: str) -> int:
    return int((await client.call_rpc(HOLD_OBJECTS, wire.HoldObjects(ids, who))).held)


# -- the store's rules -------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_object_stays_while_any_of_its_owners_holds_it(tmp_path: Path) -> None:
    async with served(tmp_path) as small, small.connect() as maker, small.connect() as taker:
        object_id = await put(maker, b"shared", who="maker")
        other = await put(maker, b"other", who="maker")
        unknown = "f" * 16 + "-unknown"
        assert await hold(taker, unknown, object_id, other, who="taker") == 2  # (passed over)
        assert await hold(taker, object_id, who="taker") == 1  # once more: still one owner
        assert await release(maker, object_id, other, who="maker") == 2
        assert not await gone(taker, object_id)  # the taker holds it
        assert await release(taker, object_id, other, who="taker") == 2
        assert await gone(taker, object_id)  # its last owner released it


@pytest.mark.anyio
async def test_a_handed_object_outlives_its_makers_grace(tmp_path: Path) -> None:
    async with served(tmp_path) as small, small.connect() as watcher:
        store = small.store
        async with small.connect() as taker:
            async with small.connect() as maker:
                object_id = await put(maker, b"shared", who="maker")
                assert await hold(taker, object_id, who="taker") == 1

            async def makers_grace_over() -> bool:
                return store.owned_by("maker") == 0 and "maker" not in store.in_grace()

            await until_async(makers_grace_over, "the maker's grace ended")
            assert not await gone(watcher, object_id)
        await until_async(lambda: gone(watcher, object_id), "the taker left: the object released")


@pytest.mark.anyio
async def test_what_is_being_sent_or_gone_is_not_held(tmp_path: Path) -> None:
    async with served(tmp_path) as small, small.connect() as maker, small.connect() as taker:
        sending = await maker.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"par", 6, False, "maker"))
        released = await put(maker, b"gone", who="maker")
        assert await release(maker, released, who="maker") == 1
        assert await hold(taker, sending.object_id, released, who="taker") == 0
        assert small.store.owned_by("taker") == 0  # nothing recorded for it
        assert await release(taker, sending.object_id, who="taker") == 0


@pytest.mark.anyio
async def test_owners_are_bounded_and_what_was_held_before_the_bound_stays_owned(
    tmp_path: Path,
) -> None:
    async with served(tmp_path, max_owners=2) as small, small.connect() as maker:
        store = small.store
        crowded = await put(maker, b"crowded", who="maker")
        other = await put(maker, b"other", who="maker")
        async with small.connect() as first:
            assert await hold(first, crowded, who="first") == 1
        async with small.connect() as late:
            with pytest.raises(RPCError) as refused:
                await hold(late, other, crowded, who="late")
            assert refused.value.code == StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.message == (
                f"object {crowded} already has 2 owners, the limit: a client holding a ref to "
                "it must release it first"
            )
            assert store.owned_by("late") == 1  # *other*, held before the refusal
            assert await release(maker, other, who="maker") == 1
            assert not await gone(maker, other)
        # Its connection closed, "late" is gone after its grace, and *other* with it.
        await until_async(lambda: gone(maker, other), "the late client's object released")


# -- pickled refs, between client programs -------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    sock = tmp_path_factory.mktemp("handed") / "w.sock"
    proc, _ = start_daemon(
        worker_argv(
            "-a", f"unix://{sock}", "--backend", "noop", "--no-announce", "--pool-size", "1",
            "--object-grace", "0.2", "--log-level", "info",
        )
    )  # fmt: skip
    yield proc
    proc.stop()


#: A client program: it takes the pickled ref in the file argv[1], says so, and at SIGUSR1
#: prints the length of the value and exits.
RECEIVER = """
import pickle, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # (before any thread starts)
import vaccelray
with open(sys.argv[1], "rb") as f:
    ref = pickle.load(f)
print("holding", type(ref).__name__, flush=True)
signal.sigwait({signal.SIGUSR1})
print("got", len(vaccelray.get(ref)), flush=True)
"""


def test_a_ref_pickled_to_another_program_keeps_the_object_after_its_maker_left(
    worker: Proc, tmp_path: Path
) -> None:
    start = len(worker.lines)
    receiver: Proc | None = None
    try:
        with vaccelray.Client(worker.address) as maker:
            ref = maker.put(b"handed" * 1000)
            object_id, maker_id = ref.object_id, maker._core.client_id
            (tmp_path / "ref").write_bytes(pickle.dumps(ref))
            receiver = Proc(
                [sys.executable, "-c", RECEIVER, str(tmp_path / "ref")],
                env={"VACCELRAY_ADDRESS": worker.address},
            )
            receiver.wait_for(r"^holding ObjectRef$", stream="stdout")
        # The maker has left; once its grace is over, the receiver still owns the object.
        worker.wait_for(f"Released 1 objects of client {maker_id} ", start=start)
        assert held_by_worker(worker, object_id)
        receiver.signal(signal.SIGUSR1)
        receiver.wait_for(r"^got 6000$", stream="stdout")
        assert receiver.process.wait(PATIENCE) == 0
    finally:
        if receiver is not None:
            receiver.stop()  # (at once, when the test failed before it exited)
    # The receiver released it as it exited (or the worker did, after its grace).
    wait_until(lambda: not held_by_worker(worker, object_id), "the object released")


async def _unpickled_on_the_loop(data: bytes) -> Any:
    return pickle.loads(data)


@pytest.mark.parametrize("where", ["a thread of the program", "the client's loop"])
def test_a_kept_result_pickled_is_an_object_ref_its_taker_owns(worker: Proc, where: str) -> None:
    start = len(worker.lines)
    taker = vaccelray.init(worker.address)
    try:
        with vaccelray.Client(worker.address) as maker:
            large = maker.submit(blob, INLINE + 1, 3)
            kept = stored(large)
            assert kept is not None
            maker_id = maker._core.client_id
            data = pickle.dumps(large)
            if where == "the client's loop":
                ref = taker._thread.call(lambda: _unpickled_on_the_loop(data))
            else:
                ref = pickle.loads(data)
            assert type(ref) is vaccelray.ObjectRef
            assert (ref.object_id, ref.size) == (kept.object_id, kept.size)
            if where == "the client's loop":  # (sent, not waited for: a get comes after it)
                assert taker._core.objects.held(ref.object_id) == 1
        worker.wait_for(f"Released 1 objects of client {maker_id} ", start=start)
        assert vaccelray.get(ref) == bytes([3]) * (INLINE + 1)
        taker_id, start = taker._core.client_id, len(worker.lines)
    finally:
        vaccelray.shutdown()
    # The taker, by its own id, owned it: gone with its ref alive, its grace ends it.
    worker.wait_for(f"Released 1 objects of client {taker_id} ", start=start)


def test_a_ref_dropped_and_taken_back_in_one_turn_keeps_its_object(
    worker: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's last ref to an object is dropped, and a ref to it is taken (unpickled)
    on the client's loop before the release of the first has left: the client still owns
    the object, so neither the release nor a hold is sent (else the worker may take the
    hold, then the release, and drop the object)."""
    with vaccelray.Client(worker.address) as client:
        objects, loop = client._core.objects, client._core.loop
        holds: list[str] = []
        monkeypatch.setattr(objects, "_hold_soon", holds.append)
        refs = [client.put(b"kept" * 64)]
        object_id, size = refs[0].object_id, refs[0].size
        taken: concurrent.futures.Future[tuple[int, ObjectRef[Any]]] = concurrent.futures.Future()

        def take() -> None:
            # After the drop (its finalizer queued it first) and before the release
            # the drop queued: how many refs were alive, and the ref taken.
            taken.set_result((objects.held(object_id), objects.adopt(object_id, size)))

        def drop_then_take() -> None:
            refs.clear()  # the last ref: its finalizer hands the id to the loop, next in line
            loop.call_soon(take)

        loop.call_soon_threadsafe(drop_then_take)
        alive, ref = taken.result(PATIENCE)
        assert alive == 0  # the ref was gone, its release on its way
        assert objects.held(object_id) == 1
        assert holds == []  # owned still: nothing to hold
        assert ref.result() == b"kept" * 64


def test_an_object_stays_while_any_ref_of_its_client_is_alive(worker: Proc) -> None:
    with vaccelray.Client(worker.address) as client:
        objects = client._core.objects
        refs = [client.put(b"twice")]
        object_id = refs[0].object_id
        refs.append(client.adopt(object_id, refs[0].size))  # a second ref, not a copy
        assert objects.held(object_id) == 2
        refs.pop()
        wait_until(lambda: objects.held(object_id) != 2, "the dropped ref counted")
        assert objects.held(object_id) == 1
        assert held_by_worker(worker, object_id)
        refs.pop()
        wait_until(lambda: not held_by_worker(worker, object_id), "the object released")
        assert objects.held(object_id) == 0


def test_a_ref_taken_on_the_loop_without_a_connection_says_it_is_not_owned(
    worker: Proc, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with vaccelray.Client(worker.address) as maker:
        data = pickle.dumps(maker.put(b"unowned"))
        taker = vaccelray.init(worker.address)
        try:
            monkeypatch.setattr(taker._core, "live_connection", lambda: None)
            with caplog.at_level(logging.WARNING, "vaccelray.client"):
                ref = taker._thread.call(lambda: _unpickled_on_the_loop(data))
            assert [r.getMessage() for r in caplog.records] == [
                f"Object {ref.object_id} is not owned by this client: it has no connection"
            ]
        finally:
            vaccelray.shutdown()


@vaccelray.offload
def unpickle(data: bytes) -> object:
    return pickle.loads(data)


def test_a_ref_is_pickled_only_for_a_kept_result_and_unpickled_outside_tasks(
    worker: Proc,
) -> None:
    with vaccelray.Client(worker.address) as client:
        small = client.submit(blob, 10)
        small.result()
        with pytest.raises(TypeError) as inline:
            pickle.dumps(small)
        assert str(inline.value) == (
            "blob: a TaskRef is pickled (handed to another program) only once its result is "
            "kept in the cluster; pickle vaccelray.get(ref), or vaccelray.put it"
        )
        ref = client.put(b"inside")
        with pytest.raises(TypeError) as inside:
            client.submit(unpickle, pickle.dumps(ref)).result()
        assert str(inside.value) == (
            f"object {ref.object_id}: a ref unpickled inside a task or actor is not owned by "
            "anything there; pass refs as the arguments (they arrive as their values)"
        )


@pytest.mark.anyio
async def test_a_ref_past_the_owners_bound_is_refused_when_unpickled(worker: Proc) -> None:
    taker = vaccelray.init(worker.address)
    try:
        with vaccelray.Client(worker.address) as maker:
            ref = maker.put(b"popular")
            crowd = await open_client(worker.address)
            try:
                for n in range(1, DEFAULT_MAX_OWNERS):  # (the maker is the first owner)
                    request = wire.HoldObjects((ref.object_id,), f"crowd-{n}")
                    assert (await crowd.call_rpc(HOLD_OBJECTS, request)).held == 1
                data = pickle.dumps(ref)
                with pytest.raises(RPCError) as refused:
                    await anyio.to_thread.run_sync(pickle.loads, data)
            finally:
                await crowd.aclose()
        assert refused.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.message == (
            f"object {ref.object_id} already has {DEFAULT_MAX_OWNERS} owners, the limit: a "
            "client holding a ref to it must release it first"
        )
        assert taker._core.objects.held(ref.object_id) == 0  # no ref was made
    finally:
        vaccelray.shutdown()


def test_a_ref_is_unpickled_only_by_a_client_of_the_cluster(
    worker: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    with vaccelray.Client(worker.address) as maker:
        ref = maker.put(b"far away")
        data = pickle.dumps(ref)
        for name in ADDRESS_ENV_VARS:
            monkeypatch.delenv(name, raising=False)
        assert not vaccelray.is_initialized()
        with pytest.raises(RuntimeError) as nowhere:
            pickle.loads(data)
        assert str(nowhere.value) == (
            f"object {ref.object_id}: a ref is unpickled by a client of the cluster holding "
            "it; call vaccelray.init(address) first, or set VACCELRAY_ADDRESS"
        )
        assert not vaccelray.is_initialized()  # no embedded worker was started for it
        monkeypatch.setenv("VACCELRAY_ADDRESS", worker.address)
        try:
            assert pickle.loads(data).object_id == ref.object_id
        finally:
            vaccelray.shutdown()


@pytest.mark.anyio
async def test_a_ref_whose_worker_is_gone_is_taken_and_found_lost_on_get(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduler answers NOT_FOUND when the worker holding the object dies mid-call
    (here a tenth of a second after the hold came: loads waits for the answer)."""
    lost = RPCError(StatusCode.NOT_FOUND, "the worker holding the object is gone: killed")
    holds: list[bytes] = []

    def hold_lost(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        holds.append(payload)
        answer = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.1, answer.set_exception, lost)
        return answer

    def get_lost(payload: bytes, ctx: CallContext) -> bytes:
        raise lost

    methods = {
        HOLD_OBJECTS.method: Method(hold_lost, future=True),
        GET_OBJECT.method: Method(get_lost, inline=True),
    }
    address = f"unix://{tmp_path}/gone.sock"

    def take_and_get() -> None:
        with vaccelray.Client(address) as maker:
            data = pickle.dumps(ObjectRef(maker._core.objects, "aaaa-1", 5))
            taker = vaccelray.init(address)
            try:
                with caplog.at_level(logging.INFO, "vaccelray.client"):
                    ref = pickle.loads(data)  # taken all the same
                assert "Object aaaa-1 was gone when this client took a ref to it" in [
                    r.getMessage() for r in caplog.records
                ]
                assert taker._core.objects.held(ref.object_id) == 1
                again = pickle.loads(data)  # already its: no second HoldObjects
                assert taker._core.objects.held(ref.object_id) == 2
                assert len(holds) == 1
                with pytest.raises(ObjectLostError, match="the worker holding the object is gone"):
                    vaccelray.get(again)
            finally:
                vaccelray.shutdown()

    async with serve([Service(WORKER.name, methods)], [address]):
        await anyio.to_thread.run_sync(take_and_get)


@pytest.mark.anyio
async def test_a_hold_sent_from_the_loop_carries_the_credential_and_gives_up_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that never answers: the hold ends at the call timeout, and says so."""
    seen: list[tuple[tuple[str, str], ...]] = []

    def never(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        seen.append(ctx.metadata)
        return asyncio.get_running_loop().create_future()

    address = f"unix://{tmp_path}/mute.sock"
    monkeypatch.setattr(objects_module, "_CALL_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, "vaccelray.client")

    def take() -> None:
        with vaccelray.Client(address, token="hold-token") as maker:
            data = pickle.dumps(ObjectRef(maker._core.objects, "aaaa-2", 5))
            taker = vaccelray.init(address, token="hold-token")
            try:
                ref = taker._thread.call(lambda: _unpickled_on_the_loop(data))
                # (The client's timer or the server's deadline: whichever ends it first.)
                warning = f"Object {ref.object_id} is not owned by this client: DEADLINE_EXCEEDED: "
                until(
                    lambda: any(r.getMessage().startswith(warning) for r in caplog.records),
                    "the hold given up",
                )
            finally:
                vaccelray.shutdown()

    methods = {HOLD_OBJECTS.method: Method(never, future=True)}
    async with serve([Service(WORKER.name, methods)], [address]):
        await anyio.to_thread.run_sync(take)
    [metadata] = seen  # (beside the token: the call's request id)
    assert set(token_metadata("hold-token")) <= set(metadata)
