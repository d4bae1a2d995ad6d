"""A client's connections through a scheduler process (on a unix socket, as a local
client's blocking lanes need): a Cancel reaches a task whichever of the client's
connections it came by, and no other client's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

import vaccelray
from tests.processes import Proc, scheduler_argv, start_daemon
from tests.test_offload_api import add
from tests.test_scheduler_tasks import held, running_on, task_worker_argv
from tests.waiting import until
from vaccelray.client import Client
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.services import CANCEL, SUBMIT
from vaccelray.testing import connect_member


@pytest.fixture
def scheduled(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    """A task worker behind a scheduler on a unix socket: (the worker, the scheduler's
    address), once the scheduler has seen the worker up."""
    worker, worker_address = start_daemon(task_worker_argv())
    try:
        sched, address = start_daemon(
            scheduler_argv(
                "-a", f"unix://{tmp_path}/sched.sock", "--no-discover", "--worker", worker_address
            )
        )  # fmt: skip
        try:
            sched.wait_for(f"Worker {worker_address} is up")
            yield worker, address
        finally:
            sched.stop()
    finally:
        worker.stop()


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
