"""The worker's object store over its wire: chunks, bounds, spilling, release, and a gone
client's grace period; on a store served in this process (each test its own), and on real
worker processes for the options that set it up."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.processes import Proc, start_daemon, worker_argv
from vaccelray import segments
from vaccelray.auth import TokenCheck
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import GET_OBJECT, PUT_OBJECT, RELEASE_OBJECTS, WORKER
from vaccelray.testing import serve_member
from vaccelray.transport.client import Client, client_from_socket, open_client
from vaccelray.transport.server import Method, Server, Service, serve
from vaccelray.worker.objects import (
    Borrowed,
    Loan,
    ObjectLimits,
    ObjectStore,
    fetcher,
    object_store,
)

pytestmark = pytest.mark.anyio

KIB = 1 << 10
MIB = 1 << 20
#: Liveness only: how long a condition that must come true may take on a loaded machine.
PATIENCE = 60.0


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    with anyio.move_on_after(PATIENCE):
        while not await predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"not within {PATIENCE} s: {what}")


@dataclass
class Served:
    store: ObjectStore
    server: Server

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Client]:
        server_sock, client_sock = socket.socketpair()
        await self.server.accept_socket(server_sock)
        client = await client_from_socket(client_sock)
        try:
            yield client
        finally:
            await client.aclose()


@asynccontextmanager
async def served(tmp_path: Path, **limits: float) -> AsyncIterator[Served]:
    """A store of 1 MiB in memory and 2 MiB on disk (unless *limits* say otherwise)."""
    bounds = ObjectLimits(**{"memory": MIB, "disk": 2 * MIB, "grace": 0.2, **limits})  # type: ignore[arg-type]
    with object_store("f" * 16, bounds, tmp_path) as store:
        service = Service(WORKER.name, store.methods(TokenCheck(), 4 * MIB))
        async with serve([service], [], on_disconnect=store.connection_closed, grace=1.0) as server:
            yield Served(store, server)


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Served]:
    async with served(tmp_path) as harness:
        yield harness


def spill_dir(store: ObjectStore) -> Path:
    return store.directory


async def put(client: Client, data: bytes, *, chunk: int = 256 * KIB, who: str = "c1") -> str:
    """*data* put in chunks of *chunk* bytes; the object's id."""
    object_id = ""
    offset = 0
    while True:
        piece = data[offset : offset + chunk]
        final = offset + len(piece) == len(data)
        reply = await client.call_rpc(
            PUT_OBJECT, wire.PutObject(object_id, offset, piece, len(data), final, who)
        )
        object_id = reply.object_id
        offset += len(piece)
        assert reply.received == offset
        if final:
            return object_id


async def get(client: Client, object_id: str, *, chunk: int = 0, who: str = "c1") -> bytes:
    parts = []
    offset = 0
    while True:
        reply = await client.call_rpc(GET_OBJECT, wire.GetObject(object_id, offset, chunk, who))
        parts.append(reply.data)
        offset += len(reply.data)
        if offset >= reply.size:
            return b"".join(parts)


async def release(client: Client, *ids: str, who: str = "c1") -> int:
    reply = await client.call_rpc(RELEASE_OBJECTS, wire.ReleaseObjects(ids, who))
    return reply.released


async def gone(client: Client, object_id: str) -> bool:
    try:
        await client.call_rpc(GET_OBJECT, wire.GetObject(object_id, 0, 1, "watcher"))
    except RPCError as exc:
        if exc.code != StatusCode.NOT_FOUND:
            raise
        return True
    return False


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


# -- the wire ---------------------------------------------------------------------------


def test_the_object_methods_are_the_workers() -> None:
    for rpc in (PUT_OBJECT, GET_OBJECT, RELEASE_OBJECTS):
        assert rpc in WORKER


_ids = st.text(max_size=wire.MAX_OBJECT_ID)
_messages = st.one_of(
    st.builds(
        wire.PutObject, _ids, st.integers(0, 2**40), st.binary(max_size=64),
        st.integers(0, 2**40), st.booleans(), _ids,
    ),
    st.builds(wire.ObjectPut, _ids, st.integers(0, 2**40)),
    st.builds(wire.GetObject, _ids, st.integers(0, 2**40), st.integers(0, 2**40), _ids),
    st.builds(wire.ObjectChunk, st.binary(max_size=64), st.integers(0, 2**40)),
    st.builds(wire.ReleaseObjects, st.tuples(_ids, _ids), _ids),
    st.builds(wire.Released, st.integers(0, 2**20)),
)  # fmt: skip


