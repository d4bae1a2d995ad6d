"""Sizes a peer declares are bounded by the message size limit before anything is made.

A vAccel Genop argument may travel as a declared ``size`` with no bytes (a
write argument the agent makes a buffer for and sends back), and a resource
blob declares a ``size`` too: a request of a few dozen bytes once made a
worker allocate and echo a gigabyte, or die. Each hostile request here goes
through a real socket to a real worker (and scheduler) process, which must
answer RESOURCE_EXHAUSTED (or INVALID_ARGUMENT for an argument whose bytes
contradict its size), keep serving, and not grow its peak memory.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.clusters import serving_scheduler
from tests.processes import Proc, scheduler_argv, start_daemon, worker_argv
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.envelope import encode_response
from vaccelray.protocol.info import INFO_METHOD, WORKER_SERVICE, WorkerInfo, encode
from vaccelray.protocol.limits import (
    ITEM_COST,
    check_declared_sizes,
    check_response_size,
    response_body_size,
)
from vaccelray.scheduler import SchedulerConfig
from vaccelray.testing import agent_client, serve_member
from vaccelray.transport import connect
from vaccelray.transport.client import Client
from vaccelray.transport.server import CallContext, Method, Service
from vaccelray.worker.backend import OpType
from vaccelray.worker.noop import NOOP_TAG, NoopBackend

LIMIT = DEFAULT_MAX_MESSAGE_SIZE
SERVICE = SERVICE_NAMES[0]
#: Peak memory a refused request may add to a daemon: allocator noise, not its declaration.
RSS_SLACK_KIB = 8 << 10


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert found is not None, status
    return int(found.group(1))


def exec_genop(session: int, *write_args: pb.Arg) -> pb.GenopRequest:
    """An exec genop (noop answers it by echoing the write arguments)."""
    request = pb.GenopRequest(session_id=session)
    request.read_args.add(buf=struct.pack("=I", OpType.EXEC), size=4)
    request.read_args.add(buf=b"libx.so", size=7)
    request.read_args.add(buf=b"fn", size=2)
    request.write_args.extend(write_args)
    return request


def hostile_genop(session: int, size: int) -> bytes:
    """The whole attack: an exec genop whose write argument is a bare declared size."""
    return exec_genop(session, pb.Arg(size=size)).SerializeToString()


async def refused(client: Client, method: str, payload: bytes) -> RPCError:
    with pytest.raises(RPCError) as caught:
        await client.call(SERVICE, method, payload, timeout=60)
    return caught.value


def assert_names(error: RPCError, code: StatusCode, *parts: str) -> None:
    assert error.code == code, error
    assert "\n" not in error.message
    for part in parts:
        assert part in error.message, error.message


# -- the validation function ------------------------------------------------------------

arg_shapes = st.lists(
    st.tuples(st.integers(0, 300), st.integers(0, 300), st.booleans()), max_size=12
)


def outcome(request: pb.GenopRequest | pb.RegisterResourceRequest, limit: int) -> RPCError | None:
    """The error check_declared_sizes raises, or None when it accepts the request."""
    try:
        check_declared_sizes(request, limit)
    except RPCError as exc:
        return exc
    return None


def build(shapes: Sequence[tuple[int, int, bool]]) -> pb.GenopRequest:
    """Args of (carried bytes, declared size, write?)."""
    request = pb.GenopRequest(session_id=1)
    for carried, declared, write in shapes:
        group = request.write_args if write else request.read_args
        group.add(buf=b"b" * carried, size=declared)
    return request


@given(arg_shapes, st.integers(ITEM_COST, 2048))
def test_accepted_genops_make_no_more_than_the_limit(
    shapes: list[tuple[int, int, bool]], limit: int
) -> None:
    request = build(shapes)
    items = [*request.read_args, *request.write_args]
    made = [len(a.buf) or a.size for a in items]
    consistent = all(not a.buf or a.size in (0, len(a.buf)) for a in items)
    fits = max(made, default=0) <= limit and sum(made) <= limit
    fits = fits and len(items) * ITEM_COST <= limit
    error = outcome(request, limit)
    if error is None:
        assert consistent
        assert fits
        return
    assert "\n" not in error.message
    if error.code == StatusCode.INVALID_ARGUMENT:
        assert not consistent
        assert re.search(
            r"_args\[\d+\] carries \d+ bytes but declares a size of \d+", error.message
        )
    else:
        assert error.code == StatusCode.RESOURCE_EXHAUSTED
        assert not fits
        assert (
            f"limit of {limit} bytes" in error.message or f"limit is {limit} bytes" in error.message
        )


@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(0, 64 * 9))
def test_a_request_carrying_its_own_bytes_within_the_limit_is_accepted(
    bufs: list[bytes], slack: int
) -> None:
    """What already fits a message is never refused: valid requests behave as before."""
    request = pb.GenopRequest(session_id=1)
    for buf in bufs:
        request.read_args.add(buf=buf, size=len(buf))
    limit = max(request.ByteSize(), len(bufs) * ITEM_COST) + slack
    assert outcome(request, limit) is None
    # and one byte more than the limit, declared by a write argument, is refused
    carried = sum(len(buf) for buf in bufs)
    request.write_args.add(size=limit + 1 - carried)
    error = outcome(request, limit)
    assert error is not None
    assert error.code == StatusCode.RESOURCE_EXHAUSTED


@given(
    st.lists(st.tuples(st.binary(max_size=32), st.integers(0, 100)), max_size=6),
    st.integers(64, 600),
)
def test_blob_sizes_are_bounded_like_arguments(blobs: list[tuple[bytes, int]], limit: int) -> None:
    request = pb.RegisterResourceRequest(session_id=1, paths=["p"])
    for data, size in blobs:
        request.blobs.add(name="b", data=data, size=size)
    made = [len(d) or s for d, s in blobs]
    consistent = all(not d or s in (0, len(d)) for d, s in blobs)
    fits = sum(made) <= limit and (len(blobs) + 1) * ITEM_COST <= limit
    error = outcome(request, limit)
    if error is None:
        assert consistent
        assert fits
        return
    assert error.message.startswith("RegisterResource ")
    if error.code == StatusCode.INVALID_ARGUMENT:
        assert not consistent
    else:
        assert error.code == StatusCode.RESOURCE_EXHAUSTED
        assert not fits


def test_counts_are_charged_per_item() -> None:
    many = pb.GenopRequest(session_id=1, write_args=[pb.Arg()] * (LIMIT // ITEM_COST + 1))
    with pytest.raises(RPCError) as caught:
        check_declared_sizes(many, LIMIT)
    assert_names(caught.value, StatusCode.RESOURCE_EXHAUSTED, f"{LIMIT // ITEM_COST + 1} arguments")
    paths = pb.RegisterResourceRequest(paths=["p"] * (LIMIT // ITEM_COST + 1))
    with pytest.raises(RPCError) as caught:
        check_declared_sizes(paths, LIMIT)
    assert_names(caught.value, StatusCode.RESOURCE_EXHAUSTED, "blobs and paths")
    check_declared_sizes(pb.GenopRequest(write_args=[pb.Arg()] * (LIMIT // ITEM_COST)), LIMIT)


@given(st.binary(max_size=70000))
def test_response_body_size_is_what_the_envelope_takes(payload: bytes) -> None:
    assert response_body_size(payload) == len(encode_response(payload))


def test_response_size_check_names_the_size_and_the_limit() -> None:
    assert check_response_size("Genop", b"x" * 98, 100) == b"x" * 98
    with pytest.raises(RPCError) as caught:
        check_response_size("Genop", b"x" * 99, 100)
    assert_names(
        caught.value,
        StatusCode.RESOURCE_EXHAUSTED,
        "Genop response of 101 bytes",
        "limit of 100 bytes",
    )


# -- a worker process -------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1 << 30, (1 << 32) - 1])
async def test_hostile_genop_is_refused_and_the_worker_keeps_serving(
    worker_process: Proc, size: int
) -> None:
    async with connect(worker_process.address) as client:
        agent = AgentClient(client, timeout=60)
        session = await agent.create_session()
        assert await agent.classify(session, b"warm-up") == NOOP_TAG
        before = peak_rss_kib(worker_process.pid)
        payload = hostile_genop(session, size)
        assert len(payload) < 48
        error = await refused(client, "Genop", payload)
        assert_names(
            error, StatusCode.RESOURCE_EXHAUSTED, "write_args[0]", f"{size} bytes", f"{LIMIT} bytes"
        )
        assert await agent.classify(session, b"after") == NOOP_TAG
        assert peak_rss_kib(worker_process.pid) - before < RSS_SLACK_KIB
    assert worker_process.process.poll() is None


@pytest.mark.anyio
async def test_valid_genops_still_echo_and_inconsistent_ones_are_invalid(
    worker_process: Proc,
) -> None:
    async with connect(worker_process.address) as client:
        session = await AgentClient(client).create_session()
        request = exec_genop(session, pb.Arg(size=64, arg_type=3), pb.Arg(buf=b"abc", size=3))
        reply = await client.call_message(SERVICE, "Genop", request, pb.GenopResponse)
        assert [(bytes(a.buf), a.size, a.arg_type) for a in reply.write_args] == [
            (bytes(64), 64, 3),
            (b"abc", 3, 0),
        ]
        # The largest buffer the limit allows, as a bare size, still works.
        big = exec_genop(session, pb.Arg(size=LIMIT - 4096))
        reply = await client.call_message(SERVICE, "Genop", big, pb.GenopResponse)
        assert reply.write_args[0].buf == bytes(LIMIT - 4096)

        longer = exec_genop(session, pb.Arg(buf=b"abcdef", size=2)).SerializeToString()
        error = await refused(client, "Genop", longer)
        assert_names(error, StatusCode.INVALID_ARGUMENT, "write_args[0]", "6 bytes", "size of 2")


@pytest.mark.anyio
async def test_declared_sizes_are_bounded_in_sum_and_count(worker_process: Proc) -> None:
    async with connect(worker_process.address) as client:
        session = await AgentClient(client).create_session()
        half = LIMIT // 2
        pair = exec_genop(session, pb.Arg(size=half), pb.Arg(size=half)).SerializeToString()
        error = await refused(client, "Genop", pair)
        assert_names(error, StatusCode.RESOURCE_EXHAUSTED, "write_args[1]", f"{half} bytes")

        count = LIMIT // ITEM_COST + 1
        many = exec_genop(session, *[pb.Arg()] * count).SerializeToString()
        assert len(many) < LIMIT
        error = await refused(client, "Genop", many)
        assert_names(error, StatusCode.RESOURCE_EXHAUSTED, f"{count + 3} arguments")


@pytest.mark.anyio
async def test_a_blob_declaring_too_much_is_refused_and_not_kept(worker_process: Proc) -> None:
    async with connect(worker_process.address) as client:
        session = await AgentClient(client).create_session()
        before = peak_rss_kib(worker_process.pid)
        hostile = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
        hostile.blobs.add(type=pb.BUFFER, name="model", size=(1 << 32) - 1)
        error = await refused(client, "RegisterResource", hostile.SerializeToString())
        assert_names(error, StatusCode.RESOURCE_EXHAUSTED, "blobs[0]", str((1 << 32) - 1))
        mismatched = pb.RegisterResourceRequest(session_id=session)
        mismatched.blobs.add(type=pb.BUFFER, name="model", data=b"weights", size=700)
        error = await refused(client, "RegisterResource", mismatched.SerializeToString())
        assert_names(error, StatusCode.INVALID_ARGUMENT, "blobs[0]", "7 bytes", "size of 700")

        valid = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
        valid.blobs.add(type=pb.BUFFER, name="model", data=b"weights", size=7)
        reply = await client.call_message(
            SERVICE, "RegisterResource", valid, pb.RegisterResourceResponse
        )
        assert reply.resource_id == 1  # the refused ones were never registered
        assert peak_rss_kib(worker_process.pid) - before < RSS_SLACK_KIB


@pytest.mark.anyio
async def test_no_answer_larger_than_the_limit_is_sent(worker_process: Proc) -> None:
    # Arguments that fit the limit exactly echo back with their framing on top: one
    # message too many. The client accepts 64 MiB, so only the worker can refuse.
    async with connect(worker_process.address, max_message_size=64 << 20) as client:
        session = await AgentClient(client).create_session()
        request = exec_genop(session)
        taken = sum(len(a.buf) for a in request.read_args)
        request.write_args.add(size=LIMIT - taken)
        error = await refused(client, "Genop", request.SerializeToString())
        assert_names(error, StatusCode.RESOURCE_EXHAUSTED, "Genop response of", f"{LIMIT} bytes")
        sent = re.search(r"response of (\d+) bytes", error.message)
        assert sent is not None
        assert int(sent.group(1)) > LIMIT


class BlockingEcho(NoopBackend):
    """The noop backend run the way libvaccel is: in a worker thread."""

    blocking = True


@pytest.mark.anyio
async def test_blocking_backends_get_the_same_checks() -> None:
    async with agent_client(BlockingEcho()) as (agent, _):
        client = agent.client
        session = await agent.create_session()
        error = await refused(client, "Genop", hostile_genop(session, 1 << 30))
        assert_names(error, StatusCode.RESOURCE_EXHAUSTED, "write_args[0]", str(1 << 30))
        request = exec_genop(session)
        request.write_args.add(size=LIMIT - 13)
        error = await refused(client, "Genop", request.SerializeToString())
        assert_names(error, StatusCode.RESOURCE_EXHAUSTED, "Genop response of")
        small = exec_genop(session, pb.Arg(size=5))
        reply = await client.call_message(SERVICE, "Genop", small, pb.GenopResponse)
        assert reply.write_args[0].buf == bytes(5)


# -- through a scheduler ----------------------------------------------------------------


@pytest.fixture
def scheduler_and_worker() -> Iterator[tuple[Proc, Proc]]:
    worker, address = start_daemon(
        worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0")
    )
    try:
        argv = scheduler_argv("-a", "tcp://127.0.0.1:0", "--no-discover", "--worker", address)
        scheduler, _ = start_daemon(argv)
        try:
            scheduler.wait_for(f"Worker {address} is up")
            yield scheduler, worker
        finally:
            scheduler.stop()
    finally:
        worker.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1 << 30, (1 << 32) - 1])
async def test_hostile_genop_through_the_scheduler(
    scheduler_and_worker: tuple[Proc, Proc], size: int
) -> None:
    scheduler, worker = scheduler_and_worker
    async with connect(scheduler.address) as client:
        agent = AgentClient(client, timeout=60)
        session = await agent.create_session()
        assert await agent.classify(session, b"warm-up") == NOOP_TAG
        echo = exec_genop(session, pb.Arg(size=16))
        reply = await client.call_message(SERVICE, "Genop", echo, pb.GenopResponse, timeout=60)
        assert reply.write_args[0].buf == bytes(16)
        before = {p.pid: peak_rss_kib(p.pid) for p in (scheduler, worker)}
        error = await refused(client, "Genop", hostile_genop(session, size))
        assert_names(
            error, StatusCode.RESOURCE_EXHAUSTED, "write_args[0]", f"{size} bytes", f"{LIMIT} bytes"
        )
        assert await agent.classify(session, b"after") == NOOP_TAG
        for pid, peak in before.items():
            assert peak_rss_kib(pid) - peak < RSS_SLACK_KIB
    assert scheduler.process.poll() is None
    assert worker.process.poll() is None


@pytest.mark.anyio
async def test_the_scheduler_refuses_before_forwarding_or_keeping() -> None:
    """Behind the scheduler sits a worker that would take anything: nothing reaches it."""
    received: list[str] = []

    def info(payload: bytes, ctx: CallContext) -> bytes:
        return encode(WorkerInfo(version="t", instance="fake", backend="fake", ops=("genop",)))

    def create(payload: bytes, ctx: CallContext) -> bytes:
        return pb.CreateSessionResponse(session_id=5).SerializeToString()

    def take(name: str, answer: bytes) -> Method:
        def handler(payload: bytes, ctx: CallContext) -> bytes:
            received.append(name)
            return answer

        return Method(handler, inline=True)

    services = [
        Service(WORKER_SERVICE, {INFO_METHOD: Method(info, inline=True)}),
        Service(
            SERVICE,
            {
                "CreateSession": Method(create, inline=True),
                "DestroySession": Method(lambda p, c: b"", inline=True),
                "Genop": take("Genop", pb.GenopResponse().SerializeToString()),
                "RegisterResource": take(
                    "RegisterResource",
                    pb.RegisterResourceResponse(resource_id=9).SerializeToString(),
                ),
            },
        ),
    ]
    async with serve_member(services, ["tcp://127.0.0.1:0"]) as fake:
        config = SchedulerConfig(
            addresses=("tcp://127.0.0.1:0",), workers=(fake.addresses[0],), grace=1.0
        )
        async with serving_scheduler(config) as sched, connect(sched.addresses[0]) as client:
            session = await AgentClient(client).create_session()
            error = await refused(client, "Genop", hostile_genop(session, 1 << 30))
            assert_names(error, StatusCode.RESOURCE_EXHAUSTED, "write_args[0]", str(1 << 30))
            blob = pb.RegisterResourceRequest(session_id=session)
            blob.blobs.add(type=pb.BUFFER, name="m", size=LIMIT + 1)
            error = await refused(client, "RegisterResource", blob.SerializeToString())
            assert_names(error, StatusCode.RESOURCE_EXHAUSTED, "blobs[0]", str(LIMIT + 1))
            assert received == []
            assert sched.table.resources == {}
            await client.call(SERVICE, "Genop", hostile_genop(session, 8))
            assert received == ["Genop"]


@pytest.mark.anyio
async def test_a_configured_limit_applies_at_worker_and_scheduler() -> None:
    """--max-message-size reaches the checks: 8 MiB lets a 6 MiB argument through, not 9."""
    limit, fits, too_big = 8 << 20, 6 << 20, 9 << 20
    size_flag = ("--max-message-size", str(limit))
    worker, address = start_daemon(
        worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0", *size_flag)
    )
    try:
        argv = scheduler_argv(
            "-a", "tcp://127.0.0.1:0", "--no-discover", "--worker", address, *size_flag
        )
        scheduler, _ = start_daemon(argv)
        try:
            scheduler.wait_for(f"Worker {address} is up")
            for target in (worker.address, scheduler.address):
                async with connect(target, max_message_size=limit) as client:
                    session = await AgentClient(client, timeout=60).create_session()
                    request = exec_genop(session, pb.Arg(size=fits))
                    reply = await client.call_message(
                        SERVICE, "Genop", request, pb.GenopResponse, timeout=60
                    )
                    assert reply.write_args[0].buf == bytes(fits)
                    error = await refused(client, "Genop", hostile_genop(session, too_big))
                    assert_names(error, StatusCode.RESOURCE_EXHAUSTED, f"{limit} bytes")
        finally:
            scheduler.stop()
    finally:
        worker.stop()
