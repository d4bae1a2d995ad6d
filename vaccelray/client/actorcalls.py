"""The loop half of actors on a client: each actor's requests leave in the order they were made.

A worker runs an actor's calls in the order they arrive on the connection,
so the client sends them in the order they were made: one *line* per actor.
A request whose arguments are ready (pickled, no ref among them) while
nothing of its actor waits before it is written at once from the loop (no
asyncio task: the sync round trip stays short). Otherwise it waits in the
line, and one asyncio task per actor sends the line in order: it resolves
the refs among the arguments (:mod:`vaccelray.client.actorargs`), registers
the class before the constructor, then writes.
Nothing waits for a reply before the next request leaves, with one
exception: a request made while an earlier one of the same handle went by a
lane (the worker's, or the actor's process itself: see
:mod:`vaccelray.client.actorlanes`) and is not answered yet waits for that
answer, as the two paths do not keep each other's order.

Actor requests are not retried: an actor lives in one process of one worker,
and dies with the connection that created it. A lost connection fails them
with :class:`ActorDiedError`.

``ref.cancel()`` of a call (:meth:`ActorLines.cancel`) drops it while it
waits (here, at the scheduler or at the worker); a running method is not
interrupted, and ``cancel()`` says so (:class:`CallRunningError`) unless
``force=True``, which kills the actor's process: a loss like any other.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vaccelray.client.actorargs import resolved_actor_args
from vaccelray.client.errors import ActorDiedError, CallRunningError, TaskError
from vaccelray.client.outcomes import load_result, rpc_failure, task_failure
from vaccelray.client.refs import TaskRef, _settle
from vaccelray.client.remote import FunctionSpec, Options
from vaccelray.errors import Reason, RPCError, TransportError
from vaccelray.protocol import actors as wire
from vaccelray.protocol.services import (
    CALL_ACTOR,
    CANCEL_ACTOR_CALL,
    CREATE_ACTOR,
    KILL_ACTOR,
    Rpc,
)
from vaccelray.protocol.tasks import TaskDone
from vaccelray.transport.client import Client as Connection
from vaccelray.transport.client import Outcome

if TYPE_CHECKING:
    from vaccelray.client.core import Core

__all__ = ["ActorLines", "ActorRequest", "Kind", "encode_request"]


class Kind(enum.Enum):
    CREATE = CREATE_ACTOR
    CALL = CALL_ACTOR
    KILL = KILL_ACTOR


@dataclass(slots=True)
class ActorRequest:
    """One request of an actor on its way: its TaskRef, and what to send."""

    kind: Kind
    ref: TaskRef[Any]
    actor_id: str
    #: The class (CREATE), else None.
    spec: FunctionSpec | None
    #: The method (CALL), else "".
    method: str
    args: Sequence[object]
    kwargs: Mapping[str, object]
    #: Pickled arguments; None until the refs among them are resolved.
    payload: bytes | None
    options: Options
    #: ``ref.cancel()`` asks for it to stop: an error answer means it was stopped.
    cancelling: bool = False
    #: The earlier request it must not overtake (it went by a lane), until answered.
    after: TaskRef[Any] | None = None
    #: It went to the actor's process directly (the worker does not know it).
    direct: bool = False


class _Line:
    __slots__ = ("backlog", "sender")

    def __init__(self) -> None:
        self.backlog: collections.deque[ActorRequest] = collections.deque()
        self.sender: asyncio.Task[None] | None = None


class ActorLines:
    """The lines of the actors of one :class:`~vaccelray.client.core.Core` (on its loop)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._lines: dict[str, _Line] = {}
        #: The calls not answered yet, by task id (what ``ref.cancel()`` looks for).
        self.calls: dict[str, ActorRequest] = {}

    def track(self, request: ActorRequest) -> None:
        """Keep *request* (a call) findable by :meth:`cancel` until it is settled here."""
        self.calls[request.ref.task_id] = request

    def _end(
        self, request: ActorRequest, value: Any = None, error: BaseException | None = None
    ) -> None:
        """Settle *request*'s TaskRef: it is no longer a call to cancel."""
        self.calls.pop(request.ref.task_id, None)
        _settle(request.ref._future, value, error)

    def cancel(self, ref: TaskRef[Any], force: bool) -> bool:
        """Cancel an actor's call (on any thread but the loop's; blocks for the answer).

        True when it was dropped (or, *force*, its actor's process killed): waiting
        on *ref* raises TaskCancelledError. False when it had ended. Raises
        :class:`CallRunningError` when it runs (without *force*): it runs on.
        """
        request = self.calls.get(ref.task_id)
        if request is None:
            return False
        core = self.core
        core.check_blocking(f"cancel() of {ref.name}")
        request.cancelling = True
        lane = ref._lane
        if request.direct and force and lane is not None:
            lane.close(asyncio.CancelledError())  # its process is killed: no call goes there
        ask = asyncio.run_coroutine_threadsafe(self._cancel(request, force), core.loop)
        try:  # bounded by the cancel's own connect and call timeouts, unless the loop is gone
            state = ask.result(2 * core.connect_timeout + 5)
        except TimeoutError:
            ask.cancel()
            state = wire.CallState.ENDED
        if state in (wire.CallState.DROPPED, wire.CallState.KILLED):
            self._end(request, error=core._cancelled_error(ref.name))
            return True
        request.cancelling = False  # its answer, whatever it is, stands
        if state is wire.CallState.RUNNING:
            raise CallRunningError(
                f"{ref.name} is running: a running actor method is not interrupted; "
                "cancel(force=True) kills its actor (its other calls then go to the actor "
                "created again while max_restarts allows, else fail with ActorDiedError)"
            )
        return False

    async def _cancel(self, request: ActorRequest, force: bool) -> wire.CallState:
        ref, core = request.ref, self.core
        line = self._lines.get(request.actor_id)
        if line is not None and request in line.backlog:  # not sent: its turn skips it
            return wire.CallState.DROPPED if not ref.done() else wire.CallState.ENDED
        if request.direct and not force:  # it runs, or is about to: it is not dropped there
            return wire.CallState.RUNNING
        try:
            conn = await core.connection()
            reply = await conn.call_rpc(
                CANCEL_ACTOR_CALL,
                wire.CancelActorCall(request.actor_id, ref.task_id, force, request.direct),
                timeout=core.connect_timeout,
                metadata=core.metadata,
            )
        except (TransportError, RPCError):
            return wire.CallState.ENDED  # the call fails with the connection, or is answered
        return reply.state

    def put(self, request: ActorRequest) -> None:
        """Send *request* now when nothing of its actor waits, else queue it in its line."""
        line = self._lines.get(request.actor_id)
        conn = self.core._conn
        if (
            line is None
            and (request.after is None or request.after._future.done())
            and request.payload is not None
            and conn is not None
            and not conn.is_closed
            and (request.spec is None or request.spec.digest in self.core._registered)
        ):
            self._send(request, conn)
            return
        if line is None:
            line = self._lines[request.actor_id] = _Line()
        line.backlog.append(request)
        if line.sender is None:
            line.sender = self.core.loop.create_task(self._drain(request.actor_id, line))

    async def _drain(self, actor_id: str, line: _Line) -> None:
        core = self.core
        try:
            while line.backlog:
                request = line.backlog[0]
                if not request.ref.done():
                    try:
                        await _until_answered(request.after)
                        request.after = None  # (not holding its result any longer)
                        if request.payload is None:  # refs among them: their values
                            request.payload = await resolved_actor_args(
                                request.ref.name, request.args, request.kwargs, core.arg_limit
                            )
                        conn = await core.connection()
                        spec = request.spec
                        if spec is not None and spec.digest not in core._registered:
                            await core._register(conn, spec, request.options.timeout)
                        if not request.ref.done():  # cancelled meanwhile
                            self._send(request, conn)
                    except (TransportError, RPCError) as exc:
                        self._end(request, error=_failure(request, exc))
                    except Exception as exc:
                        self._end(request, error=exc)
                line.backlog.popleft()
        except asyncio.CancelledError:
            for request in line.backlog:
                self._end(request, error=core._cancelled_error(request.ref.name))
            raise
        finally:
            if self._lines.get(actor_id) is line:
                del self._lines[actor_id]

    def _send(self, request: ActorRequest, conn: Connection) -> None:
        core = self.core
        rpc: Rpc[Any, Any] = request.kind.value
        body = encode_request(request)
        try:
            core._running[request.ref.task_id] = conn.start_call(
                rpc.service,
                rpc.method,
                body,
                functools.partial(self._answered, request, conn),
                timeout=request.options.timeout if request.kind is Kind.CALL else None,
                metadata=core.metadata,
            )
        except (TransportError, RPCError) as exc:
            self._answered(request, conn, exc)

    def _answered(self, request: ActorRequest, conn: Connection, outcome: Outcome) -> None:
        core = self.core
        core._running.pop(request.ref.task_id, None)
        core._window_freed()
        if isinstance(outcome, TransportError):
            core._forget(conn)
        self.settle(request, outcome)

    def settle(self, request: ActorRequest, outcome: Outcome | bytes | BaseException) -> None:
        """Settle *request*'s TaskRef with its outcome (on any thread: a lane's too)."""
        ref = request.ref
        if isinstance(outcome, asyncio.CancelledError) or (
            request.cancelling and isinstance(outcome, RPCError)
        ):
            self._end(request, error=self.core._cancelled_error(ref.name))
            return
        try:
            if isinstance(outcome, BaseException):
                self._end(request, error=_failure(request, outcome))
            elif request.kind is Kind.KILL:
                self._end(request, KILL_ACTOR.reply.decode(outcome).killed)
            else:
                reply = CALL_ACTOR.reply.decode(outcome)
                if isinstance(reply, TaskDone):
                    value = (
                        None if request.kind is Kind.CREATE else load_result(reply.result, ref.name)
                    )
                    self._end(request, value)
                else:
                    self._end(request, error=task_failure(reply, ref.name))
        except Exception as exc:  # raised here, it would break the connection's read loop
            self._end(request, error=exc)

    def cancel_all(self) -> None:
        for line in list(self._lines.values()):
            if line.sender is not None:
                line.sender.cancel()

    async def aclose(self) -> None:
        senders = [line.sender for line in self._lines.values() if line.sender is not None]
        self.cancel_all()
        if senders:
            await asyncio.gather(*senders, return_exceptions=True)