@given(_messages)
def test_messages_survive_the_wire(message: msgspec.Struct) -> None:
    rpc = {
        wire.PutObject: PUT_OBJECT.request,
        wire.ObjectPut: PUT_OBJECT.reply,
        wire.GetObject: GET_OBJECT.request,
        wire.ObjectChunk: GET_OBJECT.reply,
        wire.ReleaseObjects: RELEASE_OBJECTS.request,
        wire.Released: RELEASE_OBJECTS.reply,
    }[type(message)]
    assert rpc.decode(rpc.encode(message)) == message  # type: ignore[attr-defined]
    wire.check_fields(message, MIB) if hasattr(message, "client") else None


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (wire.PutObject(client="c" * 65), StatusCode.INVALID_ARGUMENT, "client id"),
        (wire.PutObject("o" * 65), StatusCode.INVALID_ARGUMENT, "object id"),
        (wire.GetObject("o" * 65), StatusCode.INVALID_ARGUMENT, "object id"),
        (wire.ReleaseObjects(("o" * 65,)), StatusCode.INVALID_ARGUMENT, "object id"),
        (wire.PutObject(offset=-1), StatusCode.INVALID_ARGUMENT, "offset must be >= 0"),
        (wire.PutObject(size=-1), StatusCode.INVALID_ARGUMENT, "size must be >= 0"),
        (wire.GetObject("o", max_bytes=-1), StatusCode.INVALID_ARGUMENT, "max_bytes"),
        (
            wire.ReleaseObjects(("o",) * (wire.MAX_RELEASE + 1)),
            StatusCode.RESOURCE_EXHAUSTED,
            "at most 4096",
        ),
    ],
)
def test_fields_past_their_bounds_are_refused(
    request_: msgspec.Struct, code: StatusCode, text: str
) -> None:
    with pytest.raises(RPCError, match=text) as caught:
        wire.check_fields(request_, MIB)
    assert caught.value.code == code


def test_fields_at_their_bounds_pass() -> None:
    wire.check_fields(wire.PutObject("o" * 64, client="c" * 64), MIB)
    wire.check_fields(wire.ReleaseObjects(("o" * 64,) * wire.MAX_RELEASE, "c" * 64), MIB)
    wire.check_fields(wire.GetObject("", 0, 0, ""), MIB)


def test_an_id_names_its_worker() -> None:
    assert wire.worker_of("abcd-0123") == "abcd"
    assert wire.worker_of("ab-cd-ef") == "ab"
    assert wire.worker_of("abcd") == ""
    assert wire.worker_of("abcd-") == ""


# -- a real worker ---------------------------------------------------------------------


async def test_an_object_put_and_read_in_chunks(small: Served) -> None:
    data = payload(700 * KIB + 3)
    async with small.connect() as client:
        object_id = await put(client, data, chunk=100 * KIB)
        assert re.fullmatch(r"f{16}-[0-9a-f]{32}", object_id)
        assert wire.worker_of(object_id) == small.store.instance
        assert await get(client, object_id) == data
        assert await get(client, object_id, chunk=64 * KIB) == data
        # Past the end: nothing more, and the size.
        reply = await client.call_rpc(GET_OBJECT, wire.GetObject(object_id, len(data) + 5, 10))
        assert (reply.data, reply.size) == (b"", len(data))
        assert await release(client, object_id) == 1
        assert await gone(client, object_id)
        assert await release(client, object_id) == 0


async def test_an_empty_object(small: Served) -> None:
    async with small.connect() as client:
        object_id = await put(client, b"")
        assert await get(client, object_id) == b""
        assert await release(client, object_id) == 1


