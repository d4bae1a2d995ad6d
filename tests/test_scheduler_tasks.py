"""Offloaded tasks through the scheduler: routing, failover, capabilities, sessions, cancel.

The scheduler runs in the test's event loop (static workers, no zeroconf);
workers are real ``vaccelray worker`` processes with task pools; the client
is a real :class:`vaccelray.Client` (its own loop thread), awaited from here.
A task's ``os.getppid()`` is the pid of the worker daemon that ran it.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

import vaccelray
from tests.clusters import serving_scheduler
from tests.processes import Proc, scheduler_argv, start_daemon, start_daemons, worker_argv
from tests.test_offload_api import Custom, add, raises, session_used, sleeps
from tests.test_scheduler_routing import config, wait_until
from tests.waiting import eventually
from vaccelray.auth import daemon_token
from vaccelray.client import Client
from vaccelray.client.remote import function_spec
from vaccelray.scheduler import Scheduler, run_scheduler

pytestmark = pytest.mark.anyio

_ME = pwd.getpwuid(os.getuid()).pw_name


def task_worker_argv() -> list[str]:
    # Unsandboxed, tasks as the test's user: they name their worker by os.getppid() (a
    # sandbox gives them their own pid namespace) and leave marks in the test's tmp_path
    # (a sandbox gives them their own /tmp). Sandboxing is tested in test_sandbox.py.
    return worker_argv(
        "-a", "tcp://127.0.0.1:0", "--backend", "noop", "--no-announce", "--pool-size", "2",
        "--unsafe-no-sandbox", "--task-user", _ME,
    )  # fmt: skip


@pytest.fixture(scope="module")
def workers() -> Iterator[list[tuple[Proc, str]]]:
    """Two task workers shared by the tests that do not kill one."""
    started = start_daemons([task_worker_argv()] * 2)
    yield started
    for proc, _ in started:
        proc.stop()


@pytest.fixture
def doomed_workers() -> Iterator[list[tuple[Proc, str]]]:
    started = start_daemons([task_worker_argv()] * 2)
    yield started
    for proc, _ in started:
        proc.stop()


@asynccontextmanager
async def cluster(
    workers: list[tuple[Proc, str]], *, cache_bytes: int | None = None, token: str | None = None
) -> AsyncIterator[tuple[Scheduler, Client]]:
    cfg = replace(config(*(a for _, a in workers)), token=token)
    if cache_bytes is not None:
        cfg = replace(cfg, function_cache_bytes=cache_bytes)
    async with serving_scheduler(cfg) as sched:
        client = await anyio.to_thread.run_sync(
            functools.partial(Client, sched.addresses[0], token=token)
        )
        try:
            yield sched, client
        finally:
            await anyio.to_thread.run_sync(client.shutdown)


@vaccelray.offload(retries=2, timeout=20)
def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getppid()


def parent() -> int:
    return os.getppid()


@vaccelray.offload(retries=2, timeout=60)
def held(marker_dir: str) -> int:
    """Leave a file named by this task's worker and pool process, then wait for ``go``."""
    here = Path(marker_dir)
    (here / f"{os.getppid()}-{os.getpid()}").touch()
    while not (here / "go").exists():
        time.sleep(0.01)
    return os.getppid()


def running_on(marker_dir: Path, worker: Proc) -> int:
    """How many of *worker*'s pool processes have started a ``held`` task."""
    return len(list(marker_dir.glob(f"{worker.pid}-*")))


async def logged(procs: list[Proc], pattern: str, since: list[int]) -> None:
    """Wait until one of *procs* prints a line matching *pattern* (after line ``since[i]``)."""
    regex = re.compile(pattern)

    async def seen() -> bool:
        return any(
            regex.search(line)
            for p, start in zip(procs, since, strict=True)
            for line in p.lines[start:]
        )

    await wait_until(seen, 30.0, f"a worker logged {pattern!r}")


