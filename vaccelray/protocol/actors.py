"""Messages of the actor methods of ``vaccelray.v1.Worker``, as msgspec structs.

An actor is one instance of an offloaded class, living in its own pool
process on one worker. Its class travels like a task's function (registered
once by digest with ``RegisterFunction``); its constructor's and methods'
arguments and results are pickled fields, like a task's.

Methods (request → reply):

``CreateActor``  :class:`CreateActor` → :data:`~vaccelray.protocol.tasks.TaskReply`
    Place an instance: the actor exists from the moment the request is read
    (calls sent after it on the same connection queue behind its constructor);
    the reply comes once the constructor has run (``TaskDone`` with an empty
    result) or failed (``TaskFailed``: the actor is then dead). Past the
    worker's actor bounds: RESOURCE_EXHAUSTED at once.
``CallActor``    :class:`CallActor` → :data:`~vaccelray.protocol.tasks.TaskReply`
    Call a method; an actor's calls run one at a time in the order they
    arrive. A lost, dead or unknown actor: the reason ``ACTOR_DIED``, with
    UNAVAILABLE (lost with the call, which may have run), NOT_FOUND (unknown,
    or lost before the call: it did not run) or ABORTED (killed: dead for good).
``KillActor``    :class:`KillActor` → :class:`ActorKilled`
    Stop an actor: its process is killed, its pending calls fail (``ACTOR_DIED``).
``CancelActorCall``  :class:`CancelActorCall` → :class:`ActorCallCancelled`
    Cancel one call (by its ``call_id``): one waiting its turn is dropped (it
    fails CANCELLED); a running one runs on (a method is not interrupted)
    unless ``force``, which kills the actor's process: a loss like any other
    (the actor is created again while ``max_restarts`` allows, else it dies).
``LeaseActor``   :class:`LeaseActor` → :class:`~vaccelray.protocol.tasks.Leased`
    A socket to the actor's process itself, for a client on the worker's host
    (unix socket only): fetched from the handoff named, as a leased pool
    process's is (see :mod:`vaccelray.worker.leases`). The client writes
    method calls to it and reads their answers, the worker out of the path;
    the process takes them in turn with the worker's. The socket closes when
    the actor's process ends (a restart, a kill) or the leasing connection does.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import msgspec

from vaccelray.errors import RPCError, StatusCode

__all__ = [
    "MAX_ACTOR_ID",
    "MAX_CALL_ID",
    "MAX_METHOD_NAME",
    "METHOD_CALL",
    "METHOD_CANCEL_CALL",
    "METHOD_CREATE",
    "METHOD_KILL",
    "METHOD_LEASE",
    "ActorCallCancelled",
    "ActorKilled",
    "CallActor",
    "CallState",
    "CancelActorCall",
    "CreateActor",
    "KillActor",
    "LeaseActor",
    "check_fields",
]

METHOD_CREATE: Final = "CreateActor"
METHOD_CALL: Final = "CallActor"
METHOD_KILL: Final = "KillActor"
METHOD_CANCEL_CALL: Final = "CancelActorCall"
METHOD_LEASE: Final = "LeaseActor"

#: Characters an actor id may have (clients make 32 hex digits).
MAX_ACTOR_ID: Final = 64
#: Characters of a method name.
MAX_METHOD_NAME: Final = 256
#: Characters of a call id (clients make ``<pid>-<6 hex digits>-<count>``).
MAX_CALL_ID: Final = 64


class CreateActor(msgspec.Struct, array_like=True, frozen=True):
    #: Chosen by the client (random, unguessable): names the actor in every later call.
    actor_id: str = ""
    #: The class, registered with ``RegisterFunction`` under this digest.
    digest: str = ""
    name: str = ""
    #: cloudpickle of the constructor's ``(args, kwargs)``; empty for none.
    args: bytes = b""
    #: Times the actor is created again (constructor re-run) when its process is lost.
    max_restarts: int = 0
    #: The backend and operations the actor needs (as a task's).
    backend: str = ""
    ops: tuple[str, ...] = ()
    #: Who asked, when a scheduler forwards it (its client connection): the worker's
    #: per-connection bound counts each owner of a connection apart.
    owner: str = ""


class CallActor(msgspec.Struct, array_like=True, frozen=True):
    actor_id: str
    #: Chosen by the client, unique per client (as a task id); names the call in logs.
    call_id: str
    method: str
    #: cloudpickle of ``(args, kwargs)``; empty for a call without arguments.
    args: bytes = b""


class KillActor(msgspec.Struct, array_like=True, frozen=True):
    actor_id: str


class ActorKilled(msgspec.Struct, array_like=True, frozen=True):
    #: False when the worker held no such live actor.
    killed: bool


class CancelActorCall(msgspec.Struct, array_like=True, frozen=True):
    actor_id: str
    #: The ``CallActor.call_id`` of the call.
    call_id: str
    #: Kill the actor's process if the call runs (else a running call runs on).
    force: bool = False
    #: The call went to the actor's process directly (``LeaseActor``): the worker does
    #: not know it, and kills the process on ``force`` (answered KILLED).
    direct: bool = False


class LeaseActor(msgspec.Struct, array_like=True, frozen=True):
    actor_id: str


class CallState(enum.IntEnum):
    """What became of a call a CancelActorCall named."""

    #: Not waiting or running there (it ended, or never came): nothing done.
    ENDED = 0
    #: It was waiting its turn: dropped, it fails CANCELLED.
    DROPPED = 1
    #: It runs, and runs on (no ``force``): its answer will come.
    RUNNING = 2
    #: It was running: the actor's process was killed (``force``).
    KILLED = 3


class ActorCallCancelled(msgspec.Struct, array_like=True, frozen=True):
    state: CallState


def check_fields(request: Any, limit: int) -> None:
    """INVALID_ARGUMENT for an actor id or method name out of bounds (an Rpc's limits)."""
    actor_id: str = request.actor_id
    if not actor_id or len(actor_id) > MAX_ACTOR_ID:
        raise RPCError(
            StatusCode.INVALID_ARGUMENT,
            f"an actor id has 1 to {MAX_ACTOR_ID} characters, not {len(actor_id)}",
        )
    call_id: str = getattr(request, "call_id", "x")
    if not call_id or len(call_id) > MAX_CALL_ID:
        raise RPCError(
            StatusCode.INVALID_ARGUMENT,
            f"a call id has 1 to {MAX_CALL_ID} characters, not {len(call_id)}",
        )
    method: str = getattr(request, "method", "x")
    if not method or len(method) > MAX_METHOD_NAME or method.startswith("_"):
        raise RPCError(
            StatusCode.INVALID_ARGUMENT,
            f"{method[:40]!r} is not a public method name (1 to {MAX_METHOD_NAME} characters, "
            "not starting with '_')",
        )