async def test_a_chunk_must_follow_and_fit(small: Served) -> None:
    async with small.connect() as client:
        first = await client.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"abc", 6, False, "c1"))
        object_id = first.object_id
        assert first.received == 3
        with pytest.raises(RPCError, match="does not follow") as caught:
            await client.call_rpc(PUT_OBJECT, wire.PutObject(object_id, 2, b"d", 6, False, "c1"))
        assert caught.value.code == StatusCode.INVALID_ARGUMENT
        with pytest.raises(RPCError) as caught:
            await client.call_rpc(PUT_OBJECT, wire.PutObject(object_id, 3, b"defg", 6, False))
        assert caught.value.code == StatusCode.INVALID_ARGUMENT
        assert caught.value.message == (
            f"object {object_id} was declared 6 bytes; a chunk would make it 7"
        )
        with pytest.raises(RPCError, match="and seal it"):
            await client.call_rpc(PUT_OBJECT, wire.PutObject(object_id, 3, b"de", 6, True))
        # Unsealed: not readable.
        with pytest.raises(RPCError, match="not held") as caught:
            await client.call_rpc(GET_OBJECT, wire.GetObject(object_id))
        assert caught.value.code == StatusCode.NOT_FOUND
        done = await client.call_rpc(PUT_OBJECT, wire.PutObject(object_id, 3, b"def", 6, True))
        assert done.received == 6
        assert await get(client, object_id) == b"abcdef"
        # Sealed: no more chunks.
        with pytest.raises(RPCError, match="being sent") as caught:
            await client.call_rpc(PUT_OBJECT, wire.PutObject(object_id, 6, b"", 6, True))
        assert caught.value.code == StatusCode.NOT_FOUND
        assert await release(client, object_id) == 1


async def test_past_memory_objects_spill_to_files_and_stay_readable(small: Served) -> None:
    directory = spill_dir(small.store)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not os.listdir(directory)
    blobs = [payload(400 * KIB, seed) for seed in range(4)]  # 1.6 MiB, past 1 MiB in memory
    async with small.connect() as client:
        ids = [await put(client, blob) for blob in blobs]
        assert sorted(os.listdir(directory)) == sorted(ids[:2])  # the least recently used
        for object_id, blob in zip(ids, blobs, strict=True):
            assert await get(client, object_id, chunk=150 * KIB) == blob
        assert await release(client, *ids) == 4
        assert not os.listdir(directory)  # released: their files are gone


async def test_an_object_larger_than_memory_goes_to_disk(small: Served) -> None:
    directory = spill_dir(small.store)
    data = payload(MIB + 1)
    async with small.connect() as client:
        object_id = await put(client, data)
        assert os.listdir(directory) == [object_id]
        assert await get(client, object_id) == data
        assert await release(client, object_id) == 1


async def test_the_store_refuses_past_memory_and_disk_at_once(small: Served) -> None:
    async with small.connect() as client:
        on_disk = await put(client, b"d" * (2 * MIB))  # larger than memory: on disk
        in_memory = await put(client, b"m" * MIB)  # exactly both budgets now
        with pytest.raises(RPCError) as caught:
            await client.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 1, False, "c1"))
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert re.search(
            r"object store full: \d+ bytes in memory and \d+ on disk.*raise --object-disk or "
            "release refs",
            caught.value.message,
        )
        assert await release(client, on_disk, in_memory) == 2
        # One object is in memory or in a file: past the larger of the two, never.
        with pytest.raises(RPCError, match="object store full") as caught:
            await client.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 2 * MIB + 1))
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED


async def test_a_full_memory_spills_only_when_the_disk_has_room(small: Served) -> None:
    async with small.connect() as client:
        on_disk = await put(client, b"d" * (MIB + 512 * KIB))
        in_memory = await put(client, b"m" * (768 * KIB))
        # 512 KiB more in memory would spill the 768 KiB: the disk has room for 512 only.
        with pytest.raises(RPCError, match="object store full") as caught:
            await client.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 512 * KIB))
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        # 256 KiB fits beside it in memory.
        beside = await put(client, b"b" * (256 * KIB))
        assert await get(client, in_memory) == b"m" * (768 * KIB)
        assert await release(client, on_disk, in_memory, beside) == 3


async def test_objects_being_sent_are_bounded_per_connection(small: Served) -> None:
    async with small.connect() as client, small.connect() as other:
        for _ in range(16):
            await client.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 1))
        with pytest.raises(RPCError, match="already sending 16 objects") as caught:
            await client.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 1))
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        # Another connection has its own.
        await other.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 1))


async def test_an_unsealed_object_dies_with_its_connection(small: Served) -> None:
    async with small.connect() as watcher:
        async with small.connect() as sender:
            await sender.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", MIB))
            await sender.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 2 * MIB))
            with pytest.raises(RPCError, match="object store full"):
                await watcher.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 1, True))

        async def room() -> bool:
            try:
                reply = await watcher.call_rpc(
                    PUT_OBJECT, wire.PutObject("", 0, b"", 2 * MIB, False, "w")
                )
            except RPCError as exc:
                if exc.code != StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return False
            await watcher.call_rpc(
                PUT_OBJECT, wire.PutObject(reply.object_id, 0, b"x", 2 * MIB, False, "w")
            )
            return True

        await until(room, "the gone sender's object was dropped")