def encode_request(request: ActorRequest) -> bytes:
    payload = request.payload or b""
    if request.kind is Kind.CREATE:
        spec, options = request.spec, request.options
        assert spec is not None
        return CREATE_ACTOR.request.encode(
            wire.CreateActor(
                request.actor_id,
                spec.digest,
                spec.name,
                payload,
                options.max_restarts,
                options.backend or "",
                options.ops,
            )
        )
    if request.kind is Kind.CALL:
        return CALL_ACTOR.request.encode(
            wire.CallActor(request.actor_id, request.ref.task_id, request.method, payload)
        )
    return KILL_ACTOR.request.encode(wire.KillActor(request.actor_id))


async def _until_answered(ref: TaskRef[Any] | None) -> None:
    """Until *ref* (None: nothing) is answered, its lane read by a helper thread."""
    if ref is not None and not ref._future.done():
        ref._read_elsewhere()
        await asyncio.wait([asyncio.wrap_future(ref._future)])


def _failure(request: ActorRequest, exc: BaseException) -> BaseException:
    """What *request* raises for a transport or status error."""
    name = request.ref.name
    if isinstance(exc, RPCError):
        if exc.reason is Reason.ACTOR_DIED:
            return ActorDiedError(f"{name}: {exc.message}", task=name)

        return rpc_failure(exc, name, request.options)
    if isinstance(exc, TransportError):
        return ActorDiedError(
            f"{name}: the connection to the actor's worker was lost ({exc}); the actor died "
            "with it",
            task=name,
        )
    if isinstance(exc, TaskError):
        return exc
    return exc
