"""A pool process: runs offloaded functions one at a time, fed over a socket.

Started by :mod:`vaccelray.worker.pool` as ``python -c "...main(FD)"`` with one
end of a socketpair. It imports only msgspec and cloudpickle (the worker's
transport, protobuf and backend stay out of it), then loops: read a
:class:`Run`, call the function, write a :class:`Done`. Frames are a 4-byte
big-endian length and a MessagePack body.

Large objects a task is given (:mod:`vaccelray.segments`) come as fds on a
second socket, the *channel* (``SCM_RIGHTS``, just before the ``Run`` naming
them in ``segments``), and are read from read-only mappings; a result of at
least ``Run.segment_min`` bytes is pickled into a new sealed segment sent back
on the channel just before its ``Done`` (``Done.segment``: its size).

An actor's process may also serve *lanes*: sockets of clients on the
worker's host (:mod:`vaccelray.worker.leases`), each handed over on the
channel (``LANE_TAG``, just before a ``Run`` whose method is :data:`LANE`).
From its first lane on, the process waits on all its sockets at once and
runs one call at a time: the worker's first, then the lanes' in turn. A lane
carries method calls only, each bounded by the lane's timeout (a call past it
is answered ``TIMED_OUT`` and the process then ends, as one the worker kills).

Functions arrive pickled once per process (``Run.function`` is set the first
time this process sees a digest) and are kept unpickled by digest, until the
worker says to forget them (``Run.forget``: it keeps a bounded number). Whatever
the function does, the worker daemon only ever sees a ``Done`` or this
process dying (segfault, ``os._exit``), which fails that one task.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import pickle
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, NoReturn

import cloudpickle  # type: ignore[import-untyped]
import msgspec

from vaccelray import segments, task_context
from vaccelray.allocator import keep_heap_for
from vaccelray.worker.sandbox import TaskLimits, apply_limits, memory_note

__all__ = [
    "FRAME_MARGIN",
    "LANE",
    "LANE_TAG",
    "MAX_LANES",
    "TIMED_OUT",
    "Done",
    "ErrorInfo",
    "Run",
    "describe_exception",
    "encode_frame",
    "frame_end",
    "main",
    "too_large",
]

#: Done.status values (the same numbers as ``FailureKind``; 0 is success).
OK: Final = 0
RAISED: Final = 1
SERIALIZATION: Final = 3
REJECTED: Final = 4
#: A result larger than a reply may carry (not a failure kind: answered RESOURCE_EXHAUSTED).
TOO_LARGE: Final = 100
#: A lane's call ran past its timeout (answered DEADLINE_EXCEEDED; the process then ends).
TIMED_OUT: Final = 101

#: Room in a frame to the worker beyond the max message size: the rest of a
#: ``Done`` (its message, an exception's traceback).
FRAME_MARGIN: Final = 1 << 20

_HEADER: Final = struct.Struct(">I")
#: Results pickled by the C pickler: nothing in them needs cloudpickle.
_PLAIN: Final = (type(None), bool, int, float, str, bytes)


class Run(msgspec.Struct, array_like=True, frozen=True):
    seq: int
    digest: str
    name: str
    #: The pickled function, when this process has not seen ``digest`` yet.
    function: bytes | None
    args: bytes
    session_id: int = 0
    #: Digests to drop: the worker sends them again if they are needed again.
    forget: tuple[str, ...] = ()
    #: An actor's process: ``__init__`` makes this process's actor (the function is its
    #: class); another name calls that method of it (``digest`` is then unused).
    method: str = ""
    #: Pickled objects the arguments refer to, by id (see ``task_context.object_value``).
    objects: dict[str, bytes] = {}
    #: More of them, whose fds come on the channel, in this order.
    segments: tuple[str, ...] = ()
    #: The pickled arguments are this object's (``args`` is then empty).
    args_object: str = ""
    #: A pickled result of at least this many bytes goes in a segment (0: never).
    segment_min: int = 0
    #: Seconds the task may run, in a leased process (0: its lease's limit); in a
    #: :data:`LANE` run, each of the lane's calls (0: no limit).
    timeout: float = 0.0


Scalar = str | int | float | bool | None


class ErrorInfo(msgspec.Struct, array_like=True, frozen=True):
    module: str
    qualname: str
    message: str
    args: tuple[Scalar, ...] | None
    traceback: str
    #: The exception's instance attributes that are plain scalars.
    attributes: dict[str, Scalar] = {}


class Done(msgspec.Struct, array_like=True, frozen=True):
    seq: int
    status: int
    result: bytes = b""
    message: str = ""
    error: ErrorInfo | None = None
    #: The task's function could not be loaded: this process does not hold it.
    unloaded: bool = False
    #: The result's size, when it is in a segment sent on the channel (``result`` empty).
    segment: int = 0
    #: A leased process's: the object of the worker's store now holding that segment.
    kept: str = ""


_SCALARS = (str, int, float, bool, type(None))
#: ``Run.method`` of an actor's constructor.
_CREATE: Final = "__init__"


_PACKAGE_DIR: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_frames(te: traceback.TracebackException) -> None:
    """Drop vaccelray's own frames from *te* and the exceptions chained to it."""
    seen: set[int] = set()
    todo = [te]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        frames = [f for f in current.stack if not f.filename.startswith(_PACKAGE_DIR + os.sep)]
        current.stack = traceback.StackSummary.from_list(frames)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def describe_exception(exc: BaseException, tb: TracebackType | None) -> ErrorInfo:
    """Type, message, plain args and attributes, and the traceback text of the user's frames."""
    cls = type(exc)
    args = tuple(exc.args) if all(isinstance(a, _SCALARS) for a in exc.args) else None
    attributes = {
        k: v
        for k, v in getattr(exc, "__dict__", {}).items()
        if isinstance(k, str) and not k.startswith("__") and isinstance(v, _SCALARS)
    }
    try:
        te = traceback.TracebackException(cls, exc, tb)
        _user_frames(te)
        text = "".join(te.format())
    except Exception:  # pragma: no cover - formatting must never fail the task's report
        text = "".join(traceback.format_exception(cls, exc, tb))
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not take the pool process down
        message = f"<{cls.__qualname__} with an unprintable message>"
    return ErrorInfo(cls.__module__, cls.__qualname__, message, args, text, attributes)