async def test_results_and_exceptions_come_back_through_the_scheduler(
    workers: list[tuple[Proc, str]],
) -> None:
    async with cluster(workers) as (sched, client):
        assert await client.submit(add, 2, b=3) == 5
        refs = [client.submit(add, i, b=100) for i in range(20)]
        assert [await r for r in refs] == [i + 100 for i in range(20)]
        with pytest.raises(Custom) as info:
            await client.submit(raises, 7)
        assert isinstance(info.value, vaccelray.TaskError)
        assert str(info.value) == "bad 7"
        assert info.value.code == 42
        assert "in _helper" in info.value.remote_traceback
        # The task's timeout is the deadline of every hop: stopped on the worker too.
        procs = [p for p, _ in workers]
        since = [len(p.lines) for p in procs]
        with pytest.raises(vaccelray.TaskTimeoutError):
            await client.submit(sleeps, 30)
        await logged(procs, r"Killing pool process \d+ to stop task sleeps", since)
        assert await client.submit(add, 4) == 4
        # The scheduler kept each function once, and nothing is left in flight.
        assert len(sched.tasks.functions) == 3
        assert sched.tasks.inflight == {}
        assert all(w.inflight == 0 for w in sched.pool.registry)


async def test_tasks_spread_over_the_workers(workers: list[tuple[Proc, str]]) -> None:
    pids = {p.pid for p, _ in workers}
    async with cluster(workers) as (sched, client):
        refs = [client.submit(nap, 0.2) for _ in range(8)]
        ran = [await r for r in refs]
    assert set(ran) == pids
    assert all(ran.count(pid) >= 2 for pid in pids)
    # The metrics' placements: each task sent once, to the worker that ran it.
    assert sorted(w.placements for w in sched.pool.registry) == sorted(
        ran.count(pid) for pid in pids
    )


async def test_capability_mismatch_fails_at_once(workers: list[tuple[Proc, str]]) -> None:
    async with cluster(workers) as (_, client):
        with pytest.raises(vaccelray.CapabilityError, match="needs backend 'onnx'"):
            await client.submit(add.options(backend="onnx", retries=3), 1)
        with pytest.raises(vaccelray.CapabilityError, match="needs ops classify, teleport"):
            await client.submit(add.options(ops=("classify", "teleport")), 1)
        assert await client.submit(add.options(backend="noop", ops="classify"), 1) == 1


async def test_no_healthy_worker_fails_at_once_without_hanging() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    async with run_scheduler(config(dead)) as sched:
        client = await anyio.to_thread.run_sync(Client, sched.addresses[0])
        try:
            with pytest.raises(
                vaccelray.WorkerLostError, match=r"no healthy worker.*tried 2 times"
            ):
                await client.submit(add.options(retries=1), 1)
        finally:
            await anyio.to_thread.run_sync(client.shutdown)


async def test_killed_worker_tasks_are_retried_elsewhere_and_all_come_back(
    doomed_workers: list[tuple[Proc, str]], tmp_path: Path
) -> None:
    procs = {a: p for p, a in doomed_workers}
    async with cluster(doomed_workers) as (sched, client), client.session() as session:
        doomed = sched.table.sessions[session.id].binding
        assert doomed is not None
        victim = procs[doomed.address]
        survivor = next(p for a, p in procs.items() if a != doomed.address)
        # Every task holds its pool process until the file "go" exists.
        pinned = session.submit(held.options(retries=0), str(tmp_path))
        refs = [client.submit(held, str(tmp_path)) for _ in range(6)]

        async def spread() -> bool:
            # The victim has the pinned task and some of the others (it also has
            # the session, so fewer of them).
            loads = {w.address: w.inflight for w in sched.pool.registry}
            return sum(loads.values()) == 7 and min(loads.values()) >= 2

        await wait_until(spread, 30.0, "tasks sent to both workers")

        async def victim_busy() -> bool:  # both its pool processes run a task
            return running_on(tmp_path, victim) == 2

        await wait_until(victim_busy, 30.0, "tasks running on the victim")
        victim.kill()
        (tmp_path / "go").touch()
        assert [await r for r in refs] == [survivor.pid] * 6
        # A task pinned to the lost worker's session is not retried (retries=0):
        # it fails naming the worker; the session then moves, as vAccel calls do.
        with pytest.raises(vaccelray.WorkerLostError, match=doomed.address):
            await pinned
        assert await session.submit(parent) == survivor.pid
        moved = sched.table.sessions[session.id].binding
        assert moved is not None
        assert moved.address != doomed.address
    assert sched.tasks.inflight == {}


