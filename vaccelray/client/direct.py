"""A calling thread's own pool process: its tasks written to it and read from it directly.

A worker on this host leases a pool process to a client
(:mod:`vaccelray.worker.leases`); the thread that waits on its calls then
writes each task to that process as a ``Run`` frame and reads its ``Done``
itself, with the worker out of the path: one hop each way instead of two, and
no event loop on the way. Each ``Done`` is turned into the reply the worker
would have sent for the task (:func:`vaccelray.worker.replies.outcome_reply`),
so the client takes it as any lane's reply: a result, a raised error, a
result kept in the worker's store (the process hands large ones to the
worker), or a lost process (then the worker says how it ended, and the task
is retried as any crashed task).

Only tasks that need nothing of the worker itself go this way: no objects
among the arguments, no vAccel session, no backend requirement.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Final

import msgspec

from vaccelray.client.lane import Lane, LaneOutcome
from vaccelray.client.objects import INLINE
from vaccelray.client.remote import FunctionSpec
from vaccelray.errors import RPCError, TransportError
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.connection import ResponseReceived
from vaccelray.protocol.services import SUBMIT
from vaccelray.segments import kept_from
from vaccelray.worker.pool import DEFAULT_MAX_FUNCTIONS, PoolProcessLost, TaskTimedOut
from vaccelray.worker.poolchild import FRAME_MARGIN, Done, Run, encode_frame, frame_end
from vaccelray.worker.replies import lost_reply, outcome_reply

__all__ = ["DirectLane", "DoneFrames", "fetch_lane", "handed"]

log = logging.getLogger("vaccelray.client")

_HEADER: Final = struct.Struct(">I")
#: A result at least this large goes to the worker's store (as for a Submit's ``keep``).
_SEGMENT_MIN: Final = kept_from(INLINE)


def handed(leased: wire.Leased, timeout: float) -> socket.socket:
    """The socket *leased* names, fetched from the worker's handoff (*timeout* s)."""
    if not leased.path.startswith("@"):  # a worker names an abstract socket
        raise TransportError(f"the worker named a handoff this client cannot use: {leased.path}")
    handoff = socket.socket(socket.AF_UNIX)
    with handoff:
        handoff.settimeout(timeout)
        handoff.connect("\0" + leased.path[1:])
        handoff.sendall(leased.lease_id.encode("ascii") + leased.ticket)
        answer, fds, _, _ = socket.recv_fds(handoff, 16, 1)
    if answer != b"ok" or len(fds) != 1:
        for fd in fds:
            socket.close(fd)
        raise TransportError(f"the worker did not hand over lease {leased.lease_id}")
    return socket.socket(fileno=fds[0])


def fetch_lane(
    leased: wire.Leased,
    max_message_size: int,
    timeout: float,
    ended: Callable[[str], str],
    owner: int,
) -> DirectLane:
    """Thread *owner*'s lane to the process *leased* names: its socket fetched from the
    worker's handoff, then the process's first frame awaited (it has started; *timeout* s
    for each step). *ended(lease_id)* asks the worker how a lost process ended (it blocks)."""
    sock = handed(leased, timeout)
    try:
        sock.settimeout(timeout)
        hello = b""
        while len(hello) < _HEADER.size:
            more = sock.recv(_HEADER.size - len(hello))
            if not more:
                raise TransportError("the leased process ended before it started")
            hello += more
        if hello != _HEADER.pack(0):
            raise TransportError("the leased process did not start as one")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return DirectLane(sock, leased, max_message_size, ended, owner)


class DoneFrames:
    """A lane's codec to a pool process: Run frames out, numbered; Done frames in, each
    read as the reply the worker would have sent (:meth:`reply`, by the subclass)."""

    def __init__(self, max_frame: int, max_message_size: int) -> None:
        #: The largest frame a Done may come in.
        self._max_frame = max_frame
        self.max_message_size = max_message_size
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Done)
        self._seq = itertools.count(1)
        self._buffer = bytearray()
        #: Each outstanding call's name, by its Run's seq.
        self.calls: dict[int, str] = {}

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> ResponseReceived | None:
        """The reply of the next whole Done, or None until one has arrived (ValueError:
        an oversized frame)."""
        buffer = self._buffer
        end = frame_end(buffer, self._max_frame)
        if not end:
            return None
        done = self._decoder.decode(memoryview(buffer)[_HEADER.size : end])
        del buffer[:end]
        self.calls.pop(done.seq, None)
        try:
            payload = self.reply(done)
        except RPCError as exc:
            return ResponseReceived(done.seq, exc.code, exc.message, exc.details, b"")
        return ResponseReceived(done.seq, 0, "", (), payload)

    def reply(self, done: Done) -> bytes:
        """The encoded reply *done* is; raises the RPCError it is answered with instead."""
        raise NotImplementedError


