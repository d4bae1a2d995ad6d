"""Actors: ordered calls on one instance, handles in tasks, death, restarts, kill, bounds.

Most tests use a client with an embedded worker (noop backend); the bounds
and the sandbox are tested against real ``vaccelray worker`` processes.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

import vaccelray
from tests.clusters import serving_scheduler
from tests.processes import Proc, start_daemon, worker_argv
from tests.test_offload_api import ADDRESS_VARS, Custom
from tests.test_scheduler_routing import config
from tests.test_scheduler_tasks import cluster, doomed_workers, logged, workers  # noqa: F401
from tests.waiting import eventually, until
from vaccelray.client import Client
from vaccelray.scheduler import Scheduler
from vaccelray.worker.noop import NOOP_TAG


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    saved = {k: os.environ.pop(k) for k in ADDRESS_VARS if k in os.environ}
    try:
        with Client(backend="noop") as c:
            yield c
    finally:
        os.environ.update(saved)


@vaccelray.offload
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.total = start
        self.log: list[int] = []

    def add(self, k: int) -> int:
        self.total += k
        self.log.append(k)
        return self.total

    def history(self) -> list[int]:
        return self.log

    def pid(self) -> int:
        return os.getpid()

    def wait_for(self, path: str) -> str:
        """Runs until *path* exists: the test decides when this call ends."""
        Path(path + ".started").touch()
        while not os.path.exists(path):
            time.sleep(0.01)
        return "seen"

    def crash(self) -> None:
        os._exit(3)

    def fail(self, x: int) -> None:
        raise Custom(f"bad {x}", x)

    def session(self) -> tuple[int, str]:
        from vaccelray import local

        tag = local.classify(b"image")
        return local._agent().session(), tag


@vaccelray.offload
class Broken:
    def __init__(self) -> None:
        raise Custom("no constructor for you", 7)

    def anything(self) -> int:
        return 1


@vaccelray.offload
def add_through(handle: vaccelray.ActorHandle[Counter], k: int) -> int:
    return vaccelray.get(handle.add.remote(k))


def test_calls_run_in_order_on_one_instance(client: Client) -> None:
    counter = Counter.remote_on(client, 10)
    refs = [counter.add.remote(k) for k in range(1, 51)]
    assert vaccelray.get(refs) == [10 + k * (k + 1) // 2 for k in range(1, 51)]
    assert vaccelray.get(counter.history.remote()) == list(range(1, 51))
    # One process holds it, not the task pool's.
    assert len({vaccelray.get(counter.pid.remote()) for _ in range(5)}) == 1
    assert vaccelray.kill(counter)


def test_calls_from_threads_and_taskref_arguments_keep_the_actors_state(client: Client) -> None:
    counter = Counter.remote_on(client)
    first = counter.add.remote(5)
    # A TaskRef argument is waited for; the calls after it still run after it.
    second = counter.add.remote(first)
    third = counter.add.remote(1)
    assert vaccelray.get([first, second, third]) == [5, 10, 11]
    assert vaccelray.kill(counter)


def test_a_method_error_is_raised_and_the_actor_lives_on(client: Client) -> None:
    counter = Counter.remote_on(client, 1)
    with pytest.raises(Custom) as info:
        vaccelray.get(counter.fail.remote(3))
    assert isinstance(info.value, vaccelray.TaskError)
    assert info.value.code == 3
    assert vaccelray.get(counter.add.remote(1)) == 2
    vaccelray.kill(counter)


def test_unknown_methods_fail_at_the_call_site(client: Client) -> None:
    counter = Counter.remote_on(client)
    with pytest.raises(AttributeError, match="no public method 'nope'"):
        counter.nope.remote()
    with pytest.raises(AttributeError):
        counter._private  # noqa: B018
    vaccelray.kill(counter)


def test_a_failing_constructor_kills_the_actor(client: Client) -> None:
    broken = Broken.remote_on(client)
    with pytest.raises(Custom, match="no constructor for you"):
        broken.ready().result()
    with pytest.raises(vaccelray.ActorDiedError, match="constructor"):
        vaccelray.get(broken.anything.remote())


def test_a_crash_fails_the_running_pending_and_later_calls(client: Client, tmp_path: Path) -> None:
    counter = Counter.remote_on(client)
    release = tmp_path / "release"
    waiting = counter.wait_for.remote(str(release))
    crash = counter.crash.remote()
    pending = counter.add.remote(1)
    release.touch()
    assert vaccelray.get(waiting) == "seen"
    with pytest.raises(vaccelray.ActorDiedError, match="status 3"):
        vaccelray.get(crash)
    with pytest.raises(vaccelray.ActorDiedError, match="status 3"):
        vaccelray.get(pending)
    with pytest.raises(vaccelray.ActorDiedError):
        vaccelray.get(counter.add.remote(1))
    assert not vaccelray.kill(counter)  # dead already


def test_max_restarts_re_runs_the_constructor_in_a_new_process(client: Client) -> None:
    counter = Counter.options(max_restarts=1).remote_on(client, 100)
    assert vaccelray.get(counter.add.remote(1)) == 101
    before = vaccelray.get(counter.pid.remote())
    with pytest.raises(vaccelray.ActorDiedError):
        vaccelray.get(counter.crash.remote())
    # Constructed again: the state is the constructor's, the process a new one.
    assert vaccelray.get(counter.add.remote(1)) == 101
    assert vaccelray.get(counter.pid.remote()) != before
    with pytest.raises(vaccelray.ActorDiedError):
        vaccelray.get(counter.crash.remote())
    with pytest.raises(vaccelray.ActorDiedError, match="died"):  # no restart left
        vaccelray.get(counter.add.remote(1))


def test_kill_fails_later_calls(client: Client) -> None:
    counter = Counter.remote_on(client)
    assert vaccelray.get(counter.add.remote(2)) == 2
    assert vaccelray.kill(counter) is True
    with pytest.raises(vaccelray.ActorDiedError, match="killed"):
        vaccelray.get(counter.add.remote(1))
    assert vaccelray.kill(counter) is False


def test_a_handle_passed_to_a_task_reaches_the_actor(client: Client) -> None:
    counter = Counter.remote_on(client, 1)
    assert client.submit(add_through, counter, 10).result() == 11
    assert vaccelray.get(counter.add.remote(0)) == 11
    # A handle is its id when pickled: it carries no connection.
    copy = pickle.loads(pickle.dumps(counter))
    assert copy.actor_id == counter.actor_id
    vaccelray.kill(counter)
    with pytest.raises(vaccelray.ActorDiedError):
        client.submit(add_through, counter, 1).result()


def test_vaccelray_local_in_an_actor_uses_its_own_session(client: Client) -> None:
    one, two = Counter.remote_on(client), Counter.remote_on(client)
    first, tag = vaccelray.get(one.session.remote())
    assert tag == NOOP_TAG
    assert vaccelray.get(one.session.remote())[0] == first
    assert vaccelray.get(two.session.remote())[0] not in (0, first)
    vaccelray.kill(one)
    vaccelray.kill(two)


def test_max_restarts_must_be_a_count() -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        Counter.options(max_restarts=-1)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A real worker, sandboxed (the default), with room for one actor per connection."""
    sock = tmp_path_factory.mktemp("capped") / "w.sock"
    proc, _ = start_daemon(
        worker_argv(
            "-a", f"unix://{sock}", "--backend", "noop", "--no-announce", "--pool-size", "1",
            "--max-actors", "2", "--max-actors-per-connection", "1",
        )
    )  # fmt: skip
    yield proc
    proc.stop()