#: The tags of the channel's messages: a task's objects, a result, an actor's lane.
OBJECTS_TAG: Final = b"objects"
RESULT_TAG: Final = b"result"
LANE_TAG: Final = b"lane"
#: ``Run.method`` of the worker's "serve this lane" (the socket comes on the channel;
#: ``Run.timeout`` is the lane's call timeout, 0 for none).
LANE: Final = "__lane__"
#: Lanes an actor's process serves at once: past it, a new one is refused (REJECTED).
MAX_LANES: Final = 8
#: Seconds past a lane call's timeout after which the process is ended even though the
#: call did not stop (it ignored the exception, or never returned to Python).
_BACKSTOP: Final = 5.0


class RunTimedOut(BaseException):
    """Raised in a lane's call by SIGALRM: it ran past its timeout."""


def _alarm(signum: int, frame: object) -> None:
    raise RunTimedOut


class _Runner:
    def __init__(
        self,
        max_result: int,
        memory: int = 0,
        channel: socket.socket | None = None,
        timeout: float = 0.0,
    ) -> None:
        #: Seconds a task may run before SIGALRM ends this process (0: no limit; a leased
        #: process's, see :func:`main`).
        self.timeout = timeout
        #: Where segments come and go (None: this process gets none).
        self.channel = channel
        #: The segment of the last result, to send before its Done (-1: none).
        self.segment = -1
        self.functions: dict[str, Callable[..., Any]] = {}
        #: Bytes a pickled result may have: the worker's max message size.
        self.max_result = max_result
        #: This process's memory limit (0: none), named to a task that runs out.
        self.memory = memory
        #: The instance this process holds, when it is an actor's.
        self.actor: object = None
        #: An actor's process serving lanes: their calls' timeout (0: none), and whether
        #: SIGALRM raises RunTimedOut in a call (None: it serves no lane).
        self.lane_timeout: float | None = None

    def _callable(self, task: Run) -> Callable[..., Any] | Done:
        """What *task* calls, or the Done that says why there is nothing to call."""
        if task.method and task.method != _CREATE:
            if self.actor is None:
                return Done(
                    task.seq, REJECTED, message=f"this process holds no actor ({task.name})"
                )
            try:
                method: Callable[..., Any] = getattr(self.actor, task.method)
            except AttributeError as exc:
                return self._failed(task, RAISED, f"{task.name} has no such method", exc)
            return method
        fn = self.functions.get(task.digest)
        if fn is None:
            if task.function is None:
                return Done(
                    task.seq, REJECTED, message=f"function {task.name} was not sent to this process"
                )
            try:
                fn = pickle.loads(task.function)
            except BaseException as exc:
                message = f"cannot load function {task.name} on the worker"
                return self._failed(task, SERIALIZATION, message, exc, unloaded=True)
            self.functions[task.digest] = fn
        return fn

    def run(self, task: Run) -> Done:
        views = self._views(task) if task.segments else {}
        try:
            return self._run(task, views)
        finally:
            if views or task_context.objects:
                task_context.set_objects({})
            for view in views.values():
                # The task kept a view of it: the mapping goes when that does.
                with contextlib.suppress(BufferError):
                    view.close()

    def _views(self, task: Run) -> dict[str, Any]:
        """Mappings of the task's segments, by object id (their fds are closed)."""
        assert self.channel is not None, "segments sent to a process without a channel"
        fds = segments.receive_fds(self.channel, OBJECTS_TAG, len(task.segments))
        views: dict[str, Any] = {}
        try:
            for object_id, fd in zip(task.segments, fds, strict=True):
                views[object_id] = segments.view(fd, 0)
                keep_heap_for(len(views[object_id]))
        finally:
            for fd in fds:
                os.close(fd)
        return views

    def _run(self, task: Run, views: dict[str, Any]) -> Done:
        for digest in task.forget:
            self.functions.pop(digest, None)
        fn = self._callable(task)
        if isinstance(fn, Done):
            return fn
        objects: dict[str, Any] = {**task.objects, **views} if views else dict(task.objects)
        raw = objects.pop(task.args_object, b"") if task.args_object else task.args
        if objects or task_context.objects:
            task_context.set_objects(objects)
        try:
            args, kwargs = pickle.loads(raw) if raw else ((), {})
        except BaseException as exc:
            return self._failed(
                task, SERIALIZATION, f"cannot load the arguments of {task.name} on the worker", exc
            )
        task_context.session_id = task.session_id
        timeout = self.timeout
        if task.timeout > 0 and (not timeout or task.timeout < timeout):
            timeout = task.timeout
        backstop = bool(timeout) and self.lane_timeout is not None
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            if backstop:
                faulthandler.dump_traceback_later(timeout + _BACKSTOP, exit=True)
        try:
            result = fn(*args, **kwargs)
        except RunTimedOut:
            return Done(task.seq, TIMED_OUT, message=f"{task.name} ran past its timeout")
        except BaseException as exc:
            # Drop this frame: the traceback starts in the user's function.
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            error = describe_exception(exc, tb)
            if isinstance(exc, MemoryError) and self.memory:
                note = memory_note(self.memory)
                text = f"{error.message}; {note}" if error.message else note
                error = msgspec.structs.replace(error, message=text)
            return Done(task.seq, RAISED, message=f"{task.name} raised", error=error)
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if backstop:
                    faulthandler.cancel_dump_traceback_later()
            task_context.session_id = 0
        if task.method == _CREATE:
            self.actor, result = result, None
        if task.segment_min and self.channel is not None:
            return self._pickled_to_segment(task, result)
        try:
            if type(result) in _PLAIN:
                data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            else:
                data = cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            return self._failed(
                task, SERIALIZATION, f"cannot pickle the result of {task.name}", exc
            )
        if len(data) > self.max_result:
            return Done(
                task.seq,
                TOO_LARGE,
                message=too_large(task.name, len(data), self.max_result),
            )
        return Done(task.seq, OK, data)

    def _pickled_to_segment(self, task: Run, result: object) -> Done:
        """Pickle *result* into the Done, or when it has ``segment_min`` bytes or more into
        a segment (:attr:`segment`, sent before the Done)."""
        out = segments.SegmentWriter(task.segment_min)
        pickler = pickle.Pickler if type(result) in _PLAIN else cloudpickle.CloudPickler
        try:
            pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(result)
            data = out.finish()
        except BaseException as exc:
            out.close()
            return self._failed(
                task, SERIALIZATION, f"cannot pickle the result of {task.name}", exc
            )
        if out.size > self.max_result:
            out.close()
            return Done(
                task.seq, TOO_LARGE, message=too_large(task.name, out.size, self.max_result)
            )
        if out.fd < 0:
            return Done(task.seq, OK, data)
        self.segment = out.fd
        return Done(task.seq, OK, segment=out.size)

    def lane(self, task: Run) -> socket.socket | None:
        """The lane the worker's :data:`LANE` run hands over (on the channel); None when
        this process holds no actor (the fd is closed)."""
        assert self.channel is not None, "a lane sent to a process without a channel"
        (fd,) = segments.receive_fds(self.channel, LANE_TAG, 1)
        if self.actor is None:
            os.close(fd)
            return None
        if self.lane_timeout is None:
            signal.signal(signal.SIGALRM, _alarm)
        self.lane_timeout = task.timeout
        lane = socket.socket(fileno=fd)
        lane.setblocking(False)
        return lane

    def lane_call(self, task: Run) -> Done:
        """Run a call a lane sent: a method of this process's actor, nothing else (no
        function, no objects: those come from the worker), within the lane's timeout (the
        call's own is the client's to keep: the worker's, as a method runs on past it)."""
        if (
            not task.method
            or task.method.startswith("_")
            or task.function is not None
            or task.forget
            or task.objects
            or task.segments
            or task.args_object
            or task.segment_min
        ):
            return Done(
                task.seq, REJECTED, message=f"a lane carries method calls only ({task.name})"
            )
        timeout = self.lane_timeout or 0.0
        return self.run(msgspec.structs.replace(task, session_id=0, timeout=timeout))

    def deposit(self, done: Done) -> Done:
        """A leased process's *done* once its result's segment is in the worker's store.

        The worker answers the segment sent on the channel with ``+`` and the object's
        id, or ``-`` and why it did not take it (its store is full).
        """
        assert self.channel is not None
        try:
            segments.send_fds(self.channel, RESULT_TAG, [self.segment])
            answer = self.channel.recv(1024)
        except OSError as exc:
            answer = f"-cannot hand the result to the worker: {exc}".encode()
        finally:
            os.close(self.segment)
            self.segment = -1
        text = answer[1:].decode("utf-8", "replace")
        if answer[:1] != b"+":
            return Done(done.seq, TOO_LARGE, message=text or "the worker did not keep the result")
        return msgspec.structs.replace(done, kept=text)

    @staticmethod
    def _failed(
        task: Run, status: int, message: str, exc: BaseException, *, unloaded: bool = False
    ) -> Done:
        error = describe_exception(exc, exc.__traceback__)
        return Done(task.seq, status, message=message, error=error, unloaded=unloaded)