class _LeasedProcess(DoneFrames):
    """Run frames out, Done frames in, as the worker's Submit replies."""

    def __init__(self, max_message_size: int) -> None:
        # A Done carries at most an inline result and the details of a failure.
        super().__init__(_SEGMENT_MIN + FRAME_MARGIN, max_message_size)
        #: Digests of the functions the process holds, least recently used first.
        self._known: collections.OrderedDict[str, None] = collections.OrderedDict()

    def run(self, spec: FunctionSpec, args: bytes, timeout: float | None) -> tuple[int, bytearray]:
        """The Run frame of *spec* called with the pickled *args*, and its seq."""
        known = self._known
        first = spec.digest not in known
        known[spec.digest] = None
        known.move_to_end(spec.digest)
        forget = []
        while len(known) > DEFAULT_MAX_FUNCTIONS:
            forget.append(known.popitem(last=False)[0])
        seq = next(self._seq)
        run = Run(
            seq,
            spec.digest,
            spec.name,
            spec.pickled if first else None,
            args,
            forget=tuple(forget),
            segment_min=_SEGMENT_MIN,
            timeout=timeout or 0.0,
        )
        self.calls[seq] = spec.name
        return seq, encode_frame(self._encoder, run)

    def reply(self, done: Done) -> bytes:
        """A Submit's reply; a result the process handed to the worker's store is kept."""
        if done.kept:
            return SUBMIT.reply.encode(wire.TaskDone(b"", done.kept, done.segment))
        return outcome_reply(done, SUBMIT.method, self.max_message_size)

    def lost(self, seq: int, status: str) -> LaneOutcome:
        """What task *seq* ends with when its process ended as *status* says."""
        name = self.calls.pop(seq)
        lost: PoolProcessLost
        if status.endswith("signal SIGALRM"):  # the process's own timer: see poolchild
            lost = TaskTimedOut(f"{name} ran past its timeout")
        else:
            lost = PoolProcessLost(f"the pool process running {name} {status}")
        try:
            return lost_reply(lost)
        except RPCError as exc:
            return exc


class DirectLane(Lane):
    """A lane to a leased pool process (see the module's text)."""

    def __init__(
        self,
        sock: socket.socket,
        leased: wire.Leased,
        max_message_size: int,
        ended: Callable[[str], str],
        owner: int,
    ) -> None:
        super().__init__(sock, max_message_size, owner)
        self.lease_id = leased.lease_id
        self._process = _LeasedProcess(max_message_size)
        self._proto = self._process
        self._ended = ended
        #: Its calls were cancelled: the process is being killed, nothing is to be asked.
        self.abandoned = False
        #: When it was last given a task (``time.monotonic()``).
        self.used = time.monotonic()

    def send_task(
        self,
        spec: FunctionSpec,
        args: bytes,
        timeout: float | None,
        on_done: Callable[[LaneOutcome], None],
    ) -> bool:
        """Write a task; False (nothing sent) when the lane cannot take it."""
        self.used = time.monotonic()
        return self._send(on_done, self._process.run, spec, args, timeout)

    def _lost(self, error: BaseException) -> None:
        """The process is gone (or broke the protocol): each outstanding task ends as the
        worker would have answered it, once the worker has said how the process ended.

        Asked from a thread of its own: the reader holds the lane's lock, which the
        client's loop may be waiting for (closing the lane) while the question needs it.
        """
        if self.abandoned:  # its call was cancelled: nothing to ask, nothing to retry
            self._fail(asyncio.CancelledError())
            return
        log.debug("Lost the leased process of lease %s: %s", self.lease_id, error)
        self._close()
        pending, self._pending = self._pending, {}
        threading.Thread(
            target=self._answer_lost, args=(pending,), name="vaccelray-lease-lost", daemon=True
        ).start()

    def _answer_lost(self, pending: dict[int, Callable[[LaneOutcome], None]]) -> None:
        status = self._ended(self.lease_id)
        for seq, on_done in pending.items():
            on_done(self._process.lost(seq, status))
