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
way a new process is spawned in its place.

Tasks are queued while every process is busy, one queue per *owner* (the
worker's client connection): a free process takes the next task of the owner
with the fewest tasks running, the one served longest ago first among equals,
so one client's backlog never starves another's task. A task may have a
timeout on its run (not its time in the queue): past it its process is killed
and the task fails with :class:`TaskTimedOut`.

Each process has a second socket, its *channel*, for the fds of shared-memory
segments (:mod:`vaccelray.segments`): large objects a task is given
(:class:`Lent`, opened when the task is sent) and a task's large result, when
the caller asks for one (``segment_min``): checked to be a sealed segment of
the size announced, and handed to ``on_segment``.

A pool process is untrusted (it runs user code that can write to its socket):
a frame it declares larger than the max message size plus a margin is never
allocated; the process is killed and its task fails as lost. Each process
keeps at most ``max_functions`` functions unpickled, the least recently used
dropped first (the pool tells it which, and sends one again when needed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Final, Protocol

import anyio
import msgspec

from vaccelray import segments
from vaccelray.errors import RPCError, VaccelrayError
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.transport.endpoints import tune_socket
from vaccelray.transport.writes import WriteBatch
from vaccelray.worker.poolchild import (
    FRAME_MARGIN,
    LANE_TAG,
    OBJECTS_TAG,
    REJECTED,
    RESULT_TAG,
    Done,
    Run,
    encode_frame,
)
from vaccelray.worker.sandbox import Sandbox, SandboxConfig, prepare

__all__ = [
    "DEFAULT_MAX_FUNCTIONS",
    "FRAME_MARGIN",
    "Lent",
    "Pool",
    "PoolProcessLost",
    "TaskTimedOut",
    "exit_status",
]

log = logging.getLogger("vaccelray.pool")

_HEADER: Final = struct.Struct(">I")
#: The reused receive buffer of a pool process's socket; larger frames get their own.
_READ_SIZE: Final = 256 << 10
#: The cwd that ``-c`` puts first on sys.path goes last: the process imports the
#: vaccelray the worker runs (a checkout in the cwd could be another version).
_BOOT: Final = (
    "import sys\n"
    "if sys.path[:1] == ['']:\n"
    "    sys.path.append(sys.path.pop(0))\n"
    "from vaccelray.worker.poolchild import main\n"
    "main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5],\n"
    "     int(sys.argv[6]), float(sys.argv[7]))\n"
)
#: A process that dies sooner than this after its start, having run nothing, counts
#: as failing to start: replacements then back off (0.05 s doubling, up to 5 s).
_QUICK_DEATH: Final = 1.0
#: The objects of a task that has none (never changed).
_NO_OBJECTS: Final[dict[str, bytes]] = {}
#: Functions each pool process keeps unpickled.
DEFAULT_MAX_FUNCTIONS: Final = 64


class Lent(Protocol):
    """A large object a task is given as an fd (see ``ObjectStore.lend``)."""

    def open(self) -> int:
        """A new fd of it, read-only in effect (the pool closes it once sent); raises
        RPCError when it is gone."""
        ...


class PoolProcessLost(VaccelrayError):
    """The pool process running a task died before answering."""


class TaskTimedOut(PoolProcessLost):
    """A task ran past its timeout; its pool process was killed."""


class _Owner:
    """The tasks of one owner: queued, and how many run."""

    __slots__ = ("queue", "running", "served")

    def __init__(self) -> None:
        self.queue: collections.deque[_Job] = collections.deque()
        self.running = 0
        #: When a task of this owner last went to a process (0: never).
        self.served = 0


class _Known(collections.OrderedDict[str, None]):
    """The digests a pool process has unpickled, least recently used first."""

    def discard(self, digest: str) -> None:
        """Forget *digest*, which was sent with the task it just answered: it is here."""
        del self[digest]


class _Job:
    __slots__ = (
        "aborted",
        "args",
        "args_object",
        "child",
        "digest",
        "expires",
        "finished",
        "function",
        "lane",
        "method",
        "name",
        "objects",
        "on_done",
        "on_segment",
        "owner",
        "pool",
        "queued",
        "segment_min",
        "seq",
        "session_id",
        "timeout",
    )

    def __init__(
        self,
        pool: Pool,
        seq: int,
        digest: str,
        name: str,
        function: bytes,
        args: bytes,
        session_id: int,
        on_done: Callable[[Done | PoolProcessLost], object],
        owner: Hashable,
        timeout: float | None,
        method: str,
        objects: Mapping[str, bytes | Lent],
    ) -> None:
        self.pool = pool
        self.method = method
        self.objects = objects
        #: The args are this object's (see ``Run.args_object``).
        self.args_object = ""
        #: Results of at least this many bytes come as segments, handed to *on_segment*.
        self.segment_min = 0
        self.on_segment: Callable[[int, int], object] | None = None
        #: An actor's lane to hand its process (see ``poolchild.LANE``), closed once sent.
        self.lane: socket.socket | None = None
        self.seq = seq
        self.digest = digest
        self.name = name
        self.function = function
        self.args = args
        self.session_id = session_id
        self.on_done = on_done
        self.owner = owner
        self.timeout = timeout
        #: Loop time past which its run is stopped (set when it starts running).
        self.expires = math.inf
        self.child: _Child | None = None
        self.queued = True
        self.finished = False
        self.aborted = False

    def finish(self, outcome: Done | PoolProcessLost) -> None:
        if not self.finished:
            self.finished = True
            self.pool._ended(self)
            self.on_done(outcome)


class _Child(asyncio.BufferedProtocol):
    """One pool process and the parent end of its socket.

    Frames are read straight into a reused buffer; one larger than it (a big
    result) gets a buffer of its own size, filled by the socket with no
    further copy before it is decoded.
    """

    def __init__(
        self, pool: Pool, process: subprocess.Popen[bytes], channel: socket.socket
    ) -> None:
        self.pool = pool
        self.process = process
        #: The parent end of its channel (non-blocking).
        self.channel = channel
        self.pid = process.pid
        self.started = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self.job: _Job | None = None
        self.known = _Known()
        #: Why the pool killed it, when that is not its exit status.
        self.fault: str | None = None
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
        if self.fault is not None:  # killed: what it still sends is not read
            return
        with WriteBatch():  # the answers of the tasks read leave at the end of this read
            self._read(nbytes)

    def _read(self, nbytes: int) -> None:
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
            if size > self.pool._max_frame:
                self._oversized(size)
                return
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

    def _oversized(self, size: int) -> None:
        """It declared a frame too large to be an answer: kill it, never allocate that."""
        limit = self.pool._max_frame
        self.fault = f"declared a {size}-byte answer (more than {limit} bytes) and was killed"
        log.error("Pool process %d %s", self.pid, self.fault)
        self.kill()

    def _received(self, body: memoryview) -> None:
        done = self.pool._decoder.decode(body)
        if not done.segment:
            self.pool._finished(self, done)
            return
        job = self.job
        try:
            if job is None or not job.segment_min or done.segment < job.segment_min:
                raise segments.SegmentError("a result segment it was not asked for")
            (fd,) = segments.receive_fds(self.channel, RESULT_TAG, 1)
            try:
                segments.check(fd, done.segment)
            except segments.SegmentError:
                os.close(fd)
                raise
        except (segments.SegmentError, OSError) as exc:
            self.fault = f"sent a bad result ({exc}) and was killed"
            log.error("Pool process %d %s", self.pid, self.fault)
            self.kill()
            return
        self.pool._finished(self, done, fd)

    def eof_received(self) -> None:
        # The process closed its socket (it is ending): no task goes to it from now on,
        # though connection_lost comes only on the loop's next round, after the requests
        # read meanwhile (such as a lane's client calling again by the worker).
        with contextlib.suppress(ValueError):
            self.pool._idle.remove(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.channel.close()
        self.pool._lost(self)

    def _send_segments(self, job: _Job) -> tuple[dict[str, bytes], tuple[str, ...]]:
        """Send the fds of the job's lent objects on the channel; the other objects, and
        the ids of those sent. Raises RPCError (one is gone) or OSError."""
        objects: dict[str, bytes] = {}
        lent: list[tuple[str, Lent]] = []
        for object_id, value in job.objects.items():
            if isinstance(value, bytes):
                objects[object_id] = value
            else:
                lent.append((object_id, value))
        if not lent:
            return objects, ()
        fds: list[int] = []
        try:
            for _, value in lent[: segments.MAX_FDS]:
                fds.append(value.open())
            for object_id, value in lent[segments.MAX_FDS :]:  # past what one message carries
                fd = value.open()
                try:
                    objects[object_id] = segments.read(fd, 0, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            segments.send_fds(self.channel, OBJECTS_TAG, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return objects, tuple(object_id for object_id, _ in lent[: segments.MAX_FDS])

    def send(self, job: _Job) -> str:
        """Send *job* to this process; why it could not be sent ("" when it was)."""
        assert self.transport is not None
        objects: dict[str, bytes] = _NO_OBJECTS
        sent: tuple[str, ...] = ()
        if job.objects:
            try:
                objects, sent = self._send_segments(job)
            except RPCError as exc:
                return exc.message
            except OSError as exc:
                return f"cannot hand {job.name} its objects: {exc}"
        # A lane's run says the timeout of the lane's calls: the job's own.
        lane_timeout = 0.0
        if job.lane is not None:
            lane, job.lane = job.lane, None
            lane_timeout = job.timeout or 0.0
            try:
                with lane:
                    segments.send_fds(self.channel, LANE_TAG, [lane.fileno()])
            except OSError as exc:
                return f"cannot hand {job.name} its lane: {exc}"
        known = self.known
        first = job.digest not in known
        known.setdefault(job.digest)
        known.move_to_end(job.digest)
        forget = []
        while len(known) > self.pool.max_functions:
            oldest = next(iter(known))
            del known[oldest]
            forget.append(oldest)
        run = Run(
            job.seq,
            job.digest,
            job.name,
            job.function if first else None,
            job.args,
            job.session_id,
            tuple(forget),
            job.method,
            objects,
            sent,
            job.args_object,
            job.segment_min,
            lane_timeout,
        )
        self.transport.write(encode_frame(self.pool._encoder, run))
        return ""

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # Popen ignores a process that exited since


class Pool:
    """``size`` warm pool processes; :meth:`run` a task on one of them.

    Use as ``async with Pool(size) as pool:`` on an asyncio event loop.
    *env* is added to the pool processes' environment; they import what the
    worker process can (its ``sys.path`` is passed on as ``PYTHONPATH``).
    A frame from a process may be up to *max_message_size* plus
    :data:`FRAME_MARGIN` bytes; each process keeps *max_functions* functions.
    *on_lost* is called with the exit status of each process lost and says
    whether to replace it (an actor's pool uses it: its one process held the actor).
    Processes are started as *sandbox* says (see :mod:`vaccelray.worker.sandbox`;
    by default plain children with the default limits, as the embedded worker's).
    """

    def __init__(
        self,
        size: int,
        *,
        env: Mapping[str, str] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_functions: int = DEFAULT_MAX_FUNCTIONS,
        sandbox: Sandbox | None = None,
        on_lost: Callable[[str], bool] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one process, not {size}")
        if max_functions < 1:
            raise ValueError(f"a pool process keeps at least one function, not {max_functions}")
        self.size = size
        self.max_functions = max_functions
        self.max_message_size = max_message_size
        self._max_frame = max_message_size + FRAME_MARGIN
        self._env = dict(env or {})
        self.sandbox = sandbox or prepare(SandboxConfig(mode="embedded"), size)
        self._children: set[_Child] = set()
        #: Processes lost and not reaped yet (their _replace does it; aclose, if it comes first).
        self._reaping: set[_Child] = set()
        self._idle: collections.deque[_Child] = collections.deque()
        #: Each owner with tasks queued or running; _queued counts the queued ones.
        self._owners: dict[Hashable, _Owner] = {}
        self._queued = 0
        self._turns = itertools.count(1)
        self._seq = itertools.count()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Done)
        self._closing = False
        self._failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The one timer of the running tasks' timeouts, due at the earliest (see _arm).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tasks: set[asyncio.Task[None]] = set()
        #: Pool processes lost (crashed or killed) since the start.
        self.lost = 0
        #: Told how each process was lost (its task, if any, has been answered first);
        #: says whether to spawn a replacement.
        self._on_lost = on_lost

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
        self._spawn_env = self.sandbox.environment(env)
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
        """Tasks waiting for a process."""
        return self._queued

    def queued_by(self, owner: Hashable) -> int:
        """Tasks of *owner* waiting for a process."""
        state = self._owners.get(owner)
        return 0 if state is None else len(state.queue)

    def spawn_process(
        self, lease_timeout: float = -1.0
    ) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket]:
        """Start a pool process, sandboxed and limited as the pool's: it, and the other ends
        of its task socket (blocking) and of its channel for segments (non-blocking).
        *lease_timeout*: see :func:`vaccelray.worker.poolchild.main`."""
        sock, child = socket.socketpair()  # AF_UNIX, SOCK_STREAM
        for end in (sock, child):
            tune_socket(end)
        channel, child_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel.setblocking(False)
        # Popen with pass_fds uses vfork/posix_spawn: fast enough to call on the loop.
        sandbox = self.sandbox
        # Its parent is this process unless a sandbox stands between (then 0).
        worker_pid = 0 if sandbox.isolated else os.getpid()
        argv = [
            sys.executable,
            "-c",
            _BOOT,
            str(child.fileno()),
            str(self.max_message_size),
            sandbox.limits.encode(),
            str(worker_pid),
            sandbox.child_user(),
            str(child_channel.fileno()),
            repr(lease_timeout),
        ]
        try:
            process = subprocess.Popen(
                sandbox.command(argv, self._spawn_env),
                pass_fds=(child.fileno(), child_channel.fileno()),
                env=self._spawn_env,
                stdin=subprocess.DEVNULL,
                **sandbox.popen_kwargs(),
            )
        except BaseException:
            sock.close()
            channel.close()
            raise
        finally:
            child.close()
            child_channel.close()
        return process, sock, channel

    async def _spawn(self) -> None:
        assert self._loop is not None
        process, parent, channel = self.spawn_process()
        proto = _Child(self, process, channel)
        try:
            await self._loop.create_unix_connection(lambda: proto, sock=parent)
        except BaseException:  # cancelled (the pool is closing): leave no process behind
            proto.kill()
            parent.close()
            channel.close()
            process.wait()  # killed: reaped at once (a Popen left running warns)
            raise
        self._children.add(proto)
        self._idle.append(proto)
        log.debug("Pool process %d started", process.pid)
        self._dispatch()

    def close(self, *, kill: bool = False) -> None:
        """Stop taking tasks, at once: queued tasks fail; with *kill*, the processes are
        killed now (their tasks fail as lost). :meth:`aclose` ends and reaps them."""
        if not self._closing:
            self._closing = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for job in [job for state in self._owners.values() for job in state.queue]:
                job.finish(PoolProcessLost("the worker is shutting down"))
            for task in self._tasks:
                task.cancel()
        if kill:
            self.kill_processes()

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop: queued tasks fail; processes exit after their task (killed after *grace*)."""
        self.close()
        children = [*self._children, *self._reaping]
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
        self,
        digest: str,
        name: str,
        function: bytes,
        args: bytes,
        *,
        session_id: int = 0,
        timeout: float | None = None,
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

        job = self.submit(
            digest,
            name,
            function,
            args,
            session_id=session_id,
            on_done=settle,
            timeout=timeout,
        )
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
        owner: Hashable = None,
        timeout: float | None = None,
        method: str = "",
        objects: Mapping[str, bytes | Lent] | None = None,
        args_object: str = "",
        segment_min: int = 0,
        on_segment: Callable[[int, int], object] | None = None,
        lane: socket.socket | None = None,
        first: bool = False,
    ) -> _Job:
        """Queue one task of *owner*; *on_done* gets its Done or PoolProcessLost.
        *objects*: pickled objects its arguments refer to, by id (large ones lent);
        *args_object*: the one of them that is its pickled arguments (*args* unused).
        A pickled result of at least *segment_min* bytes (0: none) comes as a segment:
        ``on_segment(fd, size)`` gets it (and owns its fd) just before *on_done*.

        *on_done* is called on the loop, at most once, and never after :meth:`abort`.
        Past *timeout* seconds of running (not queued) the task's process is
        killed and *on_done* gets :class:`TaskTimedOut`.
        Raises PoolProcessLost at once when the pool is closing. *method*: see
        :attr:`vaccelray.worker.poolchild.Run.method`; *lane*: the socket a
        ``poolchild.LANE`` run hands over (the pool closes it once sent, or with the job),
        whose calls may then run *timeout* seconds each. *first*: ahead of its owner's
        queued tasks (an actor's constructor, before the calls that came meanwhile).
        """
        if self._closing:
            raise PoolProcessLost("the worker is shutting down")
        job = _Job(
            self,
            next(self._seq),
            digest,
            name,
            function,
            args,
            session_id,
            on_done,
            owner,
            timeout,
            method,
            objects or {},
        )
        if args_object:
            job.args_object = args_object
        if segment_min:
            job.segment_min, job.on_segment = segment_min, on_segment
        job.lane = lane
        state = self._owners.get(owner)
        if state is None:
            state = self._owners[owner] = _Owner()
        if first:
            state.queue.appendleft(job)
        else:
            state.queue.append(job)
        self._queued += 1
        self._dispatch()
        return job

    def abort(self, job: _Job) -> None:
        """Stop *job* unless it finished: it leaves the queue, or its process is killed."""
        if job.finished:
            return
        job.finished = job.aborted = True
        self._ended(job)
        if job.child is not None:
            log.info("Killing pool process %d to stop task %s", job.child.pid, job.name)
            job.child.kill()

    def kill_processes(self) -> None:
        """Kill every process: each one's task fails as lost, and ``on_lost`` says whether a
        new process takes its place. Tasks submitted meanwhile wait for that one."""
        self._idle.clear()
        for child in list(self._children):
            child.kill()

    def _ended(self, job: _Job) -> None:
        """*job* will not be answered any more: it leaves its queue or its owner's running."""
        if job.lane is not None:  # never sent
            job.lane.close()
            job.lane = None
        state = self._owners[job.owner]
        if job.queued:
            state.queue.remove(job)
            self._queued -= 1
        else:
            state.running -= 1
        if not state.queue and not state.running:
            del self._owners[job.owner]

    def _dispatch(self) -> None:
        idle = self._idle
        while idle and self._queued:
            # Fair share: the owner with the fewest tasks running, then the one served
            # longest ago (round-robin among owners that each run as many).
            owners = self._owners
            if len(owners) == 1:  # the one owner with tasks (the common case): no choice
                (state,) = owners.values()
            else:
                state = min(
                    (s for s in owners.values() if s.queue),
                    key=lambda s: (s.running, s.served),
                )
            job = state.queue.popleft()
            job.queued = False
            self._queued -= 1
            state.running += 1
            state.served = next(self._turns)
            # The process that finished last: under a light load one process stays warm.
            child = idle.pop()  # connected: connection_lost takes a process out of _idle
            job.child = child
            child.job = job
            unsent = child.send(job)
            if unsent:
                child.job = job.child = None
                idle.append(child)
                job.finish(Done(job.seq, REJECTED, message=unsent))
                continue
            if job.timeout is not None:
                assert self._loop is not None
                job.expires = self._loop.time() + job.timeout
                if job.expires < self._timer_at:
                    self._arm(job.expires)

    def _arm(self, when: float) -> None:
        """Check the running tasks' timeouts at loop time *when* (one timer for all of them:
        a timer per task would cost one made and cancelled per task)."""
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._check_timeouts)

    def _check_timeouts(self) -> None:
        """The timer: stop the tasks that ran past their timeout, wait for the next one."""
        assert self._loop is not None
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        following = []
        for child in list(self._children):
            job = child.job
            if job is None or job.finished:
                continue
            if job.expires <= now:
                self._expired(job)
            else:
                following.append(job.expires)
        if following:
            self._arm(min(following))

    def _expired(self, job: _Job) -> None:
        child = job.child
        assert child is not None
        log.warning(
            "Task %s ran past its timeout of %g s; killing pool process %d",
            job.name,
            job.timeout,
            child.pid,
        )
        job.aborted = True  # its process dies on purpose: no crash to report
        job.finish(TaskTimedOut(f"{job.name} ran past its timeout of {job.timeout:g} s"))
        child.kill()

    def _finished(self, child: _Child, done: Done, segment: int = -1) -> None:
        """*child* answered *done* (its result in the fd *segment*, when not -1)."""
        job = child.job
        if job is None or job.seq != done.seq or job.aborted:
            if segment >= 0:
                os.close(segment)
            if job is not None and job.aborted:
                return  # answered as it was being killed: not idle, its death is no news
            log.error("Pool process %d answered a task it was not given; killing it", child.pid)
            child.kill()
            return
        child.job = None
        self._failures = 0
        if done.unloaded:
            child.known.discard(job.digest)
        self._idle.append(child)
        if segment >= 0:
            assert job.on_segment is not None  # a segment comes only when asked for
            job.on_segment(segment, done.segment)
        job.finish(done)  # first: its owner runs one task less when the next is chosen
        self._dispatch()

    def _lost(self, child: _Child) -> None:
        self._children.discard(child)
        self._reaping.add(child)
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
        if process.poll() is not None:
            self._reaping.discard(child)
        status = child.fault or exit_status(process.poll())
        job = child.job
        if job is not None:
            job.finish(PoolProcessLost(f"the pool process running {job.name} {status}"))
            if not job.aborted:
                log.warning("Pool process %d %s while running %s", child.pid, status, job.name)
        elif not self._closing:
            log.warning("Pool process %d %s", child.pid, status)
        if self._on_lost is not None and not self._closing and not self._on_lost(status):
            return
        # Never given a task (nothing known), died idle soon after its start.
        quick = not child.known and time.monotonic() - child.started < _QUICK_DEATH and job is None
        if quick:
            self._failures += 1
            await asyncio.sleep(min(0.05 * 2 ** (self._failures - 1), 5.0))
        if not self._closing:
            await self._spawn()


def exit_status(code: int | None) -> str:
    """How a process with exit code *code* (``Popen.poll``) ended, as a log line says it."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
