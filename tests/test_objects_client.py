"""Objects from the offload API, on a real worker: put and get, results kept on the worker,
refs (anywhere inside arguments) resolved there, arguments past the message size, and
refs released when the client drops them (and, on a connection that records the calls
started on it, how many releases one call names)."""

from __future__ import annotations

import gc
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import vaccelray
from tests.processes import Proc, start_daemon, worker_argv
from vaccelray.client.objects import INLINE, Objects, Stored
from vaccelray.errors import RPCError, StatusCode, TransportError
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import GET_OBJECT, RELEASE_OBJECTS
from vaccelray.transport.client import open_client
from vaccelray.worker.tasks import LOCAL_ADDRESS_ENV

MIB = 1 << 20
#: Liveness only.
PATIENCE = 60.0


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    sock = tmp_path_factory.mktemp("objects") / "w.sock"
    proc, _ = start_daemon(
        worker_argv(
            "-a", f"unix://{sock}", "--backend", "noop", "--no-announce", "--pool-size", "1",
        )
    )  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture
def client(worker: Proc) -> Iterator[vaccelray.Client]:
    with vaccelray.Client(worker.address) as c:
        yield c


@vaccelray.offload
def blob(size: int, fill: int = 1) -> bytes:
    return bytes([fill]) * size