async def test_session_tasks_run_on_the_sessions_worker(workers: list[tuple[Proc, str]]) -> None:
    pid_of = {a: p.pid for p, a in workers}
    async with cluster(workers) as (sched, client):
        # Two sessions: one on each worker (a session counts as load).
        async with client.session() as one, client.session() as two:
            bindings = [sched.table.sessions[s.id].binding for s in (one, two)]
            assert bindings[0] is not None
            assert bindings[1] is not None
            assert {b.address for b in bindings if b} == set(pid_of)
            for session, binding in zip((one, two), bindings, strict=True):
                assert binding is not None
                ran = [await session.submit(parent) for _ in range(5)]
                assert ran == [pid_of[binding.address]] * 5
                # vaccelray.local in the task uses the session, by the worker's id for it.
                assert await session.submit(session_used) == binding.worker_session
        # A session that does not exist: refused, not run anywhere.
        with pytest.raises(vaccelray.TaskError, match="Unknown session 999"):
            await client._submit(parent, (), {}, 999)


async def test_cancel_reaches_the_worker_running_the_task(
    workers: list[tuple[Proc, str]], tmp_path: Path
) -> None:
    procs = {a: p for p, a in workers}
    async with cluster(workers) as (sched, client):
        since = {a: len(p.lines) for a, p in procs.items()}
        ref = client.submit(held.options(retries=0), str(tmp_path))

        async def sent() -> bool:
            return any(f.address for f in sched.tasks.inflight.values())

        await wait_until(sent, 30.0, "task sent to a worker")
        (flight,) = sched.tasks.inflight.values()
        assert flight.address is not None
        proc = procs[flight.address]

        async def running() -> bool:
            return running_on(tmp_path, proc) == 1

        await wait_until(running, 30.0, "the task runs in a pool process")
        assert ref.cancel()
        with pytest.raises(vaccelray.TaskCancelledError):
            await ref
        await logged([proc], f"Cancelled task {ref.task_id} ", [since[flight.address]])
        await logged([proc], r"Killing pool process \d+ to stop task held", [since[flight.address]])

        async def idle() -> bool:
            return not sched.tasks.inflight

        await wait_until(idle, 30.0, "the scheduler forgot the task")
        # The worker's pool is usable again at once.
        assert await client.submit(add, 1, 1) == 2


async def test_a_client_that_goes_away_has_its_tasks_stopped(
    workers: list[tuple[Proc, str]], tmp_path: Path
) -> None:
    procs = {a: p for p, a in workers}
    async with cluster(workers) as (sched, client):
        since = {a: len(p.lines) for a, p in procs.items()}
        other = await anyio.to_thread.run_sync(Client, sched.addresses[0])
        ref = other.submit(held.options(retries=0), str(tmp_path))

        async def sent() -> bool:
            return any(f.address for f in sched.tasks.inflight.values())

        await wait_until(sent, 30.0, "task sent to a worker")
        (flight,) = sched.tasks.inflight.values()
        assert flight.address is not None
        proc = procs[flight.address]

        async def running() -> bool:
            return running_on(tmp_path, proc) == 1

        await wait_until(running, 30.0, "the task runs in a pool process")
        await anyio.to_thread.run_sync(other.shutdown)
        with pytest.raises(vaccelray.WorkerLostError, match="shut down"):
            await ref
        await logged([proc], f"Cancelled task {ref.task_id} ", [since[flight.address]])
        await logged([proc], r"Killing pool process \d+ to stop task held", [since[flight.address]])
        assert await client.submit(add, 2, 2) == 4