def too_large(name: str, size: int, limit: int) -> str:
    """Why a result of *size* bytes is not sent back (answered RESOURCE_EXHAUSTED)."""
    return (
        f"the result of {name} is {size} bytes, more than the {limit} a reply may carry "
        "(worker option --max-message-size)"
    )


def encode_frame(encoder: msgspec.msgpack.Encoder, message: msgspec.Struct) -> bytearray:
    """*message* as a frame: 4-byte length and MessagePack body, encoded in place."""
    frame = bytearray(_HEADER.size)
    encoder.encode_into(message, frame, _HEADER.size)
    _HEADER.pack_into(frame, 0, len(frame) - _HEADER.size)
    return frame


def frame_end(buffer: bytearray, limit: int) -> int:
    """Where the whole frame at the start of *buffer* ends (its body is
    ``buffer[4:end]``); 0 until all of it is there. ValueError for a frame declared
    larger than *limit* bytes."""
    if len(buffer) < _HEADER.size:
        return 0
    (size,) = _HEADER.unpack_from(buffer)
    if size > limit:
        raise ValueError(f"a frame of {size} bytes, more than the {limit} allowed")
    end = _HEADER.size + size
    return end if len(buffer) >= end else 0


def _read_frame(reader: Any) -> bytearray | None:
    """The next frame's body, or None at the end of the stream."""
    header = reader.read(_HEADER.size)
    if len(header) != _HEADER.size:
        return None
    body = bytearray(_HEADER.unpack(header)[0])
    return body if reader.readinto(body) == len(body) else None