async def test_a_gone_clients_objects_are_released_after_the_grace(
    small: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vaccelray.objects")
    async with small.connect() as watcher:
        async with small.connect() as first, small.connect() as second:
            kept = await put(first, b"kept", who="twice")
            await get(second, kept, who="twice")  # the same client on a second connection
            await first.aclose()
            async with small.connect() as third:
                dropped = await put(third, b"dropped", who="once")
            # "once" had one connection: its object goes after the grace...
            await until(lambda: gone(watcher, dropped), "the gone client's object released")
            # ... which has passed for the first connection too: "twice" still has one.
            assert await get(second, kept, who="twice") == b"kept"
        await until(lambda: gone(watcher, kept), "the object of the client now gone released")
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "Client once has no connection left: its 1 objects are released in 0.2 s unless it "
        "comes back" in messages
    )
    assert "Released 1 objects of client once (gone for its grace period)" in messages
    assert "Released 1 objects of client twice (gone for its grace period)" in messages


async def test_a_grace_ends_quietly_for_a_client_that_released_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vaccelray.objects")
    async with served(tmp_path, grace=LONG_GRACE) as small, small.connect() as other:
        async with small.connect() as first:
            mine = await put(first, b"mine", who="leaving")
        await until(lambda: _in_grace(small.store, "leaving"), "its grace started")
        assert await release(other, mine, who="leaving") == 1  # released from elsewhere
        # Owning nothing, it has no grace to wait out: it ends at once, with nothing to say.
        assert not await _in_grace(small.store, "leaving")
    assert not [r for r in caplog.records if r.getMessage().startswith("Released")]


async def _in_grace(store: ObjectStore, client: str) -> bool:
    return client in store.in_grace()


#: A grace period that a step of a test surely takes less than (it waits for one to end).
LONG_GRACE = 5.0


async def test_a_client_that_comes_back_within_the_grace_keeps_its_objects(
    tmp_path: Path,
) -> None:
    async with served(tmp_path, grace=LONG_GRACE) as small:
        await _comes_back(small)


async def _comes_back(small: Served) -> None:
    store = small.store

    async def in_grace(client: str) -> bool:
        return client in store.in_grace()

    async with small.connect() as first:
        mine = await put(first, b"mine", who="back")
    await until(lambda: in_grace("back"), "the client's grace started")
    async with small.connect() as again:
        await get(again, mine, who="back")  # back within the grace
        assert not await in_grace("back")
        async with small.connect() as other:
            theirs = await put(other, b"theirs", who="other")
        # The other client's grace started later and has passed: so would the first's.
        await until(lambda: gone(again, theirs), "the other client's object released")
        assert await get(again, mine, who="back") == b"mine"
    await until(lambda: gone_from(store, mine), "the client gone again: its object released")


async def test_a_connection_naming_ever_new_client_ids_grows_no_table(small: Served) -> None:
    store = small.store
    async with small.connect() as conn:
        mine = await put(conn, b"mine", who="owner")
        for i in range(50):  # reads naming clients that own nothing here
            assert await get(conn, mine, who=f"reader-{i}") == b"mine"
        [(client, [connection_id])] = [(c, list(s)) for c, s in store._connections.items()]
        assert client == "owner"
        assert store._client_of == {connection_id: {"owner"}}
        assert store.holds_state(connection_id)
        # Owning nothing any more, the owner is forgotten too.
        assert await release(conn, mine, who="owner") == 1
        assert (store._connections, store._client_of) == ({}, {})
        assert not store.holds_state(connection_id)


async def gone_from(store: ObjectStore, object_id: str) -> bool:
    return object_id not in store


# -- real worker processes ---------------------------------------------------------------


def start(tmp: Path, *options: str) -> Proc:
    proc, _ = start_daemon(
        worker_argv(
            "-a", f"unix://{tmp / 'w.sock'}", "--backend", "noop", "--no-announce",
            "--pool-size", "1", *options,
        )
    )  # fmt: skip
    return proc