def test_actor_bounds_refuse_at_once_and_actors_die_with_their_connection(
    capped: Proc,
) -> None:
    with Client(capped.address) as first, Client(capped.address) as second:
        one = Counter.remote_on(first, 1)
        assert vaccelray.get(one.add.remote(1)) == 2  # sandboxed like tasks
        extra = Counter.remote_on(first)
        with pytest.raises(vaccelray.TaskError, match="--max-actors-per-connection") as info:
            extra.ready().result()
        assert "RESOURCE_EXHAUSTED" in str(info.value)
        assert "\n" not in str(info.value)  # one line
        two = Counter.remote_on(second)
        assert vaccelray.get(two.add.remote(5)) == 5
        with (
            Client(capped.address) as third,
            pytest.raises(vaccelray.TaskError, match="--max-actors\\)"),
        ):
            Counter.remote_on(third).ready().result()
    # The first client's actor died with its connection: a new one finds room.
    capped.wait_for("connection that created it closed")
    with Client(capped.address) as fourth:
        again = Counter.remote_on(fourth, 7)
        assert vaccelray.get(again.add.remote(0)) == 7


# -- through the scheduler -------------------------------------------------------------


@vaccelray.offload
class Where:
    def __init__(self) -> None:
        self.calls = 0

    def worker(self) -> int:
        self.calls += 1
        return os.getppid()

    def count(self) -> int:
        return self.calls


