"""The warm process pool: real processes fed over socketpairs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import msgspec
import pytest

from vaccelray.worker import pool as pool_module
from vaccelray.worker.pool import (
    FRAME_MARGIN,
    Pool,
    PoolProcessLost,
    TaskTimedOut,
    _Child,
    exit_status,
)
from vaccelray.worker.poolchild import (
    OK,
    RAISED,
    SERIALIZATION,
    TOO_LARGE,
    Done,
    encode_frame,
)

pytestmark = pytest.mark.anyio

#: Liveness only: how long a condition that must come true may take on a loaded machine.
PATIENCE = 30.0


def _fn(f: object) -> tuple[str, bytes]:
    data = cloudpickle.dumps(f)
    return hashlib.sha256(data).hexdigest(), data


def _args(*args: object) -> bytes:
    return cloudpickle.dumps((args, {}))


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* (a process exit or a file has no event to wait on)."""
    with anyio.move_on_after(PATIENCE):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"not within {PATIENCE} s: {what}")


async def value(pool: Pool, f: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    digest, fn = _fn(f)
    done = await pool.run(digest, getattr(f, "__name__", "f"), fn, _args(*args), **kw)
    assert done.status == OK, done
    return cloudpickle.loads(done.result)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the pool sleeps for (each cut to at most 10 ms)."""
    asked: list[float] = []
    real = asyncio.sleep

    class Asyncio:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(delay: float) -> None:
            asked.append(delay)
            await real(min(delay, 0.01))

    monkeypatch.setattr(pool_module, "asyncio", Asyncio())
    return asked


def backoffs(asked: list[float]) -> list[float]:
    """The replacement back-off delays among the pool's sleeps (its polls are 5 ms)."""
    return [d for d in asked if d != 0.005]


async def test_runs_on_every_process_and_reports_errors() -> None:
    digest, fn = _fn(lambda x: (os.getpid(), x * 2))
    async with Pool(2) as pool:
        assert len(pool.pids) == 2
        results = []
        async with anyio.create_task_group() as tg:

            async def one(i: int) -> None:
                done = await pool.run(digest, "double", fn, _args(i))
                assert done.status == OK
                results.append(cloudpickle.loads(done.result))

            for i in range(20):
                tg.start_soon(one, i)
        assert sorted(r[1] for r in results) == [i * 2 for i in range(20)]
        assert {r[0] for r in results} <= set(pool.pids)
        assert os.getpid() not in {r[0] for r in results}

        bad_digest, bad = _fn(lambda: {}["missing"])
        done = await pool.run(bad_digest, "bad", bad, b"")
        assert done.status == RAISED
        assert done.error is not None
        assert (done.error.module, done.error.qualname) == ("builtins", "KeyError")
        assert "KeyError: 'missing'" in done.error.traceback


async def test_one_after_another_tasks_keep_to_the_warm_process() -> None:
    async with Pool(2) as pool:
        ran = [await value(pool, os.getpid) for _ in range(4)]
        assert len(set(ran)) == 1
        assert ran[0] in pool.pids


async def test_env_session_and_sys_path_reach_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "only_here.py").write_text("WHERE = 'tmp'\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def look() -> tuple[str | None, int, str]:
        import only_here  # type: ignore[import-not-found]

        from vaccelray import task_context

        return os.environ.get("POOL_TEST_VAR"), task_context.session_id, only_here.WHERE

    async with Pool(1, env={"POOL_TEST_VAR": "set"}) as pool:
        assert await value(pool, look) == ("set", 0, "tmp")
        assert await value(pool, look, session_id=7) == ("set", 7, "tmp")


async def test_large_results_and_arguments_come_back_whole() -> None:
    async with Pool(1) as pool:
        for size in (0, 1, 200 << 10, 256 << 10, 3 << 20):
            data = os.urandom(size)
            assert await value(pool, lambda b: b[::-1], data) == data[::-1]


async def test_a_function_that_failed_to_load_is_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "comes_and_goes.py"
    module.write_text("def f():\n    return 'loaded'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import comes_and_goes  # type: ignore[import-not-found]

    digest, fn = _fn(comes_and_goes.f)  # pickled by reference: the module must be importable
    module.unlink()
    async with Pool(1) as pool:
        done = await pool.run(digest, "f", fn, b"")
        assert done.status == SERIALIZATION
        assert done.message == "cannot load function f on the worker"
        module.write_text("def f():\n    return 'loaded'\n")
        done = await pool.run(digest, "f", fn, b"")
        assert (done.status, cloudpickle.loads(done.result)) == (OK, "loaded")
    sys.modules.pop("comes_and_goes", None)


async def test_a_cancelled_task_has_its_process_killed_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    marker = tmp_path / "running"

    def hold() -> None:
        marker.touch()
        time.sleep(600)

    digest, fn = _fn(hold)
    async with Pool(1) as pool:
        (before,) = pool._children
        with anyio.CancelScope() as scope:

            async def cancel_once_running() -> None:
                await until(marker.exists, "the task runs")
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_running)
                await pool.run(digest, "hold", fn, b"")
        assert scope.cancelled_caught
        await until(lambda: before.process.poll() is not None, "the process is killed")
        assert before.process.returncode == -signal.SIGKILL
        assert await value(pool, lambda: "ok") == "ok"
        assert pool.pids != [before.pid]
        assert pool.lost == 1
    # Killed on purpose: not reported as a crash.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_cancelled_queued_task_leaves_the_queue(tmp_path: Path) -> None:
    go = tmp_path / "go"

    def wait_for_go() -> str:
        while not go.exists():
            time.sleep(0.01)
        return "went"

    async with Pool(1) as pool:
        async with anyio.create_task_group() as tg:
            first: list[Any] = []

            async def run_first() -> None:
                first.append(await value(pool, wait_for_go))

            tg.start_soon(run_first)
            await until(lambda: pool.busy == 1, "the first task is sent")
            with anyio.CancelScope() as scope:

                async def cancel_once_queued() -> None:
                    await until(lambda: pool.queued == 1, "the second task is queued")
                    scope.cancel()

                tg.start_soon(cancel_once_queued)
                await value(pool, os.getpid)
            assert pool.queued == 0
            go.touch()
        assert first == ["went"]
        assert pool.lost == 0


async def test_a_dying_process_fails_its_task_only(
    caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    digest, fn = _fn(lambda: os.kill(os.getpid(), 9))
    async with Pool(1) as pool:
        (pid,) = pool.pids
        with pytest.raises(PoolProcessLost) as info:
            await pool.run(digest, "suicide", fn, b"")
        assert str(info.value) == "the pool process running suicide was killed by signal SIGKILL"
        assert f"Pool process {pid} was killed by signal SIGKILL while running suicide" in [
            r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
        ]
        assert await value(pool, lambda: "ok") == "ok"
        assert pool.lost == 1
    assert backoffs(sleeps) == []  # it ran a task: no start-up failure to back off from


async def test_an_exit_status_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    digest, fn = _fn(lambda: os._exit(7))
    async with Pool(1) as pool:
        with pytest.raises(
            PoolProcessLost, match=r"^the pool process running bye exited with status 7$"
        ):
            await pool.run(digest, "bye", fn, b"")


async def test_an_idle_process_that_dies_is_replaced(
    caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    async with Pool(1) as pool:
        pid = await value(pool, os.getpid)
        os.kill(pid, signal.SIGKILL)
        await until(lambda: pool.pids != [pid] and len(pool.pids) == 1, "a replacement")
        # Two at once: one runs on the replacement, one waits for it (not for the dead one).
        ran: list[int] = []

        async def one() -> None:
            ran.append(await value(pool, os.getpid))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        assert ran == pool.pids * 2
        assert pid not in ran
        assert pool.lost == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"Pool process {pid} was killed by signal SIGKILL"]
    assert backoffs(sleeps) == []


async def test_a_process_that_closes_its_socket_but_lives_is_killed(
    tmp_path: Path, sleeps: list[float]
) -> None:
    def hang_up() -> None:
        os.close(int(sys.argv[1]))  # the pool process's end of its socket
        time.sleep(600)

    digest, fn = _fn(hang_up)
    async with Pool(1) as pool:
        (child,) = pool._children
        with pytest.raises(PoolProcessLost, match="running hang_up"):
            await pool.run(digest, "hang_up", fn, b"")
        await until(lambda: child.process.poll() is not None, "the process is killed")
        assert child.process.returncode == -signal.SIGKILL
        assert await value(pool, lambda: "ok") == "ok"


async def test_processes_that_cannot_start_are_replaced_ever_more_slowly(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    false = shutil.which("false")
    assert false is not None
    monkeypatch.setattr(sys, "executable", false)  # an interpreter that exits at once
    async with Pool(1) as pool:
        await until(lambda: len(backoffs(sleeps)) >= 9, "nine replacements")
        assert pool.lost >= 9
    assert backoffs(sleeps)[:9] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


async def test_a_process_that_answers_another_task_is_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def forge() -> None:
        frame = encode_frame(msgspec.msgpack.Encoder(), Done(10**6, OK))
        os.write(int(sys.argv[1]), frame)
        time.sleep(600)

    digest, fn = _fn(forge)
    async with Pool(1) as pool:
        (pid,) = pool.pids
        with pytest.raises(PoolProcessLost, match="running forge was killed by signal SIGKILL"):
            await pool.run(digest, "forge", fn, b"")
        logged = [r.getMessage() for r in caplog.records]
        assert f"Pool process {pid} answered a task it was not given; killing it" in logged
        assert await value(pool, lambda: "ok") == "ok"


async def test_close_lets_idle_processes_exit_and_fails_queued_tasks() -> None:
    pool = Pool(2)
    await pool.start()
    processes = [c.process for c in pool._children]
    # A grace long enough for a process still starting on a loaded machine to see its end.
    await pool.aclose(grace=PATIENCE)
    assert [p.returncode for p in processes] == [0, 0]  # they exited: nothing was killed
    with pytest.raises(PoolProcessLost, match=r"^the worker is shutting down$"):
        await pool.run("x", "x", b"", b"")
    await pool.aclose()  # twice is fine


async def test_close_kills_a_busy_process_after_its_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "running"

    def hold() -> None:
        marker.touch()
        time.sleep(600)

    digest, fn = _fn(hold)
    pool = Pool(1)
    await pool.start()
    (child,) = pool._children
    outcomes: list[BaseException] = []

    async def run(name: str) -> None:
        try:
            await pool.run(digest, name, fn, b"")
        except PoolProcessLost as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "running")
        await until(marker.exists, "the task runs")
        tg.start_soon(run, "queued")
        await until(lambda: pool.queued == 1, "the second task is queued")
        await pool.aclose(grace=0.1)
    assert child.process.returncode == -signal.SIGKILL
    # Neither waits for ever: the running one cannot answer once its socket is closed.
    assert [str(e) for e in outcomes] == ["the worker is shutting down"] * 2
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_pool_needs_a_process() -> None:
    with pytest.raises(ValueError, match=r"^a pool needs at least one process, not 0$"):
        Pool(0)


def test_exit_status_in_words() -> None:
    assert exit_status(None) == "stopped answering"
    assert exit_status(0) == "exited with status 0"
    assert exit_status(3) == "exited with status 3"
    assert exit_status(-signal.SIGSEGV) == "was killed by signal SIGSEGV"
    assert exit_status(-1) == "was killed by signal SIGHUP"
    assert exit_status(-200) == "was killed by signal 200"


class _Frames:
    """Stands in for the pool: what a :class:`_Child` reads is recorded here."""

    _decoder = msgspec.msgpack.Decoder(Done)
    _max_frame = 11 << 20

    def __init__(self) -> None:
        self.got: list[Done] = []

    def _finished(self, child: object, done: Done) -> None:
        self.got.append(done)


class _Process:
    pid = 1


@pytest.mark.parametrize("chunk", [1, 3, 4096, 65536, 256 << 10, 10 << 20])
def test_frames_are_read_whatever_the_chunks(chunk: int) -> None:
    sizes = [0, 5, 100 << 10, (256 << 10) - 20, 256 << 10, 1 << 20, 7, (200 << 10)]
    if chunk < 4096:
        sizes = [0, 5, 300, 2, 1000]
    expected = [Done(i, OK, bytes([i]) * size) for i, size in enumerate(sizes)]
    encoder = msgspec.msgpack.Encoder()
    stream = b"".join(encode_frame(encoder, d) for d in expected)
    frames = _Frames()
    child = _Child(frames, _Process(), None)  # type: ignore[arg-type]
    fed = 0
    while fed < len(stream):
        buffer = child.get_buffer(-1)
        n = min(len(buffer), chunk, len(stream) - fed)
        assert n > 0
        buffer[:n] = stream[fed : fed + n]
        child.buffer_updated(n)
        fed += n
    assert frames.got == expected


async def test_a_cancelled_close_still_stops_every_process() -> None:
    pool = Pool(2)
    await pool.start()
    processes = [c.process for c in pool._children]
    with anyio.CancelScope() as scope:
        scope.cancel()
        await pool.aclose()
    assert [p.returncode for p in processes] == [0, 0]


async def test_a_cancelled_start_leaves_no_process_behind() -> None:
    pool = Pool(1)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await pool.start()
    assert scope.cancelled_caught
    assert pool.pids == []  # and no socket or process left open (tests/leaks.py)
    await pool.aclose()


async def test_each_process_start_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vaccelray.pool")
    async with Pool(2) as pool:
        logged = sorted(r.getMessage() for r in caplog.records)
        assert logged == sorted(f"Pool process {pid} started" for pid in pool.pids)


async def test_pool_processes_do_not_share_the_daemons_stdin() -> None:
    """A task reading input gets end-of-file, not the terminal the daemon was started from."""

    def read_stdin() -> str:
        import sys

        return sys.stdin.read()

    # The daemon's stdin is a pipe here, so inheriting it would show.
    saved = os.dup(0)
    read_end, write_end = os.pipe()
    try:
        os.dup2(read_end, 0)
        async with Pool(1) as pool:
            os.dup2(saved, 0)
            (pid,) = pool.pids
            assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
            assert await value(pool, read_stdin) == ""
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)


# -- what a pool process may send, and keep -----------------------------------


def declare(size: int) -> None:
    """Write a frame header declaring *size* bytes, then nothing."""
    os.write(int(sys.argv[1]), struct.pack(">I", size))
    time.sleep(600)


def forge_exactly(size: int) -> None:
    """Answer another task with a frame of exactly *size* bytes of body."""
    encoder = msgspec.msgpack.Encoder()
    overhead = len(encoder.encode(Done(10**6, OK, b"x" * size))) - size
    frame = encode_frame(encoder, Done(10**6, OK, b"x" * (size - overhead)))
    assert len(frame) == 4 + size
    os.write(int(sys.argv[1]), frame)
    time.sleep(600)


async def test_a_frame_larger_than_allowed_is_never_read(caplog: pytest.LogCaptureFixture) -> None:
    limit = 1024 + FRAME_MARGIN
    digest, fn = _fn(declare)
    async with Pool(1, max_message_size=1024) as pool:
        (pid,) = pool.pids
        with anyio.fail_after(PATIENCE), pytest.raises(PoolProcessLost) as info:
            await pool.run(digest, "declare", fn, _args(limit + 1))
        what = f"declared a {limit + 1}-byte answer (more than {limit} bytes) and was killed"
        assert str(info.value) == f"the pool process running declare {what}"
        assert f"Pool process {pid} {what}" in [r.getMessage() for r in caplog.records]
        assert await value(pool, lambda: "ok") == "ok"
        assert pool.lost == 1


async def test_a_frame_of_the_largest_allowed_size_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    digest, fn = _fn(forge_exactly)
    async with Pool(1, max_message_size=1024) as pool:
        (pid,) = pool.pids
        with anyio.fail_after(PATIENCE), pytest.raises(PoolProcessLost) as info:
            await pool.run(digest, "forge_exactly", fn, _args(1024 + FRAME_MARGIN))
        # It was read whole (and found to answer another task), not refused unread.
        assert (
            str(info.value) == "the pool process running forge_exactly was killed by signal SIGKILL"
        )
        logged = [r.getMessage() for r in caplog.records]
        assert f"Pool process {pid} answered a task it was not given; killing it" in logged


def held_functions() -> list[str]:
    """The digests this pool process keeps unpickled."""
    import gc

    from vaccelray.worker.poolchild import _Runner

    (runner,) = [o for o in gc.get_objects() if isinstance(o, _Runner)]
    return sorted(runner.functions)


async def test_a_process_keeps_the_functions_used_last(tmp_path: Path) -> None:
    one, two, three = (_fn(f) for f in (lambda: 1, lambda: 2, lambda: 3))
    held = _fn(held_functions)
    async with Pool(1, max_functions=3) as pool:
        for (digest, fn), expected in ((one, 1), (two, 2), (one, 1), (three, 3)):
            done = await pool.run(digest, "f", fn, b"")
            assert cloudpickle.loads(done.result) == expected
        # one, three and held_functions are kept: two was used least recently.
        done = await pool.run(held[0], "held_functions", held[1], b"")
        assert cloudpickle.loads(done.result) == sorted([one[0], three[0], held[0]])
        # two is sent again when needed again.
        done = await pool.run(two[0], "f", two[1], b"")
        assert (done.status, cloudpickle.loads(done.result)) == (OK, 2)
    with pytest.raises(ValueError, match=r"^a pool process keeps at least one function, not 0$"):
        Pool(1, max_functions=0)
    async with Pool(1, max_functions=1) as pool:
        for (digest, fn), expected in ((one, 1), (two, 2), (one, 1)):
            done = await pool.run(digest, "f", fn, b"")
            assert (done.status, cloudpickle.loads(done.result)) == (OK, expected)
        done = await pool.run(held[0], "held_functions", held[1], b"")
        assert cloudpickle.loads(done.result) == [held[0]]


# -- sharing the pool -------------------------------------------------------------


def wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


def step(name: str, directory: str) -> None:
    """Say it started (a file named *name*), then wait for ``go-NAME``."""
    Path(directory, name).touch()
    wait_for(os.path.join(directory, f"go-{name}"))


class Steps:
    """Tasks of several owners that each run until the test lets them end."""

    def __init__(self, pool: Pool, directory: Path) -> None:
        self.pool = pool
        self.dir = directory
        self.digest, self.fn = _fn(step)
        self.ended: list[str] = []

    def submit(self, owner: str, name: str) -> None:
        self.pool.submit(
            self.digest,
            name,
            self.fn,
            _args(name, str(self.dir)),
            owner=owner,
            on_done=lambda _: self.ended.append(name),
        )

    def started(self) -> set[str]:
        return {p.name for p in self.dir.iterdir() if not p.name.startswith("go-")}

    async def end(self, name: str) -> str:
        """Let *name* end; the task that starts in its place."""
        before = self.started()
        (self.dir / f"go-{name}").touch()
        await until(lambda: name in self.ended, f"{name} ends")
        await until(lambda: len(self.started()) > len(before), "a next task starts")
        (new,) = self.started() - before
        return new


async def test_owners_waiting_take_turns(tmp_path: Path) -> None:
    async with Pool(1) as pool:
        steps = Steps(pool, tmp_path)
        for owner, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1")]:
            steps.submit(owner, name)
        await until(lambda: steps.started() == {"a1"}, "a1 starts")
        steps.submit("c", "c1")
        steps.submit("b", "b2")
        assert (pool.busy, pool.queued) == (1, 5)
        assert [pool.queued_by(o) for o in "abcd"] == [2, 2, 1, 0]
        order = ["a1"]
        for _ in range(5):
            order.append(await steps.end(order[-1]))
        (tmp_path / f"go-{order[-1]}").touch()
        await until(lambda: len(steps.ended) == 6, "every task ends")
        assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]
        assert pool.queued == pool.busy == 0
        assert pool._owners == {}  # nothing is kept for owners that have nothing left