@asynccontextmanager
async def connect(proc: Proc) -> AsyncIterator[Client]:
    client = await open_client(proc.address)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_workers_options_bound_its_store(tmp_path: Path) -> None:
    proc = start(tmp_path, "--object-memory", "1M", "--object-disk", "2M", "--object-grace", "0.5")
    try:
        found = proc.wait_for(
            r"Objects: 1048576 bytes in memory, 2097152 on disk in (\S+), kept 0.5 s"
        )
        directory = Path(found.group(1))
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        blobs = [payload(700 * KIB, seed) for seed in range(2)]
        async with connect(proc) as client, connect(proc) as watcher:
            ids = [await put(client, blob) for blob in blobs]
            assert len(os.listdir(directory)) == 1  # spilled: past 1 MiB in memory
            with pytest.raises(RPCError, match="object store full") as caught:
                await client.call_rpc(PUT_OBJECT, wire.PutObject("", 0, b"", 2 * MIB))
            assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
            for object_id, blob in zip(ids, blobs, strict=True):
                assert await get(client, object_id) == blob
            await client.aclose()
            proc.wait_for("Client c1 has no connection left: its 2 objects are released in 0.5 s")
            await until(lambda: gone(watcher, ids[0]), "the gone client's objects released")
            proc.wait_for("Released 2 objects of client c1")
            assert not os.listdir(directory)
    finally:
        proc.stop()
    assert not await anyio.Path(directory).exists()  # removed on shutdown


async def test_the_store_keeps_results_for_their_client(tmp_path: Path) -> None:
    limits = ObjectLimits(memory=100, disk=100, grace=0.01)
    with object_store("e" * 16, limits, tmp_path) as store:
        kept = store.add(b"result", "c1", 7)
        assert re.fullmatch(r"e{16}-[0-9a-f]{32}", kept)
        assert kept in store
        assert "e" * 16 + "-nothing" not in store
        assert store.whole(kept) == b"result"
        assert store.read(kept, 2, 3) == (b"sul", 6)
        assert store.holds_state(7)  # its client owns objects: keep the connection open
        assert not store.holds_state(8)
        assert store.in_grace() == frozenset()
        store.connection_closed(7)
        assert store.in_grace() == {"c1"}
        assert not store.holds_state(7)
        store.claim("c1", 9)  # back within the grace
        assert store.in_grace() == frozenset()
        assert store.holds_state(9)
        assert store.owner("", 9) == "connection-9"
        assert store.owner("c1", 9) == "c1"
        assert store.release("c2", [kept]) == 0  # not its object
        assert store.release("c1", ["e" * 16 + "-nothing", kept]) == 1
        assert kept not in store
        assert not store.holds_state(9)
        assert (store.memory_used, store.disk_used) == (0, 0)
        # Past both budgets: refused, nothing kept.
        with pytest.raises(RPCError, match="object store full") as caught:
            store.add(b"x" * 101, "c1", 9)
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert len(store) == 0
    # Past memory: the least recently used spilled, the accounts moved.
    with object_store("e" * 16, ObjectLimits(memory=100, disk=100), tmp_path) as store:
        first = store.add(b"1" * 60, "c1", 7)
        second = store.add(b"2" * 30, "c1", 7)
        assert (store.memory_used, store.disk_used) == (90, 0)
        store.whole(first)  # used: the second is now the least recently used
        third = store.add(b"3" * 20, "c1", 7)
        assert os.listdir(store.directory) == [second]
        assert (store.memory_used, store.disk_used) == (80, 30)
        assert [store.whole(i) for i in (first, second, third)] == [
            b"1" * 60,
            b"2" * 30,
            b"3" * 20,
        ]
        assert store.release("c1", [second]) == 1
        assert (store.memory_used, store.disk_used) == (80, 0)
    # Past memory alone: in a file named by the object.
    with object_store("e" * 16, ObjectLimits(memory=3, disk=10), tmp_path) as store:
        on_disk = store.add(b"four", "c1", 7)
        assert os.listdir(store.directory) == [on_disk]
        assert store.whole(on_disk) == b"four"