@pytest.mark.anyio
async def test_actors_through_the_scheduler_spread_and_keep_their_worker(
    workers: list[tuple[Proc, str]],  # noqa: F811
) -> None:
    pids = {p.pid for p, _ in workers}
    async with cluster(workers) as (sched, client):
        one, two = Where.remote_on(client), Where.remote_on(client)
        firsts = {await one.worker.remote(), await two.worker.remote()}
        assert firsts == pids  # one on each worker
        refs = [one.worker.remote() for _ in range(10)]
        assert len({await r for r in refs}) == 1
        assert await one.count.remote() == 11
        assert await anyio.to_thread.run_sync(vaccelray.kill, one) is True
        with pytest.raises(vaccelray.ActorDiedError, match="killed"):
            await one.count.remote()
        assert await anyio.to_thread.run_sync(vaccelray.kill, one) is False  # dead already
        assert len(sched.actors.actors) == 1
    # The client went away: its actor is killed on its worker, and forgotten.
    assert sched.actors.actors == {}
    await logged([p for p, _ in workers], f"Actor Where {two.actor_id} was killed", [0, 0])


@pytest.mark.anyio
async def test_an_actor_whose_worker_dies_is_created_again_elsewhere(
    doomed_workers: list[tuple[Proc, str]],  # noqa: F811
) -> None:
    procs = {p.pid: p for p, _ in doomed_workers}
    addresses = {p.pid: a for p, a in doomed_workers}
    async with cluster(doomed_workers) as (sched, client):
        lasting = Where.options(max_restarts=1).remote_on(client)
        mortal = Where.remote_on(client)
        first = await lasting.worker.remote()
        second = await mortal.worker.remote()
        assert {first, second} == set(procs)  # one on each worker
        procs[first].kill()
        await marked_down(sched, addresses[first])
        # A call made after the loss (it cannot have run on the lost instance) goes to the
        # instance created again on the other worker, constructor re-run.
        assert await lasting.worker.remote() == second
        assert await lasting.count.remote() == 1
        assert await mortal.count.remote() == 1  # untouched
        procs[second].kill()
        for actor in (mortal, lasting):  # no restart left for either
            with pytest.raises(vaccelray.ActorDiedError, match="lost its worker"):
                await actor.worker.remote()
            with pytest.raises(vaccelray.ActorDiedError, match="lost its worker"):
                await actor.count.remote()


async def marked_down(sched: Scheduler, address: str) -> None:
    """Wait until the scheduler has seen the worker at *address* go (its health checks)."""

    def down() -> bool:
        return not any(w.routable for w in sched.pool.registry if w.address == address)

    await eventually(down, f"the scheduler marks {address} down")


def test_the_cli_defaults_are_the_daemons() -> None:
    from vaccelray import cli
    from vaccelray.scheduler import actors as scheduler_actors
    from vaccelray.worker import actors as worker_actors

    assert cli.DEFAULT_MAX_ACTORS == worker_actors.DEFAULT_MAX_ACTORS
    assert cli.DEFAULT_MAX_ACTORS_PER_CONNECTION == worker_actors.DEFAULT_MAX_ACTORS_PER_CONNECTION
    assert (
        cli.DEFAULT_SCHEDULER_ACTORS_PER_CONNECTION
        == scheduler_actors.DEFAULT_MAX_ACTORS_PER_CONNECTION
    )


# -- restarts: one loss, one restart, whoever notices it -----------------------------------


@vaccelray.offload
class Logged:
    """Each construction appends its worker's pid to *log*: the test counts them."""

    def __init__(self, log: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getppid()}\n")
        self.calls = 0

    def worker(self) -> int:
        self.calls += 1
        return os.getppid()

    def count(self) -> int:
        return self.calls

    def wait_for(self, path: str) -> str:
        Path(path + ".started").touch()
        while not os.path.exists(path):
            time.sleep(0.01)
        return "seen"

    def crash(self) -> None:
        os._exit(3)

    def pid(self) -> int:
        return os.getpid()