def main(
    fd: int,
    max_result: int,
    limits: str = "",
    parent: int = 0,
    user: str = "-",
    channel: int = -1,
    lease_timeout: float = -1.0,
) -> None:
    """Serve tasks on the socket *fd* until the worker closes it; segments come and go
    on the socket *channel* (-1: none).

    A result may have *max_result* bytes (the worker's max message size), a
    whole answer that plus :data:`FRAME_MARGIN`. *limits* (a
    :meth:`TaskLimits.encode`) are applied first; *parent* is the worker's pid
    when it is this process's parent, *user* the ``uid:gid`` to become (see
    :func:`apply_limits`).

    *lease_timeout* >= 0: a leased process (:mod:`vaccelray.worker.leases`), whose
    socket is its client's. It says it is ready with an empty frame, and a task
    running longer than *lease_timeout* seconds (0: no limit), or than its
    ``Run.timeout``, ends the process with SIGALRM: nobody else is there to kill it.
    A large result's segment goes to the worker's store (see :meth:`_Runner.deposit`).
    """
    task_limits = TaskLimits.decode(limits) if limits else TaskLimits()
    apply_limits(task_limits, parent, user)
    # Ctrl-C on the worker's terminal reaches the whole process group: the
    # worker decides when we stop (by closing the socket), not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    if lease_timeout >= 0:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        with contextlib.suppress(OSError):
            sock.sendall(_HEADER.pack(0))
    reader = sock.makefile("rb", buffering=1 << 16)
    decoder = msgspec.msgpack.Decoder(Run)
    encoder = msgspec.msgpack.Encoder()
    runner = _Runner(
        max_result,
        task_limits.memory or 0,
        socket.socket(fileno=channel) if channel >= 0 else None,
        max(lease_timeout, 0.0),
    )
    answer = _Answers(sock, runner, encoder, max_result, deposit=lease_timeout >= 0)
    while True:
        body = _read_frame(reader)
        if body is None:
            break
        # Like the daemons, but only once large messages come (it costs start-up time).
        keep_heap_for(len(body))
        task = decoder.decode(body)
        del body
        if task.method == LANE:
            # The worker sends an actor's process one Run at a time: nothing more is in
            # the reader's buffer, and from now on the sockets are read as they come.
            lane = runner.lane(task)
            refusal = "" if lane is not None else "this process holds no actor"
            if not answer(_lane_taken(task, refusal)):
                break
            if lane is not None:
                _serve_lanes(sock, lane, runner, decoder, answer)
            break
        if not answer(runner.run(task)):
            break
    sys.stdout.flush()
    os._exit(0)