async def test_a_worker_reads_another_workers_objects_as_a_member(tmp_path: Path) -> None:
    token = "the-cluster-token"
    with (
        object_store("d" * 16, ObjectLimits(), tmp_path) as store,
        object_store("a" * 16, ObjectLimits(), tmp_path) as mine,
    ):
        big = store.add(payload(5 * MIB), "c1", 1)  # more than one message
        small = store.add(b"small", "c1", 1)
        service = Service(WORKER.name, store.methods(TokenCheck(token), 4 * MIB))
        async with serve_member([service], ["tcp://127.0.0.1:0"], token=token) as server:
            address = server.addresses[0]
            fetch = fetcher(token, 4 * MIB)
            into = Borrowed(mine)
            got = await fetch(address, [big, small], into)
            assert got[small] == b"small"
            # A large one is lent as local ones are: where it lies, in this store.
            loan = got[big]
            assert isinstance(loan, Loan)
            fd = loan.open()
            try:
                assert segments.read(fd, 0, 6 * MIB) == payload(5 * MIB)
            finally:
                os.close(fd)
            assert (len(mine), mine.memory_used) == (2, 5 * MIB + 5)
            assert await fetch(address, [], into) == {}
            with pytest.raises(RPCError, match="not held") as caught:
                await fetch(address, [small, "d" * 16 + "-gone"], into)
            assert caught.value.code == StatusCode.NOT_FOUND
            # Not a member: refused before anything is read.
            with pytest.raises(RPCError) as caught:
                await fetcher("another-token", 4 * MIB)(address, [small], into)
            assert caught.value.code == StatusCode.NOT_FOUND
            assert "cannot be reached" in caught.value.message
            into.close()  # the task ended: nothing of it is left
            assert (len(mine), mine.memory_used, mine.in_grace()) == (0, 0, frozenset())
            assert len(store) == 2  # the other's are its own
    with pytest.raises(RPCError, match=f"the worker holding objects, {address}, cannot be reached"):
        await fetch(address, [small], Borrowed(mine))


async def test_objects_read_from_another_worker_count_against_the_stores_limits(
    tmp_path: Path,
) -> None:
    token = "the-cluster-token"
    with (
        object_store("d" * 16, ObjectLimits(), tmp_path) as store,
        object_store("a" * 16, ObjectLimits(memory=2 * MIB, disk=2 * MIB), tmp_path) as mine,
    ):
        big = store.add(payload(3 * MIB), "c1", 1)
        service = Service(WORKER.name, store.methods(TokenCheck(token), 4 * MIB))
        async with serve_member([service], ["tcp://127.0.0.1:0"], token=token) as server:
            into = Borrowed(mine)
            with pytest.raises(RPCError, match="object store full") as caught:
                await fetcher(token, 1 * MIB)(server.addresses[0], [big], into)
            assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
            into.close()
            assert (len(mine), mine.memory_used, mine.disk_used) == (0, 0, 0)


@pytest.mark.parametrize(
    "chunks",
    [
        [wire.ObjectChunk(b"ab", 4), wire.ObjectChunk(b"", 4)],  # no progress: never ends
        [wire.ObjectChunk(b"ab", 4), wire.ObjectChunk(b"cde", 4)],  # past its size
        [wire.ObjectChunk(b"ab", 4), wire.ObjectChunk(b"cd", 6)],  # its size changed
        [wire.ObjectChunk(b"", -4)],  # a size no object has
    ],
    ids=["stalls", "overruns", "resizes", "negative"],
)
async def test_a_worker_sending_an_object_garbled_is_data_loss(
    tmp_path: Path, chunks: list[wire.ObjectChunk]
) -> None:
    """Whatever the other worker sends, the read ends and takes no more room than declared."""
    token = "the-cluster-token"
    answers = iter(chunks)

    def get(payload: bytes, ctx: Any) -> bytes:
        return GET_OBJECT.reply.encode(next(answers))

    service = Service(WORKER.name, {GET_OBJECT.method: Method(get, inline=True)})
    with object_store("a" * 16, ObjectLimits(), tmp_path) as mine:
        async with serve_member([service], ["tcp://127.0.0.1:0"], token=token) as server:
            into = Borrowed(mine)
            with pytest.raises(RPCError, match="garbled") as caught:
                await fetcher(token, 4 * MIB)(server.addresses[0], ["d" * 16 + "-x"], into)
            assert caught.value.code == StatusCode.DATA_LOSS
            assert mine.memory_used == max(chunks[0].size, 0)
            into.close()
            assert (len(mine), mine.memory_used) == (0, 0)


async def test_the_store_bounds_its_objects(tmp_path: Path) -> None:
    with object_store("e" * 16, ObjectLimits(max_objects=2, max_partial=1), tmp_path) as store:
        store.add(b"", "c", 1)
        store.create(0, "c", 1)
        with pytest.raises(RPCError, match="2 objects, the limit") as caught:
            store.add(b"", "c", 1)
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
    with object_store("e" * 16, ObjectLimits(max_partial=1), tmp_path) as store:
        store.create(0, "c", 1)
        with pytest.raises(RPCError, match="already sending 1 objects"):
            store.create(0, "c", 1)
        store.create(0, "c", 2)  # another connection has its own