def constructions(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.mark.anyio
async def test_a_lost_worker_makes_one_restart_and_queued_calls_reach_it(
    doomed_workers: list[tuple[Proc, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    procs = {p.pid: p for p, _ in doomed_workers}
    log, release = tmp_path / "log", tmp_path / "release"
    async with cluster(doomed_workers) as (sched, client):
        actor = Logged.options(max_restarts=3).remote_on(client, str(log))
        first = await actor.worker.remote()
        running = actor.wait_for.remote(str(release))
        await eventually(lambda: Path(f"{release}.started").exists(), "the call runs")
        queued = [actor.worker.remote() for _ in range(4)]
        procs[first].kill()
        with pytest.raises(vaccelray.ActorDiedError, match="lost its worker"):
            await running
        (second,) = set(procs) - {first}
        # The calls made after the running one run on the new instance, in order.
        assert [await r for r in queued] == [second] * 4
        assert await actor.count.remote() == 4
        assert constructions(log) == [first, second]  # one loss: one restart
        assert sched.actors.actors[actor.actor_id].restarts_left == 2


@pytest.mark.anyio
async def test_a_process_crash_through_the_scheduler_restarts_once_and_counts(
    doomed_workers: list[tuple[Proc, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    # One worker: were it to restart the actor itself beside the scheduler, the scheduler's
    # restart would find it there (and two workers would each hold an instance).
    (proc, _), *_ = doomed_workers
    log = tmp_path / "log"
    async with cluster(doomed_workers[:1]) as (_, client):
        actor = Logged.options(max_restarts=1).remote_on(client, str(log))
        await actor.worker.remote()
        with pytest.raises(vaccelray.ActorDiedError, match="was lost while running crash"):
            await actor.crash.remote()
        # Created again (constructor re-run), and later calls reach it.
        assert await actor.count.remote() == 0
        assert await actor.worker.remote() == proc.pid
        assert constructions(log) == [proc.pid, proc.pid]
        # That was its one restart: losing its worker now ends it.
        proc.kill()
        with pytest.raises(vaccelray.ActorDiedError, match="lost its worker"):
            await actor.worker.remote()
        with pytest.raises(vaccelray.ActorDiedError):
            await actor.count.remote()
        assert len(constructions(log)) == 2


@pytest.mark.anyio
async def test_an_idle_actor_whose_process_dies_is_restarted_for_the_next_call(
    workers: list[tuple[Proc, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    procs = {p.pid: p for p, _ in workers}
    log = tmp_path / "log"
    async with cluster(workers) as (_, client):
        actor = Logged.options(max_restarts=1).remote_on(client, str(log))
        home = procs[await actor.worker.remote()]
        os.kill(await actor.pid.remote(), signal.SIGKILL)
        died = f"Actor Logged {actor.actor_id} died: its process was killed"
        await anyio.to_thread.run_sync(home.wait_for, died)
        # The call made after the loss did not run on the lost instance: it runs on the new.
        assert await actor.count.remote() == 0
        assert len(constructions(log)) == 2
        os.kill(await actor.pid.remote(), signal.SIGKILL)
        with pytest.raises(vaccelray.ActorDiedError, match="killed by signal SIGKILL"):
            await actor.count.remote()
        assert len(constructions(log)) == 2


# -- cancel ------------------------------------------------------------------------------


def started(release: Path) -> None:
    until(lambda: Path(f"{release}.started").exists(), "the call runs")


def test_cancel_drops_a_waiting_call_and_says_a_running_one_runs_on(
    client: Client, tmp_path: Path
) -> None:
    counter = Counter.remote_on(client)
    release = tmp_path / "release"
    running = counter.wait_for.remote(str(release))
    started(release)
    dropped = counter.add.remote(5)
    after = counter.add.remote(1)
    assert dropped.cancel() is True
    with pytest.raises(vaccelray.TaskCancelledError):
        vaccelray.get(dropped)
    with pytest.raises(vaccelray.CallRunningError, match=r"is running: .* not interrupted"):
        running.cancel()
    release.touch()
    assert vaccelray.get(running) == "seen"  # it ran on
    assert vaccelray.get(after) == 1  # the dropped call never ran
    assert dropped.cancel() is False  # ended
    assert after.cancel() is False
    vaccelray.kill(counter)


def test_cancel_with_force_kills_the_actor_and_a_restart_takes_the_next_calls(
    client: Client, tmp_path: Path
) -> None:
    counter = Counter.options(max_restarts=1).remote_on(client, 10)
    before = vaccelray.get(counter.pid.remote())
    running = counter.wait_for.remote(str(tmp_path / "never"))
    started(tmp_path / "never")
    waiting = counter.add.remote(1)
    assert running.cancel(force=True) is True
    with pytest.raises(vaccelray.TaskCancelledError):
        vaccelray.get(running)
    assert vaccelray.get(waiting) == 11  # on the instance created again
    assert vaccelray.get(counter.pid.remote()) != before
    # No restart left: the next forced cancel ends the actor, and its waiting calls.
    running = counter.wait_for.remote(str(tmp_path / "never again"))
    started(tmp_path / "never again")
    waiting = counter.add.remote(1)
    assert running.cancel(force=True) is True
    with pytest.raises(vaccelray.ActorDiedError):
        vaccelray.get(waiting)
    with pytest.raises(vaccelray.ActorDiedError):
        vaccelray.get(counter.add.remote(1))


@pytest.mark.anyio
async def test_cancel_through_the_scheduler_drops_calls_waiting_there_and_forces(
    workers: list[tuple[Proc, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    log, release = tmp_path / "log", tmp_path / "release"
    async with cluster(workers) as (_, client):
        actor = Logged.options(max_restarts=1).remote_on(client, str(log))
        home = await actor.worker.remote()
        running = actor.wait_for.remote(str(release))
        await eventually(lambda: Path(f"{release}.started").exists(), "the call runs")
        dropped = actor.worker.remote()  # waits its turn at the scheduler
        after = actor.worker.remote()
        assert await anyio.to_thread.run_sync(dropped.cancel) is True
        with pytest.raises(vaccelray.CallRunningError):
            await anyio.to_thread.run_sync(running.cancel)
        release.touch()
        assert await running == "seen"
        with pytest.raises(vaccelray.TaskCancelledError):
            await dropped
        assert await after == home
        assert await actor.count.remote() == 2  # the dropped call never ran
        # Forced: its process is killed, and the scheduler creates it again (one restart).
        forced = actor.wait_for.remote(str(tmp_path / "never"))
        await eventually(lambda: (tmp_path / "never.started").exists(), "the call runs")
        queued = actor.count.remote()
        assert await anyio.to_thread.run_sync(lambda: forced.cancel(force=True)) is True
        with pytest.raises(vaccelray.TaskCancelledError):
            await forced
        assert await queued == 0
        assert len(constructions(log)) == 2


# -- bounds through the scheduler ----------------------------------------------------------


@pytest.mark.anyio
async def test_the_scheduler_caps_actors_per_client_connection_at_once(
    workers: list[tuple[Proc, str]],  # noqa: F811
) -> None:
    cfg = replace(config(*(a for _, a in workers)), max_actors_per_connection=1)
    async with serving_scheduler(cfg) as sched:
        address = sched.addresses[0]
        first = await anyio.to_thread.run_sync(Client, address)
        second = await anyio.to_thread.run_sync(Client, address)
        try:
            one = Where.remote_on(first)
            await one.ready()
            extra = Where.remote_on(first)
            with pytest.raises(vaccelray.TaskError) as info:
                await extra.ready()
            # The scheduler's bound, not a worker's: refused before any placement.
            message = str(info.value)
            assert "RESOURCE_EXHAUSTED" in message
            assert "(scheduler option --max-actors-per-connection)" in message
            assert "\n" not in message
            assert extra.actor_id not in sched.actors.actors
            # Counted per connection: another client has its own room.
            assert await Where.remote_on(second).worker.remote() in {p.pid for p, _ in workers}
            # A killed actor frees its room.
            assert await anyio.to_thread.run_sync(vaccelray.kill, one)
            again = Where.remote_on(first)
            assert await again.count.remote() == 0
        finally:
            for c in (first, second):
                await anyio.to_thread.run_sync(c.shutdown)


# -- the blocking path ---------------------------------------------------------------------


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def test_a_call_after_the_worker_closed_an_idle_lane_goes_another_way(tmp_path: Path) -> None:
    proc, _ = start_daemon(
        worker_argv(
            "-a", f"unix://{tmp_path}/w.sock", "--backend", "noop", "--no-announce",
            "--pool-size", "1", "--idle-timeout", "0.5",
        )
    )  # fmt: skip
    try:
        with Client(proc.address) as client:
            counter = Counter.remote_on(client, 1)
            assert vaccelray.get(counter.add.remote(1)) == 2
            ref = counter.add.remote(1)  # the calling thread's lane (its first call went by)
            assert vaccelray.get(ref) == 3
            lane = ref._lane
            assert lane is not None
            # The lane says nothing: the worker closes it (the connection holding the actor
            # stays open). The next call must not be lost on it.
            until(lambda: closed_by_peer(lane.sock), "the worker closes the idle lane")
            assert vaccelray.get(counter.add.remote(1)) == 4
            assert vaccelray.get(counter.add.remote(1)) == 5
    finally:
        proc.stop()