def _lane_taken(task: Run, refusal: str) -> Done:
    """The answer to a :data:`LANE` run: taken, or REJECTED saying why (*refusal*)."""
    return (
        Done(task.seq, REJECTED, message=f"no lane: {refusal}") if refusal else Done(task.seq, OK)
    )


class _Answers:
    """Writes each Done as a frame (to the worker's socket, or to a lane's buffer)."""

    def __init__(
        self,
        sock: socket.socket,
        runner: _Runner,
        encoder: msgspec.msgpack.Encoder,
        max_result: int,
        *,
        deposit: bool,
    ) -> None:
        self.sock = sock
        self.runner = runner
        self.encoder = encoder
        self.max_result = max_result
        #: A leased process: a large result's segment goes to the worker's store first.
        self.deposit = deposit

    def frame(self, done: Done) -> bytearray:
        """*done* as a frame, whatever it holds: a Done too large or unencodable becomes
        one that says so."""
        encoder = self.encoder
        try:
            out = encode_frame(encoder, done)
        except BaseException as exc:  # an unencodable message: report it, never die
            out = encode_frame(
                encoder,
                self.runner._failed(
                    Run(done.seq, "", "", None, b""), SERIALIZATION, "cannot encode the reply", exc
                ),
            )
        if len(out) - _HEADER.size > self.max_result + FRAME_MARGIN:  # a failure's details
            out = encode_frame(
                encoder,
                Done(
                    done.seq,
                    done.status,
                    message=f"{done.message} (its details, {len(out)} bytes, are too large "
                    "to send)",
                ),
            )
        return out

    def __call__(self, done: Done) -> bool:
        """Send *done* to the worker (its result's segment first); False when it is gone."""
        runner = self.runner
        if self.deposit and runner.segment >= 0:
            done = runner.deposit(done)
        out = self.frame(done)
        try:
            if runner.segment >= 0:
                assert runner.channel is not None
                try:
                    segments.send_fds(runner.channel, RESULT_TAG, [runner.segment])
                finally:
                    os.close(runner.segment)
                    runner.segment = -1
            self.sock.sendall(out)
        except OSError:
            return False
        return True