async def test_the_owner_running_fewer_tasks_goes_first(tmp_path: Path) -> None:
    async with Pool(2) as pool:
        steps = Steps(pool, tmp_path)
        steps.submit("a", "a1")
        steps.submit("b", "b1")
        await until(lambda: steps.started() == {"a1", "b1"}, "a1 and b1 start")
        steps.submit("a", "a2")  # a was served longer ago than b...
        steps.submit("b", "b2")
        # ...but once b1 ends, b runs nothing while a runs a1: b goes first.
        assert await steps.end("b1") == "b2"
        assert await steps.end("a1") == "a2"
        for name in ("a2", "b2"):
            (tmp_path / f"go-{name}").touch()
        await until(lambda: len(steps.ended) == 4, "every task ends")


async def test_a_task_past_its_timeout_has_its_process_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    digest, fn = _fn(wait_for)
    async with Pool(1) as pool:
        (child,) = pool._children
        with anyio.fail_after(PATIENCE), pytest.raises(TaskTimedOut) as info:
            await pool.run(digest, "wait_for", fn, _args("/nonexistent"), timeout=0.2)
        assert str(info.value) == "wait_for ran past its timeout of 0.2 s"
        await until(lambda: child.process.poll() is not None, "the process is killed")
        assert child.process.returncode == -signal.SIGKILL
        assert await value(pool, os.getpid) != child.pid
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert logged == [
            f"Task wait_for ran past its timeout of 0.2 s; killing pool process {child.pid}"
        ]


