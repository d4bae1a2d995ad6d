"""Objects through a scheduler: each object call goes to the worker holding the object,
tasks go where their objects are, and an object whose worker died is lost."""

from __future__ import annotations

import functools
import gc
import os
from typing import Any

import anyio
import pytest

import vaccelray
from tests.processes import Proc
from tests.test_scheduler_tasks import cluster, doomed_workers, workers  # noqa: F401
from vaccelray.client.objects import INLINE, Stored
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import GET_OBJECT
from vaccelray.testing import connect_member
from vaccelray.worker.daemon import WorkerConfig, run_worker

pytestmark = pytest.mark.anyio

MIB = 1 << 20


@vaccelray.offload
def where(value: Any) -> tuple[int, int]:
    """This task's worker (pid) and the size of *value*."""
    return os.getppid(), len(value)


@vaccelray.offload
def blob(size: int) -> bytes:
    return b"b" * size


async def held_by(address: str, object_id: str) -> bool:
    async with connect_member(address) as conn:
        try:
            await conn.call_rpc(GET_OBJECT, wire.GetObject(object_id, 0, 1, "watcher"))
        except RPCError as exc:
            if exc.code != StatusCode.NOT_FOUND:
                raise
            return False
    return True


async def holder_of(procs: list[tuple[Proc, str]], object_id: str) -> tuple[Proc, str]:
    found = [(p, a) for p, a in procs if await held_by(a, object_id)]
    assert len(found) == 1, found
    return found[0]


async def test_objects_and_the_tasks_using_them_go_to_their_worker(
    workers: list[tuple[Proc, str]],  # noqa: F811
) -> None:
    async with cluster(workers) as (_, client):
        ref = await anyio.to_thread.run_sync(client.put, b"p" * (6 * MIB))  # in chunks
        proc, address = await holder_of(workers, ref.object_id)
        assert await ref == b"p" * (6 * MIB)
        for _ in range(4):  # wherever the least loaded is, the task goes to its object
            assert await client.submit(where, [ref]) == (proc.pid, 1)
            assert await client.submit(where, ref) == (proc.pid, 6 * MIB)
        # A result kept on its worker; the next task goes there, and get() fetches it.
        large = client.submit(blob, 2 * INLINE)
        await large
        kept = large._future.result()
        assert type(kept) is Stored
        kept_proc, kept_address = await holder_of(workers, kept.object_id)
        assert await client.submit(where, large) == (kept_proc.pid, 2 * INLINE)
        assert await large == b"b" * (2 * INLINE)
        object_id, kept_id = ref.object_id, kept.object_id
        del ref, large, kept
        gc.collect()  # released through the scheduler, each on its worker

        async def released() -> bool:
            return not await held_by(address, object_id) and not await held_by(
                kept_address, kept_id
            )

        with anyio.fail_after(60):  # liveness only
            while not await released():  # noqa: ASYNC110
                await anyio.sleep(0.05)


async def test_an_object_whose_worker_died_is_lost_or_computed_again(
    doomed_workers: list[tuple[Proc, str]],  # noqa: F811
) -> None:
    async with cluster(doomed_workers) as (_, client):
        ref = await anyio.to_thread.run_sync(client.put, b"doomed")
        proc, _ = await holder_of(doomed_workers, ref.object_id)
        # Results kept on that worker: one of a task that may be retried, one not.
        retried = lost = None
        while retried is None or lost is None:  # until each has landed there
            candidate = client.submit(blob.options(retries=1), 2 * INLINE)
            other = client.submit(blob, 2 * INLINE)
            for task in (candidate, other):
                await anyio.to_thread.run_sync(task.exception)
            for task, again in ((candidate, True), (other, False)):
                kept = task._future.result()
                if (await holder_of(doomed_workers, kept.object_id))[0] is proc:
                    if again:
                        retried = retried or task
                    else:
                        lost = lost or task
        proc.kill()
        with pytest.raises(vaccelray.ObjectLostError, match="is lost"):
            await ref
        with pytest.raises(vaccelray.ObjectLostError, match="where"):
            await client.submit(where, ref)
        with pytest.raises(vaccelray.ObjectLostError, match=r"^blob is lost"):
            await lost
        assert await retried == b"b" * (2 * INLINE)  # run again, on the other worker


@vaccelray.offload
def sizes(*values: Any) -> tuple[int, ...]:
    return tuple(len(v) for v in values)


async def test_a_task_reads_objects_of_another_worker_from_it(
    workers: list[tuple[Proc, str]],  # noqa: F811
) -> None:
    (first_proc, first), (second_proc, second) = workers
    async with cluster(workers) as (_, client):
        # One object on each worker (put there directly), one task naming both.
        one = await anyio.to_thread.run_sync(vaccelray.Client, first)
        two = await anyio.to_thread.run_sync(vaccelray.Client, second)
        try:
            a = await anyio.to_thread.run_sync(one.put, b"a" * (3 * MIB))
            b = await anyio.to_thread.run_sync(two.put, b"b" * 5)
            c = await anyio.to_thread.run_sync(two.put, b"c" * 7)
            # It runs where most of their bytes are (the first), reading the others from
            # the second.
            assert await client.submit(where, [a, b, c]) == (first_proc.pid, 3)
            assert await client.submit(where, [b, c]) == (second_proc.pid, 2)
            assert await client.submit(sizes, a, b, c) == (3 * MIB, 5, 7)
            assert await client.submit(sizes, a) == (3 * MIB,)
            assert await client.submit(where, a) == (first_proc.pid, 3 * MIB)
        finally:
            await anyio.to_thread.run_sync(one.shutdown)
            await anyio.to_thread.run_sync(two.shutdown)


async def test_objects_read_from_another_worker_go_when_the_task_ends() -> None:
    """Read into the running worker's store (counted against its limits), they are dropped
    with the task: the worker keeps only what is its own."""
    token = "the-cluster-token"
    config = WorkerConfig(
        addresses=("tcp://127.0.0.1:0",), backend="noop", pool_size=1, token=token, grace=1.0
    )
    async with run_worker(config) as first, run_worker(config) as second:
        stores = [w.tasks.objects for w in (first, second) if w.tasks is not None]
        assert len(stores) == 2
        held, other = stores
        one = await anyio.to_thread.run_sync(
            functools.partial(vaccelray.Client, first.addresses[0], token=token)
        )
        two = await anyio.to_thread.run_sync(
            functools.partial(vaccelray.Client, second.addresses[0], token=token)
        )
        try:
            a = await anyio.to_thread.run_sync(one.put, b"a" * (3 * MIB))
            b = await anyio.to_thread.run_sync(two.put, b"b" * (2 * MIB))
            members: Any = [(None, w.addresses[0]) for w in (first, second)]  # (no Proc)
            async with cluster(members, token=token) as (_, client):
                own = (len(held), held.memory_used, held.disk_used)
                # It runs on the first (most of the bytes), reading b from the second.
                assert await client.submit(sizes, a, b) == (3 * MIB, 2 * MIB)
                assert (len(held), held.memory_used, held.disk_used) == own
                assert len(other) == 1
        finally:
            await anyio.to_thread.run_sync(one.shutdown)
            await anyio.to_thread.run_sync(two.shutdown)