class _Source:
    """A socket Run frames come on: what has been read of it, and (a lane's) the answer
    not yet written."""

    __slots__ = ("buffer", "limit", "out", "sock")

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        #: The largest frame it may send.
        self.limit = limit
        self.buffer = bytearray()
        self.out = memoryview(b"")

    def frame(self) -> bytearray | None:
        """The next whole frame's body, taken from the buffer; None until one is there.
        Raises ValueError for a frame past the limit."""
        buffer = self.buffer
        end = frame_end(buffer, self.limit)
        if not end:
            return None
        body = buffer[_HEADER.size : end]
        del buffer[:end]
        return body

    def fill(self) -> bool:
        """Read what has come (the socket is readable); False at its end."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.buffer += data
        return bool(data)

    def flush(self) -> bool:
        """Write what it can of the answer (the socket does not block); False when the
        peer is gone."""
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.out = self.out[sent:]
        return True


def _serve_lanes(
    sock: socket.socket,
    first: socket.socket,
    runner: _Runner,
    decoder: msgspec.msgpack.Decoder[Run],
    answer: _Answers,
) -> None:
    """Serve the worker's socket and the lanes until the worker closes its socket.

    One call at a time: the worker's first (so one of its calls waits for at most one
    lane's), then each lane in turn. A lane is read only once its last answer is
    written, so it holds at most one answer here, however slowly its client reads; a
    lane that breaks the protocol, or closes, is dropped.
    """
    import selectors

    selector = selectors.DefaultSelector()
    worker = _Source(sock, 1 << 62)  # the worker's frames are trusted
    selector.register(sock, selectors.EVENT_READ, worker)
    lanes: collections.deque[_Source] = collections.deque()
    limit = answer.max_result + FRAME_MARGIN

    def add(lane: socket.socket) -> bool:
        if len(lanes) >= MAX_LANES:
            lane.close()
            return False
        source = _Source(lane, limit)
        selector.register(lane, selectors.EVENT_READ, source)
        lanes.append(source)
        return True

    def drop(source: _Source) -> None:
        selector.unregister(source.sock)
        source.sock.close()
        lanes.remove(source)

    def wait() -> bool:
        """Until some socket is ready; False when the worker's closed."""
        for key, events in selector.select():
            source: _Source = key.data
            alive = True
            if events & selectors.EVENT_WRITE:
                alive = source.flush()
                if alive and not source.out:
                    selector.modify(source.sock, selectors.EVENT_READ, source)
            if alive and events & selectors.EVENT_READ:
                alive = source.fill()
            if not alive:
                if source is worker:
                    return False
                drop(source)
        return True

    add(first)
    while True:
        body = worker.frame()
        if body is not None:
            task = decoder.decode(body)
            del body
            if task.method == LANE:
                lane = runner.lane(task)
                if lane is None:
                    refusal = "this process holds no actor"
                else:
                    refusal = "" if add(lane) else f"this process serves {MAX_LANES}, its most"
                done = _lane_taken(task, refusal)
            else:
                done = runner.run(task)
            if not answer(done):
                return
            continue
        for source in list(lanes):
            if source.out:
                continue
            try:
                body = source.frame()
                if body is None:
                    continue
                call = decoder.decode(body)
            except (ValueError, msgspec.DecodeError):
                drop(source)
                continue
            lanes.remove(source)  # its turn is over: the others come first
            lanes.append(source)
            done = runner.lane_call(call)
            source.out = memoryview(answer.frame(done))
            if done.status == TIMED_OUT:
                _end_after(source, sock)  # (never returns)
            if not source.flush():
                drop(source)
            elif source.out:  # not read until it is written
                selector.modify(source.sock, selectors.EVENT_WRITE, source)
            break
        else:
            if not wait():
                return


def _end_after(source: _Source, worker: socket.socket) -> NoReturn:
    """A lane's call ran past its timeout: end the process as the worker ends one that
    overran (SIGALRM); its actor is created again or dies, as the worker decides.

    The worker is told first (its socket closes), so that it sends no call here after
    the lane's client has its answer (a moment to leave) and calls again."""
    with contextlib.suppress(OSError):
        worker.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        source.sock.settimeout(1.0)
        source.sock.sendall(source.out)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGALRM)
    os._exit(1)  # (not reached: SIGALRM ends the process first)