async def test_each_running_task_is_stopped_at_its_own_timeout() -> None:
    """One timer serves every running task: a shorter timeout that starts later still
    ends first, and the longer one after it."""
    digest, fn = _fn(wait_for)
    ended: list[str] = []

    async def run(name: str, timeout: float) -> None:
        with pytest.raises(TaskTimedOut) as info:
            await pool.run(digest, name, fn, _args("/nonexistent"), timeout=timeout)
        ended.append(str(info.value))

    async with Pool(2) as pool, anyio.create_task_group() as tg:
        processes = [c.process for c in pool._children]
        with anyio.fail_after(PATIENCE):
            tg.start_soon(run, "long", 3.0)
            await until(lambda: pool.busy == 1, "the long task runs")
            await run("short", 0.2)
            assert ended == ["short ran past its timeout of 0.2 s"]  # the long one runs on
            await until(lambda: len(ended) == 2, "the long task ends")
        await until(lambda: all(p.poll() is not None for p in processes), "both are killed")
    assert ended[1] == "long ran past its timeout of 3 s"


def exactly(n: int) -> bytes:
    """Bytes that pickle to exactly *n* bytes."""
    import pickle

    data = b"x" * n
    return b"x" * (n - (len(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)) - n))


def raises_big(n: int) -> None:
    raise ValueError("x" * n)