async def test_functions_are_registered_again_where_they_were_lost(
    workers: list[tuple[Proc, str]], caplog: pytest.LogCaptureFixture
) -> None:
    big = b"x" * 300_000

    def first() -> int:
        return len(big)

    def second() -> int:
        return len(big) + 1

    async with cluster(workers, cache_bytes=400_000) as (sched, client):
        assert await client.submit(first) == 300_000
        assert await client.submit(second) == 300_001
        # The scheduler's cache holds one of them now: the client is asked again.
        assert len(sched.tasks.functions) == 1
        assert await client.submit(first) == 300_000

        # A worker that does not have a function the scheduler thinks it has (it
        # dropped it from its cache) gets it again.
        def fresh(x: int) -> int:
            return x * 3

        digest = function_spec(fresh).digest
        for record in sched.pool.registry:
            sched.tasks._on_worker.setdefault((record.address, record.instance), set()).add(digest)
        with caplog.at_level(logging.INFO, logger="vaccelray.routing"):
            assert [await client.submit(fresh, i) for i in range(4)] == [0, 3, 6, 9]
        lost = [r.getMessage() for r in caplog.records if "lost function" in r.getMessage()]
        # Registered again on each worker that got one, once: then it is known there.
        assert lost
        assert len(lost) == len(set(lost)) <= 2


async def test_a_scheduler_with_a_token_asks_for_it(workers: list[tuple[Proc, str]]) -> None:
    token, _ = daemon_token()  # the workers': this user's default token
    async with cluster(workers, token=token) as (sched, client):
        assert await client.submit(add, 1, 2) == 3
        # Another token: the scheduler cannot prove holding it, so the client sends nothing.
        with pytest.raises(vaccelray.AuthenticationError) as info:
            await anyio.to_thread.run_sync(
                functools.partial(Client, sched.addresses[0], token="wrong")
            )
        assert str(info.value) == (
            f"{sched.addresses[0]} did not prove it holds your cluster token (its token "
            "differs, it is no member, or a relay sits in the middle): nothing was sent to it"
        )


async def test_workers_that_cannot_prove_the_schedulers_token_are_never_routed_to(
    workers: list[tuple[Proc, str]],
) -> None:
    # The scheduler holds another token than the workers: they cannot prove it, so they
    # are not routed to, and the scheduler's status says why.
    cfg = replace(config(*(a for _, a in workers)), token="not the workers' token")
    async with run_scheduler(cfg) as sched:
        registry = sched.pool.registry

        def both_refused() -> bool:
            records = [registry.get(address) for _, address in workers]
            return all(r is not None and "did not prove" in r.last_error for r in records)

        await eventually(both_refused, "both workers failing the proof")
        assert registry.routable() == []
    for proc, _ in workers:
        assert "RegisterFunction" not in proc.text()


def test_init_with_the_scheduler_address_offloads(workers: list[tuple[Proc, str]]) -> None:
    """The CLI scheduler (a process) serves the task service to the default client."""
    argv = scheduler_argv("-a", "tcp://127.0.0.1:0", "--no-discover")
    for _, address in workers:
        argv += ["--worker", address]
    proc, address = start_daemon(argv)
    try:
        vaccelray.init(address)
        try:
            assert add(2, b=3) == 5  # a direct call blocks for the result
            pids = set(vaccelray.get([nap.remote(0.1) for _ in range(6)]))
            assert pids == {p.pid for p, _ in workers}
        finally:
            vaccelray.shutdown()
    finally:
        assert proc.stop() == 0
    assert "Registered function add" in proc.text()


async def test_classify_with_scores_spreads_over_workers_and_needs_no_token(
    workers: list[tuple[Proc, str]],
) -> None:
    from vaccelray.classify import Classified, classify_images
    from vaccelray.worker.noop import NOOP_TAG

    token, _ = daemon_token()  # the workers': the scheduler proves it to them
    async with cluster(workers, token=token) as (sched, _):
        results = await classify_images([b"img"] * 8, sched.addresses[0], concurrency=4)
    assert results == [Classified(NOOP_TAG)] * 8

    def served() -> list[int]:
        return [proc.text().count("Classify (top 3)") for proc, _ in workers]

    # The workers write their event lines in batches: wait for all eight.
    await eventually(lambda: sum(served()) >= 8, "eight Classify lines")
    assert all(count > 0 for count in served())
    assert sum(w.placements for w in sched.pool.registry) == 8
