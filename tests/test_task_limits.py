"""The worker's task service against clients that ask too much (issue #11).

Pool processes are untrusted (a frame length they declare is checked before
anything is allocated); tasks waiting for the pool are bounded per worker and
per connection; connections take turns at the pool; a task runs at most the
worker's task timeout. Tasks here block on files the test creates, never on
the clock.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest

from vaccelray.auth import TokenCheck
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import services
from vaccelray.protocol import tasks as wire
from vaccelray.transport.client import Client, client_from_socket
from vaccelray.transport.server import Server, serve
from vaccelray.worker import tasks as tasks_module
from vaccelray.worker.agent import Agent
from vaccelray.worker.noop import NoopBackend
from vaccelray.worker.pool import FRAME_MARGIN, Pool
from vaccelray.worker.tasks import TaskService

pytestmark = pytest.mark.anyio

#: Liveness only: how long a condition that must come true may take on a loaded machine.
PATIENCE = 30.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* (a file or a process exit has no event to wait on)."""
    with anyio.move_on_after(PATIENCE):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"not within {PATIENCE} s: {what}")


@dataclass
class Worker:
    """A task service on a pool, served to as many client connections as a test opens."""

    service: TaskService
    pool: Pool
    server: Server
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        server_end, client_end = socket.socketpair()
        await self.server.accept_socket(server_end)
        client = await client_from_socket(client_end)
        self.clients.append(client)
        return client

    async def submit(
        self,
        client: Client,
        fn: Callable[..., Any],
        *args: Any,
        task_id: str = "t",
        timeout: float | None = None,
    ) -> wire.TaskReply:
        pickled = cloudpickle.dumps(fn)
        digest = hashlib.sha256(pickled).hexdigest()
        request = wire.RegisterFunction(digest, fn.__name__, pickled)
        await client.call_rpc(services.REGISTER_FUNCTION, request)
        task = wire.Submit(task_id, digest, fn.__name__, cloudpickle.dumps((args, {})))
        return await client.call_rpc(services.SUBMIT, task, timeout=timeout)

    async def result(self, client: Client, fn: Callable[..., Any], *args: Any) -> Any:
        reply = await self.submit(client, fn, *args)
        assert isinstance(reply, wire.TaskDone), reply
        return cloudpickle.loads(reply.result)

    def only_process(self) -> Any:
        (child,) = self.pool._children
        return child.process


@asynccontextmanager
async def worker(
    size: int = 1, max_message_size: int = 1024, **options: Any
) -> AsyncIterator[Worker]:
    backend = NoopBackend()
    backend.start()
    try:
        async with Pool(size, max_message_size=max_message_size) as pool:
            service = TaskService(
                pool, Agent(backend), TokenCheck(), max_message_size=max_message_size, **options
            )
            async with serve([service.service()], [], grace=1.0) as server:
                w = Worker(service, pool, server)
                try:
                    yield w
                finally:
                    for client in w.clients:
                        await client.aclose()
    finally:
        backend.close()


def getpid() -> int:
    return os.getpid()


def gated(name: str, directory: str) -> str:
    """Say it started (a file *name*), wait for ``go-NAME``; return *name*."""
    Path(directory, name).touch()
    while not os.path.exists(os.path.join(directory, f"go-{name}")):
        time.sleep(0.01)
    return name


def started(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if not p.name.startswith("go-")}


def more_started(directory: Path, count: int) -> bool:
    return len(started(directory)) > count


# -- a pool process is untrusted ---------------------------------------------------


def bogus_header(size: int) -> None:
    """Write a frame header declaring *size* bytes on this pool process's socket."""
    os.write(int(sys.argv[1]), struct.pack(">I", size))
    time.sleep(600)


async def test_a_task_declaring_a_huge_answer_fails_as_crashed_and_the_worker_serves_on() -> None:
    limit = 1024 + FRAME_MARGIN
    async with worker() as w:
        client = await w.connect()
        process = w.only_process()
        with anyio.fail_after(PATIENCE):  # unchecked, the worker would wait for that frame
            reply = await w.submit(client, bogus_header, limit + 1)
        assert reply == wire.TaskFailed(
            wire.FailureKind.CRASHED,
            f"the pool process running bogus_header declared a {limit + 1}-byte answer "
            f"(more than {limit} bytes) and was killed",
        )
        await until(lambda: process.poll() is not None, "its process is killed")
        assert process.returncode == -signal.SIGKILL
        pid = await w.result(client, getpid)
        assert pid != process.pid
        assert w.pool.pids == [pid]


