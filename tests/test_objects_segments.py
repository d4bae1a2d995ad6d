"""Large objects in shared-memory segments: the store keeps, spills, lends and adopts them;
a client on the host puts one whole; pool processes get them as fds and send a large
result back as one. On stores served in this process and on real pool processes."""

from __future__ import annotations

import os
import pickle
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from tests.test_objects_store import MIB, Served, get, payload, put, release, served
from tests.test_objects_store import small as small  # the fixture
from vaccelray import segments, task_context
from vaccelray.auth import TokenCheck
from vaccelray.errors import RPCError, StatusCode
from vaccelray.membership import Credential
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import PUT_OBJECT, WORKER
from vaccelray.testing import serve_member
from vaccelray.transport.client import open_client
from vaccelray.transport.server import Service
from vaccelray.worker.objects import Loan, ObjectLimits, object_store
from vaccelray.worker.pool import Pool, PoolProcessLost
from vaccelray.worker.poolchild import OK, REJECTED, RESULT_TAG, Done, encode_frame

pytestmark = pytest.mark.anyio

#: Liveness only.
PATIENCE = 60.0


def segment_fds(name: str = "vaccelray-object") -> list[int]:
    """The fds of segments named *name* this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name}"):
                found.append(int(fd))
        except OSError:  # the directory's own fd, closed since
            pass
    return found


def memfds(name: str = "vaccelray-object") -> int:
    """The segments named *name* this process holds open."""
    return len(segment_fds(name))


async def held(count: int) -> None:
    """Wait until this process holds *count* segments of objects (a dropped one is closed
    in a thread)."""
    with anyio.fail_after(PATIENCE):
        while memfds() != count:  # noqa: ASYNC110
            await anyio.sleep(0.01)


def read_fd(fd: int) -> bytes:
    return segments.read(fd, 0, os.fstat(fd).st_size)


# -- segments -----------------------------------------------------------------------------


def test_a_segment_is_sealed_read_and_mapped_read_only() -> None:
    fd = segments.create(b"0123456789", "test-lent")
    try:
        segments.check(fd, 10)
        with pytest.raises(segments.SegmentError, match="a segment of 10 bytes, not the 9"):
            segments.check(fd, 9)
        assert segments.read(fd, 3, 4) == b"3456"
        assert segments.read(fd, 8, 5) == b"89"  # fewer at its end
        assert segments.read(fd, 10, 5) == b""
        view = segments.view(fd, 0)
        try:
            assert view[:] == b"0123456789"
            with pytest.raises(TypeError):
                view[0] = 0  # read-only
        finally:
            view.close()
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 20)
    finally:
        os.close(fd)
    room = segments.room(6)
    try:
        segments.write_at(room, 2, memoryview(b"abcd"))
        segments.seal(room)
        assert segments.read(room, 0, 6) == b"\0\0abcd"
        segments.check(room, 6)
    finally:
        os.close(room)


def test_a_segment_that_cannot_be_made_leaves_no_fd() -> None:
    before = memfds()
    with pytest.raises(OSError, match="Invalid argument"):
        segments.room(-1)
    with pytest.raises(TypeError):
        segments.create(12)  # type: ignore[arg-type]
    assert memfds() == before


def test_a_writer_keeps_what_is_small_and_puts_the_rest_in_a_segment() -> None:
    small = segments.SegmentWriter(10)
    assert small.write(b"abc") == 3
    assert small.write(memoryview(b"defg")) == 4
    assert (small.finish(), small.data, small.fd, small.size) == (b"abcdefg", b"abcdefg", -1, 7)
    small.close()  # nothing to close
    large = segments.SegmentWriter(10)
    large.write(b"abcdef")
    large.write(b"ghij")  # reaches the threshold: all of it to a segment
    large.write(b"k")
    try:
        assert large.finish() == b""
        assert large.size == 11
        segments.check(large.fd, 11)
        assert segments.read(large.fd, 0, 11) == b"abcdefghijk"
    finally:
        large.close()
    assert large.fd == -1


def test_fds_go_with_their_tag_or_not_at_all() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = segments.create(b"x", "test-lent")
    before = memfds("test-lent")
    try:
        segments.send_fds(left, b"objects", [fd, fd])
        got = segments.receive_fds(right, b"objects", 2)
        assert len(got) == 2
        assert memfds("test-lent") == before + 2
        for received in got:
            os.close(received)
        segments.send_fds(left, b"other", [fd])
        with pytest.raises(segments.SegmentError, match=r"expected 1 fds tagged b'result', got 1"):
            segments.receive_fds(right, b"result", 1)
        segments.send_fds(left, b"result", [fd, fd])
        with pytest.raises(segments.SegmentError, match=r"\(truncated\)"):
            segments.receive_fds(right, b"result", 1)
        assert memfds("test-lent") == before  # what did not fit was closed
    finally:
        os.close(fd)
        left.close()
        right.close()


def test_a_plain_file_or_an_unsealed_memfd_is_no_segment(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        f.write(b"abc")
        f.flush()
        with pytest.raises(segments.SegmentError, match="not a shared-memory segment"):
            segments.check(f.fileno(), 3)
    fd = os.memfd_create("test-lent", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, b"abc")
        with pytest.raises(segments.SegmentError, match="that is not sealed"):
            segments.check(fd, 3)
    finally:
        os.close(fd)


# -- the store ----------------------------------------------------------------------------


async def test_large_objects_live_in_segments_spill_and_close(tmp_path: Path) -> None:
    before = memfds()
    blobs = [payload(1536 * 1024, seed) for seed in range(4)]
    async with served(tmp_path, memory=4 * MIB, disk=8 * MIB) as harness:
        store = harness.store
        async with harness.connect() as client:
            ids = [await put(client, blob, chunk=MIB) for blob in blobs[:2]]
            small = await put(client, b"s" * 100)
            assert (store.segments, memfds() - before) == (2, 2)  # the small one in the heap
            assert store.memory_used == 2 * len(blobs[0]) + 100
            ids.append(await put(client, blobs[2], chunk=MIB))  # 4.5 MiB: the oldest spills
            assert os.listdir(store.directory) == [ids[0]]
            assert store.segments == 2
            await held(before + 2)
            ids.append(await put(client, blobs[3], chunk=MIB))  # and the next
            assert sorted(os.listdir(store.directory)) == sorted(ids[:2])
            assert (store.memory_used, store.disk_used) == (
                2 * len(blobs[0]) + 100,
                2 * len(blobs[0]),
            )
            for object_id, blob in zip(ids, blobs, strict=True):
                assert await get(client, object_id, chunk=700 * 1024) == blob
            assert await release(client, *ids, small) == 5
            assert store.segments == 0
            await held(before)
            assert (store.memory_used, store.disk_used) == (0, 0)
            assert "segment-closer" in {t.name for t in threading.enumerate()}
    assert "segment-closer" not in {t.name for t in threading.enumerate()}  # stopped


async def test_past_max_segments_large_objects_stay_in_the_heap(tmp_path: Path) -> None:
    before = memfds()
    async with (
        served(tmp_path, memory=4 * MIB, max_segments=1) as harness,
        harness.connect() as client,
    ):
        first = await put(client, b"1" * MIB, chunk=MIB)
        second = await put(client, b"2" * MIB, chunk=MIB)
        assert (harness.store.segments, memfds() - before) == (1, 1)
        assert await get(client, second) == b"2" * MIB
        assert await get(client, first) == b"1" * MIB
        await release(client, first, second)
    await held(before)


async def test_a_store_closes_its_segments_when_it_closes(tmp_path: Path) -> None:
    before = memfds()
    with object_store("a" * 16, ObjectLimits(memory=4 * MIB), tmp_path) as store:
        store.add(b"x" * MIB, "c1", 1)
        assert memfds() == before + 1
    assert memfds() == before


async def test_lent_objects_open_where_they_are(tmp_path: Path) -> None:
    with object_store("b" * 16, ObjectLimits(memory=3 * MIB, disk=4 * MIB), tmp_path) as store:
        small = store.add(b"small", "c1", 1)
        assert store.lend(small) == b"small"
        large = store.add(b"L" * (2 * MIB), "c1", 1)
        loan = store.lend(large)
        assert isinstance(loan, Loan)
        assert (loan.object_id, loan.size) == (large, 2 * MIB)
        fd = loan.open()
        try:
            assert read_fd(fd) == b"L" * (2 * MIB)
            with pytest.raises(PermissionError):
                os.write(fd, b"no")  # sealed
            assert not os.get_inheritable(fd)  # a pool process spawned meanwhile gets none
        finally:
            os.close(fd)
        other = store.add(b"O" * (2 * MIB), "c1", 1)  # spills the first two
        assert sorted(os.listdir(store.directory)) == sorted([small, large])
        fd = loan.open()  # from its file now
        try:
            assert read_fd(fd) == b"L" * (2 * MIB)
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.write(fd, b"no")  # read-only
            assert not os.get_inheritable(fd)
        finally:
            os.close(fd)
        store.release("c1", [large])
        with pytest.raises(RPCError, match=f"object {large} was released before its task ran"):
            loan.open()
        fresh = store.lend(other)
        assert isinstance(fresh, Loan)
        store.release("c1", [other])
        with pytest.raises(RPCError) as caught:
            fresh.open()  # a segment dropped
        assert caught.value.code == StatusCode.NOT_FOUND
        exact = store.add(b"E" * segments.MIN_SEGMENT, "c1", 1)  # the smallest segment
        assert isinstance(store.lend(exact), Loan)
    limits = ObjectLimits(memory=3 * MIB, disk=4 * MIB, max_segments=0)
    with object_store("b" * 16, limits, tmp_path) as store:
        in_heap = store.add(b"H" * (2 * MIB), "c1", 1)  # large, but no segment to hold it
        assert store.lend(in_heap) == b"H" * (2 * MIB)


async def test_adopted_segments_are_kept_copied_to_disk_or_refused(tmp_path: Path) -> None:
    before = memfds()
    limits = ObjectLimits(memory=3 * MIB, disk=5 * MIB, max_segments=1)
    with object_store("c" * 16, limits, tmp_path) as store:
        kept = store.adopt(segments.create(b"k" * (2 * MIB)), 2 * MIB, "c1", 1)
        assert (store.segments, store.memory_used) == (1, 2 * MIB)
        assert store.whole(kept) == b"k" * (2 * MIB)
        # Past memory alone: copied to a file, the segment closed.
        on_disk = store.adopt(segments.create(b"d" * (4 * MIB)), 4 * MIB, "c1", 1)
        assert os.listdir(store.directory) == [on_disk]
        assert store.whole(on_disk) == b"d" * (4 * MIB)
        # Past max_segments: into the heap.
        heap = store.adopt(segments.create(b"h" * 1000), 1000, "c1", 1)
        assert store.segments == 1
        assert store.whole(heap) == b"h" * 1000
        # Past both budgets: refused, the segment closed all the same.
        with pytest.raises(RPCError, match="object store full") as caught:
            store.adopt(segments.create(b"f" * (2 * MIB)), 2 * MIB, "c1", 1)
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert memfds() == before + 1
    assert memfds() == before


# -- a put naming a segment ------------------------------------------------------------------


def put_segment(fd: int, size: int, **fields: object) -> wire.PutObject:
    request = wire.PutObject(size=size, final=True, client="c1", fd=fd, inode=os.fstat(fd).st_ino)
    return msgspec.structs.replace(request, **fields)


async def test_a_client_on_the_host_puts_a_segment_whole(tmp_path: Path) -> None:
    data = payload(3 * MIB)
    async with served(tmp_path, memory=8 * MIB) as harness:
        async with harness.connect() as client:
            fd = segments.create(data)
            try:
                reply = await client.call_rpc(PUT_OBJECT, put_segment(fd, len(data)))
            finally:
                os.close(fd)  # the worker holds its own
            assert reply.received == len(data)
            assert harness.store.segments == 1
            held_fds = segment_fds()
            assert held_fds  # the store's own fd of it, opened through /proc
            assert not any(os.get_inheritable(fd) for fd in held_fds)
            assert await get(client, reply.object_id) == data
            assert await release(client, reply.object_id) == 1
            fd = segments.create(data)
            try:
                kept = await client.call_rpc(PUT_OBJECT, put_segment(fd, len(data)))
            finally:
                os.close(fd)
        # Its client's connection gone, it goes after the grace (0.2 s), as any object.
        assert kept.object_id in harness.store
        with anyio.fail_after(PATIENCE):
            while kept.object_id in harness.store:  # noqa: ASYNC110
                await anyio.sleep(0.02)


WHOLE = "a put naming a segment is a whole object: no object id, data or later chunks"
REFUSED = StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        (
            "inode",
            StatusCode.FAILED_PRECONDITION,
            r"fd \d+ of process \d+ is not the segment announced",
        ),
        ("unsealed", REFUSED, "a shared-memory segment that is not sealed"),
        ("size", REFUSED, "a segment of 3 bytes, not the 4 announced"),
        (
            "closed",
            StatusCode.FAILED_PRECONDITION,
            r"cannot open fd \d+ of process \d+: No such .*",
        ),
        (
            "file",
            StatusCode.FAILED_PRECONDITION,
            r"not a shared-memory segment \(Invalid argument\)",
        ),
        ("id", StatusCode.INVALID_ARGUMENT, WHOLE),
        ("data", StatusCode.INVALID_ARGUMENT, WHOLE),
        ("unfinal", StatusCode.INVALID_ARGUMENT, WHOLE),
    ],
)
async def test_a_put_naming_anything_else_is_refused(
    small: Served, tmp_path: Path, case: str, code: StatusCode, message: str
) -> None:
    fd = segments.create(b"abc")
    request = put_segment(fd, 3)
    if case == "inode":
        request = msgspec.structs.replace(request, inode=request.inode + 1)
    elif case == "unsealed":
        os.close(fd)
        fd = os.memfd_create("vaccelray-object")
        os.write(fd, b"abc")
        request = put_segment(fd, 3)
    elif case == "size":
        request = msgspec.structs.replace(request, size=4)
    elif case == "closed":
        request = msgspec.structs.replace(request, fd=fd + 1000)
    elif case == "file":
        os.close(fd)
        fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"abc")
        request = put_segment(fd, 3)
    else:
        changes = {"id": {"object_id": "x"}, "data": {"data": b"d"}, "unfinal": {"final": False}}
        request = msgspec.structs.replace(request, **changes[case])
    try:
        async with small.connect() as client:
            with pytest.raises(RPCError) as caught:
                await client.call_rpc(PUT_OBJECT, request)
    finally:
        os.close(fd)
    assert caught.value.code == code
    if code == StatusCode.FAILED_PRECONDITION:
        message = "cannot take the client's segment: " + message
    assert re.fullmatch(message, caught.value.message), caught.value.message
    assert len(small.store) == 0


async def test_a_put_naming_a_segment_over_tcp_is_refused(tmp_path: Path) -> None:
    token = "the-cluster-token"
    with object_store("d" * 16, ObjectLimits(), tmp_path) as store:
        service = Service(WORKER.name, store.methods(TokenCheck(token), 4 * MIB))
        async with serve_member([service], ["tcp://127.0.0.1:0"], token=token) as server:
            address = server.addresses[0]
            credential = Credential(token)
            conn = await open_client(
                address, ssl=credential.ssl_for(address), setup=credential.setup_for(address)
            )
            fd = segments.create(b"abc")
            try:
                with pytest.raises(RPCError) as caught:
                    await conn.call_rpc(
                        PUT_OBJECT, put_segment(fd, 3), metadata=credential.metadata_for(address)
                    )
            finally:
                os.close(fd)
                await conn.aclose()
            assert caught.value.code == StatusCode.FAILED_PRECONDITION
            assert caught.value.message == (
                "cannot take the client's segment: it is not a process of this host's "
                "(a unix socket in this PID namespace)"
            )
            assert len(store) == 0


async def test_a_put_naming_a_segment_past_the_budgets_is_refused_and_not_kept(
    small: Served,
) -> None:
    before = memfds()
    fd = segments.create(b"x" * (3 * MIB))  # memory 1 MiB, disk 2 MiB
    try:
        async with small.connect() as client:
            with pytest.raises(RPCError, match="object store full") as caught:
                await client.call_rpc(PUT_OBJECT, put_segment(fd, 3 * MIB))
    finally:
        os.close(fd)
    assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
    assert memfds() == before


# -- pool processes -------------------------------------------------------------------------


class Lending:
    """A lent object: a new segment of *data* each time it is opened (or an error)."""

    def __init__(self, data: bytes, error: str = "") -> None:
        self.data = data
        self.error = error
        self.opened = 0

    def open(self) -> int:
        self.opened += 1
        if self.error:
            raise RPCError(StatusCode.NOT_FOUND, self.error)
        return segments.create(self.data, "test-lent")


def sizes(*object_ids: str) -> list[int]:
    """The lengths of the objects the task was given (as a task reads them)."""
    return [len(task_context.object_value(i)) for i in object_ids]


def large(size: int) -> bytes:
    return b"r" * size


@asynccontextmanager
async def pool() -> AsyncIterator[Pool]:
    async with Pool(1) as p:
        yield p


async def run(
    p: Pool,
    fn: object,
    *args: object,
    objects: dict[str, bytes | Lending] | None = None,
    args_object: str = "",
    segment_min: int = 0,
) -> tuple[Done | PoolProcessLost, list[tuple[int, int]]]:
    """Run *fn* on *p*; its outcome and the result segments handed over."""
    done = anyio.Event()
    outcome: list[Done | PoolProcessLost] = []
    got: list[tuple[int, int]] = []

    def settle(result: Done | PoolProcessLost) -> None:
        outcome.append(result)
        done.set()

    function = pickle.dumps(fn)
    p.submit(
        str(hash(function)),
        getattr(fn, "__name__", "fn"),
        function,
        b"" if args_object else pickle.dumps((args, {})),
        on_done=settle,
        objects=objects,  # type: ignore[arg-type]
        args_object=args_object,
        segment_min=segment_min,
        on_segment=lambda fd, size: got.append((fd, size)),
    )
    with anyio.fail_after(PATIENCE):
        await done.wait()
    return outcome[0], got


async def test_a_task_reads_lent_objects_and_its_large_result_comes_as_a_segment() -> None:
    before = memfds("test-lent")
    async with pool() as p:
        lent = Lending(pickle.dumps(b"l" * (2 * MIB)))
        objects = {"lent": lent, "inline": pickle.dumps(b"i" * 10)}
        outcome, got = await run(p, sizes, "lent", "inline", objects=objects)
        assert outcome == Done(outcome.seq, OK, pickle.dumps([2 * MIB, 10], 5))  # type: ignore[union-attr]
        assert (got, lent.opened) == ([], 1)
        assert memfds("test-lent") == before  # sent and closed
        # Its arguments lent too; a result past segment_min comes as a segment.
        args = Lending(pickle.dumps(((3 * MIB,), {})))
        outcome, got = await run(
            p, large, objects={"args": args}, args_object="args", segment_min=MIB
        )
        assert isinstance(outcome, Done)
        assert (outcome.status, outcome.result) == (OK, b"")
        [(fd, size)] = got
        try:
            assert size == outcome.segment > 3 * MIB
            assert pickle.loads(read_fd(fd)) == b"r" * (3 * MIB)
            with pytest.raises(PermissionError):
                os.write(fd, b"x")  # sealed by the pool process
        finally:
            os.close(fd)
        # Below segment_min: in the Done.
        outcome, got = await run(p, large, 100, segment_min=MIB)
        assert (outcome.result, outcome.segment, got) == (pickle.dumps(b"r" * 100, 5), 0, [])  # type: ignore[union-attr]


def total(*object_ids: str) -> int:
    return sum(task_context.object_value(i) for i in object_ids)


async def test_more_lent_objects_than_one_message_carries() -> None:
    count = segments.MAX_FDS + 20
    objects = {f"o{i}": Lending(pickle.dumps(i)) for i in range(count)}
    async with pool() as p:
        outcome, _ = await run(p, total, *objects, objects=objects)  # type: ignore[arg-type]
    assert isinstance(outcome, Done)
    assert pickle.loads(outcome.result) == sum(range(count))
    assert all(lent.opened == 1 for lent in objects.values())


async def test_a_lent_object_gone_before_its_task_runs_fails_it() -> None:
    async with pool() as p:
        gone = Lending(b"", error="object x was released before its task ran")
        outcome, _ = await run(p, sizes, "gone", objects={"gone": gone})
        assert isinstance(outcome, Done)
        assert (outcome.status, outcome.message) == (
            REJECTED,
            "object x was released before its task ran",
        )
        outcome, _ = await run(p, large, 3)  # the process serves on
        assert outcome.result == pickle.dumps(b"rrr", 5)  # type: ignore[union-attr]


def fake_segment(sealed: bool, size: int) -> None:
    """Send a result segment and the Done of the pool's first task (seq 0) by hand."""
    fd = os.memfd_create("fake", os.MFD_ALLOW_SEALING)
    os.write(fd, b"z" * size)
    if sealed:
        segments.seal(fd)
    channel = socket.socket(fileno=int(sys.argv[6]))
    segments.send_fds(channel, RESULT_TAG, [fd])
    frame = encode_frame(msgspec.msgpack.Encoder(), Done(0, OK, segment=size))
    os.write(int(sys.argv[1]), bytes(frame))
    time.sleep(600)


@pytest.mark.parametrize(
    ("sealed", "segment_min", "why"),
    [
        (True, 0, "a result segment it was not asked for"),
        (True, 10, "a result segment it was not asked for"),  # smaller than asked
        (False, 1, "a shared-memory segment that is not sealed"),
    ],
)
async def test_a_bad_result_segment_kills_its_process(
    sealed: bool, segment_min: int, why: str
) -> None:
    async with pool() as p:
        [pid] = p.pids
        outcome, got = await run(p, fake_segment, sealed, 5, segment_min=segment_min)
        assert isinstance(outcome, PoolProcessLost)
        assert str(outcome) == (
            f"the pool process running fake_segment sent a bad result ({why}) and was killed"
        )
        assert got == []
        assert p.lost == 1
        assert pid not in p.pids
