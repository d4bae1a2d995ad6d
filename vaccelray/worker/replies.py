"""What a pool process's answer (or its loss) is on the wire: one task's or actor call's reply."""

from __future__ import annotations

from typing import Final

from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.limits import check_response_size
from vaccelray.protocol.services import SUBMIT
from vaccelray.worker.pool import PoolProcessLost, TaskTimedOut
from vaccelray.worker.poolchild import OK, RAISED, REJECTED, SERIALIZATION, TOO_LARGE, Done

__all__ = ["crashed", "lost_reply", "outcome_name", "outcome_reply"]

_FAILURE: Final = {RAISED: wire.FailureKind.RAISED, SERIALIZATION: wire.FailureKind.SERIALIZATION}

#: What a task's end is called in the metrics, by its status.
_OUTCOMES: Final = {
    OK: "ok",
    RAISED: "raised",
    SERIALIZATION: "unpicklable",
    REJECTED: "rejected",
    TOO_LARGE: "too_large",
}


def outcome_reply(outcome: Done | PoolProcessLost, method: str, max_message_size: int) -> bytes:
    """The encoded TaskReply of *outcome*; raises the RPCError it is answered with instead.

    A run past its timeout is DEADLINE_EXCEEDED, a result too large to send
    RESOURCE_EXHAUSTED; a lost process is a ``CRASHED`` failure.
    """
    if isinstance(outcome, PoolProcessLost):
        return lost_reply(outcome)
    if outcome.status == TOO_LARGE:
        raise RPCError(StatusCode.RESOURCE_EXHAUSTED, outcome.message)
    return check_response_size(method, _reply(outcome), max_message_size)


def lost_reply(lost: PoolProcessLost) -> bytes:
    """The encoded TaskReply of a task whose process was lost: a ``CRASHED`` failure; past its
    timeout, the DEADLINE_EXCEEDED RPCError raised instead."""
    if isinstance(lost, TaskTimedOut):
        raise RPCError(
            StatusCode.DEADLINE_EXCEEDED,
            f"{lost}, the worker's task timeout (worker option --task-timeout)",
        )
    return crashed(lost)


def outcome_name(outcome: Done | PoolProcessLost) -> str:
    """What *outcome* is counted as in the metrics."""
    if isinstance(outcome, TaskTimedOut):
        return "timed_out"
    if isinstance(outcome, PoolProcessLost):
        return "process_lost"
    return _OUTCOMES.get(outcome.status, "other")


def crashed(lost: PoolProcessLost) -> bytes:
    return SUBMIT.reply.encode(wire.TaskFailed(wire.FailureKind.CRASHED, str(lost)))


def _reply(done: Done) -> bytes:
    if done.status == OK:
        return SUBMIT.reply.encode(wire.TaskDone(done.result))
    kind = _FAILURE.get(done.status, wire.FailureKind.REJECTED)
    error = None
    if done.error is not None:
        e = done.error
        error = wire.RemoteError(e.module, e.qualname, e.message, e.args, e.traceback, e.attributes)
    return SUBMIT.reply.encode(wire.TaskFailed(kind, done.message, error))
