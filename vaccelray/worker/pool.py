"""The warm process pool that runs offloaded functions off the worker's event loop.

``size`` pool processes (:mod:`vaccelray.worker.poolchild`) are spawned when the
pool starts, in parallel, and each is fed one task at a time over its own
socketpair (4-byte length + MessagePack frames, read by an asyncio protocol
on the worker's loop: no thread, no per-task process). Spawned, not forked:
the worker may be multi-threaded (an embedded worker lives in its client's
background thread) and forking a threaded process is unsafe. A pool process
imports only msgspec and cloudpickle, so it starts in one interpreter
start-up and stays small.

The loop never waits on user code: a task that runs too long or is cancelled
has its process killed; a process that dies (segfault, ``os._exit``) fails
its one task with :class:`PoolProcessLost` naming the exit status; either
way a new process is spawned in its place. Tasks are queued while every
process is busy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Final

import anyio
import msgspec

from vaccelray.errors import VaccelrayError
from vaccelray.transport.endpoints import tune_socket
from vaccelray.worker.poolchild import Done, Run, encode_frame

__all__ = ["Pool", "PoolProcessLost"]

log = logging.getLogger("vaccelray.pool")

_HEADER: Final = struct.Struct(">I")
#: The reused receive buffer of a pool process's socket; larger frames get their own.
_READ_SIZE: Final = 256 << 10
_BOOT: Final = "import sys; from vaccelray.worker.poolchild import main; main(int(sys.argv[1]))"
#: A process that dies sooner than this after its start, having run nothing, counts
#: as failing to start: replacements then back off (0.05 s doubling, up to 5 s).
_QUICK_DEATH: Final = 1.0


class PoolProcessLost(VaccelrayError):
    """The pool process running a task died before answering."""


class _Job:
    __slots__ = (
        "aborted",
        "args",
        "child",
        "digest",
        "finished",
        "function",
        "name",
        "on_done",
        "seq",
        "session_id",
    )

    def __init__(
        self,
        seq: int,
        digest: str,
        name: str,
        function: bytes,
        args: bytes,
        session_id: int,
        on_done: Callable[[Done | PoolProcessLost], object],
    ) -> None:
        self.seq = seq
        self.digest = digest
        self.name = name
        self.function = function
        self.args = args
        self.session_id = session_id
        self.on_done = on_done
        self.child: _Child | None = None
        self.finished = False
        self.aborted = False

    def finish(self, outcome: Done | PoolProcessLost) -> None:
        if not self.finished:
            self.finished = True
            self.on_done(outcome)


class _Child(asyncio.BufferedProtocol):
    """One pool process and the parent end of its socket.

    Frames are read straight into a reused buffer; one larger than it (a big
    result) gets a buffer of its own size, filled by the socket with no
    further copy before it is decoded.
    """

    def __init__(self, pool: Pool, process: subprocess.Popen[bytes]) -> None:
        self.pool = pool
        self.process = process
        self.pid = process.pid
        self.started = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self.job: _Job | None = None
        self.known: set[str] = set()
        self.ran = 0
        self._buffer = bytearray(_READ_SIZE)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # unread bytes are _buffer[_start:_end]
        self._large: memoryview | None = None  # the body of a frame larger than _buffer
        self._large_filled = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return self._large[self._large_filled :]
        if self._end == len(self._buffer):  # only the head of a frame is here: move it down
            size = self._end - self._start
            self._buffer[:size] = self._view[self._start : self._end]
            self._start, self._end = 0, size
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        large = self._large
        if large is not None:
            self._large_filled += nbytes
            if self._large_filled == len(large):
                self._large = None
                self._received(large)
            return
        self._end += nbytes
        view, start, end = self._view, self._start, self._end
        while end - start >= 4:
            (size,) = _HEADER.unpack_from(view, start)
            if end - start - 4 >= size:
                self._received(view[start + 4 : start + 4 + size])
                start += 4 + size
            else:
                if 4 + size > len(view):
                    have = end - start - 4
                    large = memoryview(bytearray(size))
                    large[:have] = view[start + 4 : end]
                    self._large, self._large_filled = large, have
                    start = end
                break
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _received(self, body: memoryview) -> None:
        self.pool._finished(self, self.pool._decoder.decode(body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._lost(self)

    def send(self, job: _Job) -> None:
        assert self.transport is not None
        first = job.digest not in self.known
        if first:
            self.known.add(job.digest)
        run = Run(
            job.seq, job.digest, job.name, job.function if first else None, job.args, job.session_id
        )
        self.transport.write(encode_frame(self.pool._encoder, run))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # Popen ignores a process that exited since


class Pool:
    """``size`` warm pool processes; :meth:`run` a task on one of them.

    Use as ``async with Pool(size) as pool:`` on an asyncio event loop.
    *env* is added to the pool processes' environment; they import what the
    worker process can (its ``sys.path`` is passed on as ``PYTHONPATH``).
    """

    def __init__(self, size: int, *, env: Mapping[str, str] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one process, not {size}")
        self.size = size
        self._env = dict(env or {})
        self._children: set[_Child] = set()
        self._idle: collections.deque[_Child] = collections.deque()
        self._queue: collections.deque[_Job] = collections.deque()
        self._seq = itertools.count()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Done)
        self._closing = False
        self._failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Pool processes lost (crashed or killed) since the start.
        self.lost = 0

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Spawn the processes; returns at once, tasks queue until a process is up."""
        self._loop = asyncio.get_running_loop()
        env = {**os.environ, **self._env}
        paths = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        self._spawn_env = env
        for _ in range(self.size):
            await self._spawn()

    @property
    def pids(self) -> list[int]:
        return sorted(c.pid for c in self._children)

    @property
    def busy(self) -> int:
        return sum(1 for c in self._children if c.job is not None)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _spawn(self) -> None:
        assert self._loop is not None
        parent, child = socket.socketpair()  # AF_UNIX, SOCK_STREAM
        for sock in (parent, child):
            tune_socket(sock)
        try:
            # Popen with pass_fds uses vfork/posix_spawn: fast enough to call on the loop.
            process = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-c", _BOOT, str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=self._spawn_env,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        proto = _Child(self, process)
        try:
            await self._loop.create_unix_connection(lambda: proto, sock=parent)
        except BaseException:  # cancelled (the pool is closing): leave no process behind
            proto.kill()
            parent.close()
            process.wait()  # killed: reaped at once (a Popen left running warns)
            raise
        self._children.add(proto)
        self._idle.append(proto)
        log.debug("Pool process %d started", process.pid)
        self._dispatch()

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop: queued tasks fail; processes exit after their task (killed after *grace*)."""
        if self._closing:
            return
        self._closing = True
        while self._queue:
            self._queue.popleft().finish(PoolProcessLost("the worker is shutting down"))
        for task in self._tasks:
            task.cancel()
        children = list(self._children)
        for child in children:
            if child.transport is not None:
                child.transport.close()
        deadline = time.monotonic() + grace
        with anyio.CancelScope(shield=True):
            for child in children:
                while child.process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                child.kill()
                await anyio.to_thread.run_sync(child.process.wait)

    # -- running tasks ---------------------------------------------------------

    async def run(
        self, digest: str, name: str, function: bytes, args: bytes, *, session_id: int = 0
    ) -> Done:
        """Run one task and return its :class:`Done`; raises :class:`PoolProcessLost`.

        Cancelling the caller stops the task: it leaves the queue, or its
        process is killed and replaced.
        """
        future: asyncio.Future[Done] = asyncio.get_running_loop().create_future()

        def settle(outcome: Done | PoolProcessLost) -> None:
            if not future.done():
                if isinstance(outcome, PoolProcessLost):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

        job = self.submit(digest, name, function, args, session_id=session_id, on_done=settle)
        try:
            return await future
        finally:
            self.abort(job)

    def submit(
        self,
        digest: str,
        name: str,
        function: bytes,
        args: bytes,
        *,
        session_id: int = 0,
        on_done: Callable[[Done | PoolProcessLost], object],
    ) -> _Job:
        """Queue one task; *on_done* gets its :class:`Done` or :class:`PoolProcessLost`.

        *on_done* is called on the loop, at most once, and never after :meth:`abort`.
        Raises PoolProcessLost at once when the pool is closing.
        """
        if self._closing:
            raise PoolProcessLost("the worker is shutting down")
        job = _Job(next(self._seq), digest, name, function, args, session_id, on_done)
        self._queue.append(job)
        self._dispatch()
        return job

    def abort(self, job: _Job) -> None:
        """Stop *job* unless it finished: it leaves the queue, or its process is killed."""
        if job.finished:
            return
        job.finished = job.aborted = True
        if job.child is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
        else:
            log.info("Killing pool process %d to stop task %s", job.child.pid, job.name)
            job.child.kill()

    def _dispatch(self) -> None:
        idle, queue = self._idle, self._queue
        while idle and queue:
            # The process that finished last: under a light load one process stays warm.
            child = idle.pop()  # connected: connection_lost takes a process out of _idle
            job = queue.popleft()
            job.child = child
            child.job = job
            child.send(job)

    def _finished(self, child: _Child, done: Done) -> None:
        job = child.job
        if job is None or job.seq != done.seq:
            log.error("Pool process %d answered a task it was not given; killing it", child.pid)
            child.kill()
            return
        child.job = None
        child.ran += 1
        self._failures = 0
        if done.status and job.function and done.message.startswith("cannot load function"):
            child.known.discard(job.digest)
        self._idle.append(child)
        self._dispatch()
        job.finish(done)

    def _lost(self, child: _Child) -> None:
        self._children.discard(child)
        with contextlib.suppress(ValueError):
            self._idle.remove(child)
        if self._closing:  # its task (if any) cannot answer any more
            if child.job is not None:
                child.job.finish(PoolProcessLost("the worker is shutting down"))
            return
        self.lost += 1
        task = asyncio.ensure_future(self._replace(child))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, child: _Child) -> None:
        process = child.process
        deadline = time.monotonic() + 2.0
        while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)  # no event tells a child exited without a child watcher
        if process.poll() is None:  # closed its socket but lives on: not usable
            child.kill()
            await asyncio.sleep(0.05)
        status = _exit_status(process.poll())
        job = child.job
        if job is not None:
            job.finish(PoolProcessLost(f"the pool process running {job.name} {status}"))
            if not job.aborted:
                log.warning("Pool process %d %s while running %s", child.pid, status, job.name)
        elif not self._closing:
            log.warning("Pool process %d %s", child.pid, status)
        quick = child.ran == 0 and time.monotonic() - child.started < _QUICK_DEATH and job is None
        if quick:
            self._failures += 1
            await asyncio.sleep(min(0.05 * 2 ** (self._failures - 1), 5.0))
        if not self._closing:
            await self._spawn()


def _exit_status(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