# -- bounded queues ------------------------------------------------------------------


async def test_tasks_waiting_past_a_bound_are_refused_at_once(tmp_path: Path) -> None:
    async with worker(max_queued=3, max_queued_per_connection=2) as w:
        a, b, c = [await w.connect() for _ in range(3)]
        results: dict[str, Any] = {}

        async def run(client: Client, name: str) -> None:
            results[name] = await w.result(client, gated, name, str(tmp_path))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, a, "a1")
            await until(lambda: started(tmp_path) == {"a1"}, "a1 runs")
            tg.start_soon(run, a, "a2")
            tg.start_soon(run, a, "a3")
            await until(lambda: w.pool.queued == 2, "a2 and a3 wait")
            with anyio.fail_after(PATIENCE), pytest.raises(RPCError) as info:
                await w.submit(a, gated, "a4", str(tmp_path))  # unbounded, it would wait
            assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
            assert info.value.message == (
                "this connection's task queue is full (2 tasks waiting; "
                "worker option --max-queued-per-connection)"
            )
            tg.start_soon(run, b, "b1")  # another connection may still queue...
            await until(lambda: w.pool.queued == 3, "b1 waits")
            with anyio.fail_after(PATIENCE), pytest.raises(RPCError) as info:  # ...up to a bound
                await w.submit(c, gated, "c1", str(tmp_path))
            assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
            assert info.value.message == (
                "the worker's task queue is full (3 tasks waiting; "
                "worker option --max-queued-tasks)"
            )
            assert started(tmp_path) == {"a1"}  # refused while nothing moved
            for name in ("a1", "a2", "a3", "b1"):
                (tmp_path / f"go-{name}").touch()
        assert results == {name: name for name in ("a1", "a2", "a3", "b1")}
        assert "a4" not in started(tmp_path)
        assert await w.result(c, getpid) in w.pool.pids  # the refused client is served now
        assert w.service.running == {}


async def test_no_bound_on_waiting_tasks_when_zero(tmp_path: Path) -> None:
    async with worker(max_queued=0, max_queued_per_connection=0) as w:
        client = await w.connect()
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(w.result, client, gated, f"t{i}", str(tmp_path))
            await until(lambda: w.pool.queued == 3, "three tasks wait behind one")
            for i in range(4):
                (tmp_path / f"go-t{i}").touch()


# -- fair share ------------------------------------------------------------------------