def _total(value: Any) -> int:
    """The sum of the lengths (or values) of everything inside *value*."""
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return sum(_total(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_total(v) for v in value)
    return _total(vars(value))


total = vaccelray.offload(_total)


@vaccelray.offload
def fail() -> int:
    raise ValueError("no value")


@dataclass
class Box:
    content: Any
    extra: int = 0


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        assert time.monotonic() < deadline, f"not within {PATIENCE} s: {what}"
        time.sleep(0.02)


def held_by_worker(worker: Proc, object_id: str) -> bool:
    async def ask() -> bool:
        conn = await open_client(worker.address)
        try:
            await conn.call_rpc(GET_OBJECT, wire.GetObject(object_id, 0, 1, "watcher"))
        except RPCError as exc:
            if exc.code != StatusCode.NOT_FOUND:
                raise
            return False
        finally:
            await conn.aclose()
        return True

    return anyio.run(ask)


def stored(ref: vaccelray.TaskRef[Any]) -> Stored | None:
    """What the TaskRef holds, when its result stayed on the worker."""
    ref.exception()  # wait for it
    value = ref._future.result()
    return value if type(value) is Stored else None


def test_put_and_get_any_size(client: vaccelray.Client) -> None:
    small = client.put({"a": 1})
    assert vaccelray.get(small) == {"a": 1}
    big = client.put(b"x" * (9 * MIB))  # past the 4 MiB message size: in chunks
    assert big.size > 9 * MIB
    assert vaccelray.get(big) == b"x" * (9 * MIB)
    assert big.result() == b"x" * (9 * MIB)  # read again: it stays until dropped
    assert repr(big) == f"<ObjectRef {big.object_id} ({big.size} bytes)>"
    assert big.done()


def test_a_small_result_comes_back_a_large_one_stays(client: vaccelray.Client) -> None:
    small = client.submit(blob, INLINE // 2)
    assert stored(small) is None
    assert small.result() == b"\x01" * (INLINE // 2)
    large = client.submit(blob, 2 * INLINE)
    kept = stored(large)
    assert kept is not None
    assert kept.size > 2 * INLINE
    assert large.result() == b"\x01" * (2 * INLINE)  # fetched on demand
    assert vaccelray.get([large, small]) == [b"\x01" * (2 * INLINE), b"\x01" * (INLINE // 2)]


@pytest.mark.anyio
async def test_await_fetches_a_kept_result(client: vaccelray.Client) -> None:
    large = client.submit(blob, 2 * INLINE, 3)
    assert await large == b"\x03" * (2 * INLINE)
    ref = client.put([1, 2, 3])
    assert await ref == [1, 2, 3]


def test_refs_anywhere_inside_arguments_are_resolved_on_the_worker(
    client: vaccelray.Client,
) -> None:
    kept = client.submit(blob, 3 * INLINE)  # stays on the worker
    inline = client.submit(blob, 10)  # comes back
    put = client.put(b"y" * 1000)
    pending = client.submit(blob, 7)  # perhaps not done yet when submitted below
    value = [kept, {"put": put, "box": Box(inline, 5)}, (pending,)]
    assert client.submit(total, value).result() == 3 * INLINE + 1000 + 10 + 5 + 7
    assert client.submit(total, kept).result() == 3 * INLINE
    assert client.submit(total, value=Box(put)).result() == 1000


def test_a_failed_ref_in_the_arguments_fails_the_task(client: vaccelray.Client) -> None:
    failed = client.submit(fail)
    with pytest.raises(ValueError, match="no value"):
        client.submit(total, [failed]).result()


def test_arguments_past_the_message_size_are_put_first(client: vaccelray.Client) -> None:
    assert client.submit(total, b"z" * (6 * MIB)).result() == 6 * MIB
    ref = client.put(b"r" * 10)  # a ref inside arguments that are put too
    assert client.submit(total, [ref, b"z" * (6 * MIB)]).result() == 6 * MIB + 10


def test_dropping_the_last_ref_releases_the_object(client: vaccelray.Client, worker: Proc) -> None:
    ref = client.put(b"drop me")
    object_id = ref.object_id
    copy = ref
    assert held_by_worker(worker, object_id)
    del ref
    gc.collect()
    assert client._core.objects.held(object_id) == 1  # the copy still holds it
    assert client._core.objects.held("unknown") == 0
    assert held_by_worker(worker, object_id)
    del copy
    wait_until(lambda: not held_by_worker(worker, object_id), "the object released")

    large = client.submit(blob, 2 * INLINE)
    kept = stored(large)
    assert kept is not None
    kept_id = kept.object_id
    del kept
    passed = client.submit(total, [large])
    del large
    gc.collect()
    assert passed.result() == 2 * INLINE  # held until the task that was passed it ended
    del passed
    gc.collect()
    wait_until(lambda: not held_by_worker(worker, kept_id), "the kept result released")


def test_a_released_object_is_lost(client: vaccelray.Client, worker: Proc) -> None:
    large = client.submit(blob, 2 * INLINE)
    kept = stored(large)
    assert kept is not None
    core = client._core

    async def release() -> None:
        conn = await open_client(worker.address)
        try:
            request = wire.ReleaseObjects((kept.object_id,), core.client_id)
            assert (await conn.call_rpc(RELEASE_OBJECTS, request)).released == 1
        finally:
            await conn.aclose()

    anyio.run(release)
    with pytest.raises(vaccelray.ObjectLostError, match="blob is lost") as caught:
        large.result()
    assert caught.value.task == "blob"


class _Recording:
    """A connection that records the ReleaseObjects calls started on it (or, *closed*,
    raises as a closed connection does)."""

    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.released: list[wire.ReleaseObjects] = []
        self.callbacks: list[Callable[[Any], object]] = []
        self.options: list[dict[str, Any]] = []

    def start_call(
        self,
        service: str,
        method: str,
        payload: bytes,
        callback: Callable[[Any], object],
        **options: Any,
    ) -> None:
        if self.closed:
            raise TransportError("connection closed")
        assert (service, method) == (RELEASE_OBJECTS.service, RELEASE_OBJECTS.method)
        self.released.append(RELEASE_OBJECTS.request.decode(payload))
        self.callbacks.append(callback)
        self.options.append(options)


def _recorded(conn: _Recording) -> tuple[Objects, list[Callable[[], None]]]:
    """Objects of a client whose connection is *conn*, and the callbacks it schedules."""
    scheduled: list[Callable[[], None]] = []
    core = SimpleNamespace(
        address="unix:///nowhere",
        loop=SimpleNamespace(call_soon=scheduled.append),
        live_connection=lambda: conn,
        client_id="me",
        metadata=(("vaccelray-token", "secret"),),
    )
    return Objects(core), scheduled  # type: ignore[arg-type]


def test_releases_leave_in_calls_of_at_most_the_ids_one_call_may_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = _Recording()
    objects, scheduled = _recorded(conn)
    ids = [f"{i:016x}-id" for i in range(wire.MAX_RELEASE + 2)]
    for object_id in ids:  # the last refs of these, dropped in one turn of the loop
        objects._counts[object_id] = 1
        objects._dropped(object_id)
    assert scheduled == [objects._release]  # once, for all of them
    scheduled[0]()
    assert [r.object_ids for r in conn.released] == [
        tuple(ids[: wire.MAX_RELEASE]),
        tuple(ids[wire.MAX_RELEASE :]),
    ]
    assert {r.client for r in conn.released} == {"me"}
    for options in conn.options:  # the client's credential, and a bound on the wait
        assert options["metadata"] == (("vaccelray-token", "secret"),)
        assert 0 < options["timeout"] < PATIENCE
    with caplog.at_level(logging.DEBUG, "vaccelray.client"):
        conn.callbacks[1](TransportError("lost"))
    assert "Release of 2 objects not delivered: lost" in caplog.messages


def test_a_release_on_a_closed_connection_is_left_to_the_workers_grace() -> None:
    conn = _Recording(closed=True)
    objects, scheduled = _recorded(conn)
    objects._counts["0123456789abcdef-id"] = 1
    objects._dropped("0123456789abcdef-id")
    scheduled[0]()  # raises nothing: the worker saw the client go
    assert (conn.released, objects._released, objects.held("0123456789abcdef-id")) == ([], [], 0)


def _in_a_pool_process(data: bytes) -> PoolOnly:
    if LOCAL_ADDRESS_ENV not in os.environ:
        raise RuntimeError("a PoolOnly value was loaded outside the worker's pool")
    return PoolOnly(data)


class PoolOnly:
    """A value that loads only in a worker's pool process: loaded in the client, it raises."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        return _in_a_pool_process, (self.data,)


@vaccelray.offload
def pool_only_when_told(port: int, size: int) -> PoolOnly:
    """A large PoolOnly value, once the test's listener on *port* says go."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        sock.recv(1)
    return PoolOnly(b"p" * size)


@vaccelray.offload
def length(value: PoolOnly) -> int:
    return len(value.data)


def test_a_kept_result_still_running_when_passed_on_never_reaches_the_client(
    client: vaccelray.Client,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(PATIENCE)
        first = client.submit(pool_only_when_told, listener.getsockname()[1], 2 * INLINE)
        second = client.submit(length, first)  # pickled again once first has its result
        assert not first.done()
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"g")
            assert second.result() == 2 * INLINE
    with pytest.raises(vaccelray.TaskError, match="loaded outside the worker's pool"):
        first.result()  # what fetching it to the client would have done


def test_a_large_put_to_a_worker_on_this_host_goes_as_a_segment(
    client: vaccelray.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "vaccelray.client"):
        ref = client.put(b"s" * (3 * MIB))
        assert client.submit(total, ref).result() == 3 * MIB
        assert ref.result() == b"s" * (3 * MIB)
    assert client._core.objects.segments  # the worker took it: segments go on
    assert "Large objects go in chunks" not in caplog.text


#: A unix socket relay: the worker sees its pid, not the client's.
RELAY = """
import socket, sys, threading
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen()
print("ready", flush=True)
def pump(a, b):
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    conn, _ = listener.accept()
    up = socket.socket(socket.AF_UNIX)
    up.connect(sys.argv[2])
    threading.Thread(target=pump, args=(conn, up), daemon=True).start()
    threading.Thread(target=pump, args=(up, conn), daemon=True).start()
"""


def test_a_put_the_worker_cannot_take_as_a_segment_goes_in_chunks(
    worker: Proc, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "relay.sock"
    relay = subprocess.Popen(
        [sys.executable, "-c", RELAY, str(path), worker.address.removeprefix("unix://")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        assert relay.stdout.readline() == "ready\n"
        with (
            caplog.at_level(logging.INFO, "vaccelray.client"),
            vaccelray.Client(f"unix://{path}") as relayed,
        ):
            first = relayed.put(b"1" * (3 * MIB))
            assert not relayed._core.objects.segments
            assert re.search(
                r"Large objects go in chunks to unix://\S+: cannot take the client's segment: ",
                caplog.text,
            )
            second = relayed.put(b"2" * (3 * MIB))  # in chunks from the start
            assert caplog.text.count("Large objects go in chunks") == 1
            assert relayed.submit(total, [first, second]).result() == 6 * MIB
            assert first.result() == b"1" * (3 * MIB)
            # Arguments too large for a message are put the same way.
            assert relayed.submit(total, b"z" * (6 * MIB)).result() == 6 * MIB
    finally:
        relay.kill()
        relay.wait()
        if relay.stdout is not None:
            relay.stdout.close()


def test_put_through_the_default_client(worker: Proc, tmp_path: Path) -> None:
    vaccelray.init(worker.address)
    try:
        ref = vaccelray.put("hello")
        assert vaccelray.get(ref) == "hello"
    finally:
        vaccelray.shutdown()


def test_results_past_the_message_size_stay_and_are_fetched_in_chunks(
    client: vaccelray.Client,
) -> None:
    large = client.submit(blob, 6 * MIB, 2)  # the message size is 4 MiB
    assert client.submit(total, large).result() == 6 * MIB  # never through the client
    assert large.result() == b"\x02" * (6 * MIB)


def release_on(worker: Proc, client: vaccelray.Client, object_id: str) -> None:
    """Release *object_id* on the worker as *client* would (its refs stay alive)."""

    async def release() -> None:
        conn = await open_client(worker.address)
        try:
            request = wire.ReleaseObjects((object_id,), client._core.client_id)
            assert (await conn.call_rpc(RELEASE_OBJECTS, request)).released == 1
        finally:
            await conn.aclose()

    anyio.run(release)


@pytest.mark.anyio
async def test_a_lost_object_raises_when_awaited(client: vaccelray.Client, worker: Proc) -> None:
    large = client.submit(blob, 2 * INLINE)
    kept = stored(large)
    assert kept is not None
    await anyio.to_thread.run_sync(release_on, worker, client, kept.object_id)
    with pytest.raises(vaccelray.ObjectLostError, match=r"^blob is lost: object "):
        await large
    put = client.put(b"p")
    await anyio.to_thread.run_sync(release_on, worker, client, put.object_id)
    with pytest.raises(vaccelray.ObjectLostError, match=r"^this object is lost: object "):
        await put
    with pytest.raises(vaccelray.ObjectLostError, match=r"^this object is lost: object "):
        await anyio.to_thread.run_sync(put.result)


def test_a_lost_result_of_a_task_that_may_be_retried_is_computed_again(
    client: vaccelray.Client, worker: Proc
) -> None:
    again = blob.options(retries=1)
    for waiting in (False, True):
        large = client.submit(again, 2 * INLINE, 5)
        kept = stored(large)
        assert kept is not None
        release_on(worker, client, kept.object_id)  # as if its worker were lost
        if waiting:
            assert anyio.run(awaited, large) == b"\x05" * (2 * INLINE)
        else:
            assert large.result() == b"\x05" * (2 * INLINE)
        assert not held_by_worker(worker, kept.object_id)


async def awaited(ref: vaccelray.TaskRef[Any]) -> Any:
    return await ref
