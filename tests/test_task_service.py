"""The worker's task service over its wire, on an in-process pool of one process.

One pool process means a task that is not stopped holds the pool: every test
that stops a task (deadline, Cancel, the client going away) then runs another
one, which only the replacement of the killed process can run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest

from vaccelray.auth import TokenCheck
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import tasks as wire
from vaccelray.testing import connected_client
from vaccelray.transport.client import Client, client_from_socket
from vaccelray.transport.server import Server
from vaccelray.worker.agent import Agent
from vaccelray.worker.noop import NoopBackend
from vaccelray.worker.pool import Pool
from vaccelray.worker.tasks import TaskService

pytestmark = pytest.mark.anyio

#: Liveness only: how long a condition that must come true may take on a loaded machine.
PATIENCE = 30.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* (a process exit or a file has no event to wait on)."""
    with anyio.move_on_after(PATIENCE):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"not within {PATIENCE} s: {what}")


@dataclass
class Harness:
    client: Client
    server: Server
    service: TaskService
    pool: Pool
    agent: Agent

    async def register(self, fn: Callable[..., Any]) -> str:
        pickled = cloudpickle.dumps(fn)
        digest = hashlib.sha256(pickled).hexdigest()
        request = wire.RegisterFunction(digest, fn.__name__, pickled)
        reply = await self.client.call(wire.SERVICE, wire.METHOD_REGISTER, wire.encode(request))
        assert wire.Registered(digest) == wire.decode_request(reply, wire.Registered)
        return digest

    async def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        task_id: str = "t",
        timeout: float | None = None,
        client: Client | None = None,
        **fields: Any,
    ) -> wire.TaskReply:
        digest = await self.register(fn)
        task = wire.Submit(task_id, digest, fn.__name__, cloudpickle.dumps((args, {})), **fields)
        reply = await (client or self.client).call(
            wire.SERVICE, wire.METHOD_SUBMIT, wire.encode(task), timeout=timeout
        )
        return wire.decode_reply(reply)

    async def result(self, fn: Callable[..., Any], *args: Any, **fields: Any) -> Any:
        reply = await self.submit(fn, *args, **fields)
        assert isinstance(reply, wire.TaskDone), reply
        return cloudpickle.loads(reply.result)

    async def cancel(self, *task_ids: str) -> tuple[str, ...]:
        request = wire.encode(wire.Cancel(task_ids))
        reply = await self.client.call(wire.SERVICE, wire.METHOD_CANCEL, request)
        return wire.decode_request(reply, wire.Cancelled).task_ids

    def only_process(self) -> Any:
        (child,) = self.pool._children
        return child.process


@asynccontextmanager
async def task_service(size: int = 1) -> AsyncIterator[Harness]:
    backend = NoopBackend()
    backend.start()
    agent = Agent(backend)
    try:
        async with Pool(size) as pool:
            service = TaskService(pool, agent, TokenCheck())
            async with connected_client([service.service(), *agent.services()]) as (
                client,
                server,
            ):
                yield Harness(client, server, service, pool, agent)
    finally:
        backend.close()


def getpid() -> int:
    return os.getpid()


def mark_and_sleep(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)


async def started(marker: Path) -> int:
    """The pid of the pool process running ``mark_and_sleep(marker)``, once it runs."""
    pid = ""

    def ran() -> bool:
        nonlocal pid
        pid = marker.read_text() if marker.exists() else ""
        return pid != ""

    await until(ran, "the task runs")
    return int(pid)


async def assert_killed_and_replaced(h: Harness, process: Any, caplog: Any) -> None:
    """*process* (the one that ran the stopped task) is killed; a next task runs."""
    await until(lambda: process.poll() is not None, "the pool process is killed")
    assert process.returncode == -signal.SIGKILL
    assert f"Killing pool process {process.pid} to stop task mark_and_sleep" in caplog.text
    # The only pool process was killed: its replacement runs the next task.
    with anyio.fail_after(PATIENCE):
        pid = await h.result(getpid)
    assert pid != process.pid
    assert h.pool.pids == [pid]
    assert h.pool.lost == 1
    assert h.service.running == {}
    # A task stopped on purpose is not reported as a crash.
    assert "while running mark_and_sleep" not in caplog.text


async def test_a_task_past_its_deadline_has_its_process_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    marker = tmp_path / "running"
    async with task_service() as h:
        process = h.only_process()
        assert await h.result(getpid) == process.pid  # it is up: the deadline is the task's
        with pytest.raises(RPCError) as info:
            await h.submit(mark_and_sleep, str(marker), timeout=2.0)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        await assert_killed_and_replaced(h, process, caplog)


async def test_a_cancelled_task_has_its_process_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    marker = tmp_path / "running"
    async with task_service() as h:
        process = h.only_process()
        async with anyio.create_task_group() as tg:

            async def cancelled() -> None:
                with pytest.raises(RPCError) as info:
                    await h.submit(mark_and_sleep, str(marker), task_id="doomed")
                assert info.value.code == StatusCode.CANCELLED
                assert "task mark_and_sleep was cancelled" in info.value.message

            tg.start_soon(cancelled)
            assert await started(marker) == process.pid
            assert list(h.service.running) == ["doomed"]
            assert await h.cancel("doomed", "unknown") == ("doomed",)
        await assert_killed_and_replaced(h, process, caplog)
        # Cancelling it again (or any task that ended) stops nothing.
        assert await h.cancel("doomed") == ()


async def test_a_task_of_a_client_that_went_away_has_its_process_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    marker = tmp_path / "running"
    async with task_service() as h:
        process = h.only_process()
        server_end, client_end = socket.socketpair()
        await h.server.accept_socket(server_end)
        other = await client_from_socket(client_end)
        try:
            async with anyio.create_task_group() as tg:

                async def abandoned() -> None:
                    with pytest.raises(Exception):  # noqa: B017,PT011 - the connection closes
                        await h.submit(mark_and_sleep, str(marker), client=other)

                tg.start_soon(abandoned)
                assert await started(marker) == process.pid
                await other.aclose()
        finally:
            await other.aclose()
        await assert_killed_and_replaced(h, process, caplog)