async def test_connections_take_turns_at_the_pool(tmp_path: Path) -> None:
    async with worker() as w:
        a, b = await w.connect(), await w.connect()
        order: list[str] = []

        async def run(client: Client, name: str) -> None:
            order.append(await w.result(client, gated, name, str(tmp_path)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, a, "a1")
            await until(lambda: started(tmp_path) == {"a1"}, "a1 runs")
            for name in ("a2", "a3", "a4"):
                tg.start_soon(run, a, name)
            await until(lambda: w.pool.queued == 3, "a's other tasks wait")
            tg.start_soon(run, b, "b1")
            await until(lambda: w.pool.queued == 4, "b1 waits behind them")
            for name in ("a1", "b1", "a2", "a3", "a4"):
                count = len(started(tmp_path))
                (tmp_path / f"go-{name}").touch()
                if name != "a4":
                    await until(functools.partial(more_started, tmp_path, count), f"after {name}")
        # b1 ran as soon as a1 ended, before a's backlog.
        assert order == ["a1", "b1", "a2", "a3", "a4"]


# -- the task timeout ---------------------------------------------------------------


def forever() -> None:
    while True:
        time.sleep(1)


async def test_a_task_runs_at_most_the_task_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async with worker(task_timeout=0.5) as w:
        client = await w.connect()
        process = w.only_process()
        with pytest.raises(RPCError) as info:
            await w.submit(client, forever)  # no deadline of its own
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        assert info.value.message == (
            "forever ran past its timeout of 0.5 s, the worker's task timeout "
            "(worker option --task-timeout)"
        )
        await until(lambda: process.poll() is not None, "its process is killed")
        assert process.returncode == -signal.SIGKILL
        # Its replacement runs the next task (given the time to start: it counts as run time).
        w.service.task_timeout = 600
        pid = await w.result(client, getpid)
        assert pid != process.pid
        assert w.pool.pids == [pid]
        assert w.pool.lost == 1
        assert w.service.running == {}
        # Killed on purpose: not reported as a crash.
        assert "while running forever" not in caplog.text


async def test_a_shorter_deadline_of_the_submit_wins() -> None:
    async with worker(task_timeout=600) as w:
        client = await w.connect()
        process = w.only_process()
        with pytest.raises(RPCError) as info:
            await w.submit(client, forever, timeout=0.5)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        assert "--task-timeout" not in info.value.message
        await until(lambda: process.poll() is not None, "its process is killed")
        assert process.returncode == -signal.SIGKILL


async def test_a_task_timeout_of_zero_is_no_limit() -> None:
    async with worker(task_timeout=0) as w:
        client = await w.connect()
        assert await w.result(client, getpid) == w.only_process().pid


# -- the daemon's options ---------------------------------------------------------------


def test_the_worker_command_passes_its_task_limits_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vaccelray import cli
    from vaccelray.worker import daemon

    configs: list[Any] = []
    monkeypatch.setattr(cli, "_setup_logging", lambda *a, **k: None)
    monkeypatch.setattr(cli, "keep_heap", lambda: None)
    monkeypatch.setattr(daemon, "run_worker", lambda config: config)
    monkeypatch.setattr(cli, "_run_daemon", lambda start: configs.append(start()))
    runner = CliRunner()
    result = runner.invoke(cli.main, ["worker", "--backend", "noop"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli.main,
        [
            "worker",
            "--backend",
            "noop",
            "--task-timeout",
            "7.5",
            "--max-queued-tasks",
            "9",
            "--max-queued-per-connection",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    limits = [(c.task_timeout, c.max_queued_tasks, c.max_queued_per_connection) for c in configs]
    assert limits == [
        (
            tasks_module.DEFAULT_TASK_TIMEOUT,
            tasks_module.DEFAULT_MAX_QUEUED,
            tasks_module.DEFAULT_MAX_QUEUED_PER_CONNECTION,
        ),
        (7.5, 9, 0),
    ]
    assert configs[0] == daemon.WorkerConfig(backend="noop", addresses=configs[0].addresses)
    help_text = runner.invoke(cli.main, ["worker", "--help"]).output
    for option in ("--task-timeout", "--max-queued-tasks", "--max-queued-per-connection"):
        assert option in help_text


async def test_a_worker_applies_its_task_limits() -> None:
    from vaccelray.worker.daemon import WorkerConfig, run_worker

    config = WorkerConfig(
        addresses=("tcp://127.0.0.1:0",),
        backend="noop",
        announce=False,
        pool_size=1,
        max_message_size=2048,
        max_queued_tasks=5,
        max_queued_per_connection=2,
        task_timeout=9.0,
    )
    async with run_worker(config) as running:
        service = running.tasks
        assert service is not None
        assert (service.max_queued, service.max_queued_per_connection) == (5, 2)
        assert service.task_timeout == 9.0
        assert service.max_message_size == 2048
        # Pool processes send results as large as the object store takes (kept there).
        assert service.objects is not None
        largest = max(service.objects.limits.memory, service.objects.limits.disk)
        assert service.pool._max_frame == largest + FRAME_MARGIN


# -- the function cache ---------------------------------------------------------------


async def test_the_worker_keeps_one_copy_of_a_registered_function() -> None:
    async with worker() as w:
        client = await w.connect()
        assert await w.result(client, getpid) > 0
        (entry,) = w.service.functions._entries.values()
        assert entry.payload == b""  # only the decoded request is held...
        assert w.service.functions.held == len(entry.request.pickled)  # ...and counted


# -- no reply larger than the max message size ----------------------------------------


def sized(n: int) -> bytes:
    return b"x" * n


async def test_a_result_too_large_to_send_is_resource_exhausted() -> None:
    async with worker(max_message_size=1024) as w:
        client = await w.connect()
        assert await w.result(client, sized, 900) == b"x" * 900
        # Pickled, it fits in the message size; answered, it would not.
        with pytest.raises(RPCError) as info:
            await w.submit(client, sized, 1000)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert info.value.message.startswith("Submit response of ")
        assert info.value.message.endswith(" bytes exceeds the limit of 1024 bytes")
        # Already too large pickled: the pool process says so (and lives on).
        process = w.only_process()
        with pytest.raises(RPCError) as info:
            await w.submit(client, sized, 5000)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        size = len(cloudpickle.dumps(b"x" * 5000))
        assert info.value.message == (
            f"the result of sized is {size} bytes, more than the 1024 a reply may carry "
            "(worker option --max-message-size)"
        )
        assert w.only_process() is process
        assert w.pool.lost == 0
        assert w.service.running == {}
