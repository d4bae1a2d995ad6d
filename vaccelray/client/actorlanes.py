"""A calling thread's lane to an actor's process: its method calls written there directly.

A worker on this host hands a client a socket to an actor's process
(``LeaseActor``, see :mod:`vaccelray.worker.actors`); the thread that makes
blocking calls on that actor then writes each call to the process as a
``Run`` frame and reads its ``Done`` itself: the worker is out of the path.
The process takes the lanes' calls in turn with the worker's, one at a
time. Each ``Done`` becomes the reply the worker would have sent
(:func:`vaccelray.worker.replies.outcome_reply`), so the caller sees the
same results and errors either way.

A call goes this way only when every earlier request of its actor made
through the same handle has been answered, so no order can be broken (a
later request waits for it: see :mod:`vaccelray.client.actorcalls`), and
when it has no timeout of its own: past one, the worker answers
DEADLINE_EXCEEDED while the method runs on, which a lane cannot. A lane
ends with its actor's process: its outstanding call fails as lost with it
(:class:`~vaccelray.client.errors.ActorDiedError`), and the next call goes by
the worker, which knows whether the actor was created again.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from vaccelray.client.direct import DoneFrames, handed
from vaccelray.client.lane import Lane, LaneOutcome
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.services import CALL_ACTOR
from vaccelray.worker.pool import TaskTimedOut
from vaccelray.worker.poolchild import FRAME_MARGIN, TIMED_OUT, Done, Run, encode_frame
from vaccelray.worker.replies import lost_reply, outcome_reply

__all__ = ["ActorLane", "fetch_actor_lane"]


def fetch_actor_lane(
    leased: wire.Leased, actor_id: str, max_message_size: int, timeout: float, owner: int
) -> ActorLane:
    """Thread *owner*'s lane to actor *actor_id*'s process, fetched from the worker's
    handoff (*timeout* s)."""
    return ActorLane(handed(leased, timeout), actor_id, max_message_size, owner)


class _ActorProcess(DoneFrames):
    """Method calls out as Run frames, Done frames in as the worker's CallActor replies."""

    def __init__(self, actor_id: str, max_message_size: int) -> None:
        super().__init__(max_message_size + FRAME_MARGIN, max_message_size)
        self.actor_id = actor_id
        #: A call ran past its timeout: the process ends (no call goes there any more).
        self.ending = False

    def call(self, name: str, method: str, args: bytes) -> tuple[int, bytearray]:
        """The Run frame of *method* called with the pickled *args*, and its seq."""
        seq = next(self._seq)
        self.calls[seq] = name
        run = Run(seq, "", name, None, args, method=method)
        return seq, encode_frame(self._encoder, run)

    def reply(self, done: Done) -> bytes:
        """A CallActor's reply; past the lane's timeout, DEADLINE_EXCEEDED."""
        if done.status == TIMED_OUT:  # the process ends after it, as the worker's timer
            self.ending = True
            return lost_reply(TaskTimedOut(done.message))
        return outcome_reply(done, CALL_ACTOR.method, self.max_message_size)

    def lost(self, seq: int) -> RPCError:
        """What call *seq* ends with when the lane broke: its actor's process was lost."""
        name = self.calls.pop(seq)  # (each outstanding call was written: it is here)
        return RPCError(
            StatusCode.UNAVAILABLE,
            f"actor {self.actor_id} was lost while running {name}: its process ended",
            reason=Reason.ACTOR_DIED,
        )


class ActorLane(Lane):
    """A lane to an actor's process (see the module's text)."""

    def __init__(
        self, sock: socket.socket, actor_id: str, max_message_size: int, owner: int
    ) -> None:
        super().__init__(sock, max_message_size, owner)
        self._process = _ActorProcess(actor_id, max_message_size)
        self._proto = self._process
        #: When it was last given a call (``time.monotonic()``).
        self.used = time.monotonic()

    def send_call(
        self,
        name: str,
        method: str,
        args: bytes,
        on_done: Callable[[LaneOutcome], None],
    ) -> bool:
        """Write a method call; False (nothing sent) when the lane cannot take it."""
        if self._process.ending:  # (the next call asks for a lane to the new process)
            self.close_if_idle()
            return False
        self.used = time.monotonic()
        return self._send(on_done, self._process.call, name, method, args)

    def _lost(self, error: BaseException) -> None:
        """The process ended (or broke the protocol): the outstanding call was lost with it."""
        self._close()
        pending, self._pending = self._pending, {}
        for seq, on_done in pending.items():
            on_done(self._process.lost(seq))