async def test_a_result_larger_than_a_message_is_refused_by_its_process() -> None:
    async with Pool(1, max_message_size=1024) as pool:
        (pid,) = pool.pids
        assert len(await value(pool, exactly, 1024)) < 1024  # the largest that fits
        digest, fn = _fn(exactly)
        done = await pool.run(digest, "exactly", fn, _args(1025))
        assert done == Done(
            done.seq,
            TOO_LARGE,
            message="the result of exactly is 1025 bytes, more than the 1024 a reply may "
            "carry (worker option --max-message-size)",
        )
        # A failure's details too large to send are left out; the process lives on.
        digest, fn = _fn(raises_big)
        done = await pool.run(digest, "raises_big", fn, _args(FRAME_MARGIN))
        assert (done.status, done.result, done.error) == (RAISED, b"", None)
        assert done.message.startswith("raises_big raised (its details, ")
        assert done.message.endswith(" bytes, are too large to send)")
        details = int(done.message.split()[4])
        assert details > 1024 + FRAME_MARGIN
        done = await pool.run(digest, "raises_big", fn, _args(100))
        assert done.status == RAISED
        assert done.error is not None
        assert done.error.message == "x" * 100
        assert pool.pids == [pid]


async def test_processes_import_the_workers_vaccelray_not_one_in_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "vaccelray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('another vaccelray')\n")
    (tmp_path / "beside.py").write_text("WHERE = 'cwd'\n")
    monkeypatch.chdir(tmp_path)

    def where() -> str:
        import beside  # type: ignore[import-not-found]

        return str(beside.WHERE)

    async with Pool(1) as pool:
        with anyio.fail_after(PATIENCE):
            # The cwd is still searched, after the worker's own path.
            assert await value(pool, where) == "cwd"
        assert pool.lost == 0


async def test_a_process_that_answered_resets_the_back_off(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    monkeypatch.setattr(pool_module, "_QUICK_DEATH", 1e9)  # every idle death is "soon"

    async def kill_the_idle_one(pool: Pool) -> None:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        await until(lambda: len(pool.pids) == 1 and pool.pids != [pid], "a replacement")

    async with Pool(1) as pool:
        await kill_the_idle_one(pool)  # never given a task: it failed to start
        await kill_the_idle_one(pool)  # twice: a longer back-off
        assert backoffs(sleeps) == [0.05, 0.1]
        assert await value(pool, lambda: "ok") == "ok"
        await kill_the_idle_one(pool)  # it ran a task: it had started, no back-off
        assert backoffs(sleeps) == [0.05, 0.1]
        await kill_the_idle_one(pool)  # a fresh failure starts the back-off again
        assert backoffs(sleeps) == [0.05, 0.1, 0.05]
