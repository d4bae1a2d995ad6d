"""Actors through the scheduler: placed on the least-loaded capable worker, calls pinned there.

``CreateActor`` goes where a task with the same needs would (the
least-loaded healthy worker with the backend and operations), registering
the class there first; a worker that refuses it for its actor bounds
(RESOURCE_EXHAUSTED) or never got it is passed over for the next. The
actor's later ``CallActor`` and ``KillActor`` go to that worker. The
scheduler forwards an actor's requests one after another, in the order they
arrived: each waits for the one before it to be answered (the actor runs one
call at a time anyway), so the order holds whatever the connections to the
workers do.

An actor is lost with its worker, or with its process (the worker says so:
see :mod:`vaccelray.worker.actors`). The scheduler alone restarts the actors
it places (it forwards them with no restarts of their own), so one loss makes
one restart and ``max_restarts`` counts them all: the call that noticed the
loss creates the actor again (constructor re-run; on another worker when its
worker was lost) while its ``max_restarts`` allows, else buries it. That call
fails with ``ACTOR_DIED`` when it may have run on the lost instance, else it
goes to the new one; the calls behind it wait their turn and go to the new
one. Killed, or failed in its constructor, an actor is dead for good. Actors belong
to the client connection that made them: bounded per connection
(``max_actors_per_connection``, RESOURCE_EXHAUSTED past it), killed on their
workers when it closes. Any connection that knows an actor's id (128 random
bits) may call it, as on a worker: the client's own blocking lanes do.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Final

import anyio
import anyio.abc
import msgspec

from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol import actors as wire
from vaccelray.protocol import tasks as task_wire
from vaccelray.protocol.services import CALL_ACTOR, CANCEL_ACTOR_CALL, CREATE_ACTOR, KILL_ACTOR
from vaccelray.scheduler.pool import WorkerPool, WorkerUnavailable
from vaccelray.scheduler.registry import WorkerRecord
from vaccelray.scheduler.tasks import Flight, NotServed, TaskRouter
from vaccelray.transport.server import CallContext, Method

__all__ = ["DEFAULT_MAX_ACTORS_PER_CONNECTION", "ActorRouter"]

log = logging.getLogger("vaccelray.routing")

#: Actors one client connection may have alive through the scheduler.
DEFAULT_MAX_ACTORS_PER_CONNECTION: Final = 64
#: Why recently dead actors died, kept to tell their later callers.
_GRAVES: Final = 1024
#: Seconds a KillActor of a closed connection's actor may take.
_KILL_TIMEOUT: Final = 5.0


def _died(actor_id: str, why: str) -> RPCError:
    return RPCError(StatusCode.ABORTED, f"actor {actor_id} {why}", reason=Reason.ACTOR_DIED)


class _Placed:
    """An actor as the scheduler knows it: its worker, its turn chain, its restarts."""

    def __init__(self, request: wire.CreateActor, function: bytes, owner: int) -> None:
        self.request = request
        self.function = function
        self.owner = owner
        self.restarts_left = request.max_restarts
        self.address: str | None = None
        self.instance = ""
        #: Set when the request before the newest one has been answered.
        self.tail = anyio.Event()
        self.tail.set()
        #: The calls here by call id: False while waiting their turn, True once forwarded.
        self.calls: dict[str, bool] = {}

    def turn(self) -> tuple[anyio.Event, anyio.Event]:
        """(the event to wait for, the event to set when done): taken in arrival order."""
        before, mine = self.tail, anyio.Event()
        self.tail = mine
        return before, mine


class ActorRouter:
    """CreateActor, CallActor and KillActor on the scheduler (beside a :class:`TaskRouter`)."""

    def __init__(
        self,
        pool: WorkerPool,
        tasks: TaskRouter,
        task_group: anyio.abc.TaskGroup,
        *,
        max_actors_per_connection: int = DEFAULT_MAX_ACTORS_PER_CONNECTION,
    ) -> None:
        self.pool = pool
        self.tasks = tasks
        self._task_group = task_group
        self.max_actors_per_connection = max_actors_per_connection
        #: The actors by id (random, unguessable: knowing one is the right to call it,
        #: as on a worker, so a client's other connections and its tasks may).
        self.actors: dict[str, _Placed] = {}
        self._graves: collections.OrderedDict[str, str] = collections.OrderedDict()

    def methods(self) -> dict[str, Method]:
        return {
            CREATE_ACTOR.method: Method(self._create),
            CALL_ACTOR.method: Method(self._call),
            KILL_ACTOR.method: Method(self._kill),
            CANCEL_ACTOR_CALL.method: Method(self._cancel_call),
        }

    # -- the table ------------------------------------------------------------------

    def holds_state(self, connection_id: int) -> bool:
        return any(p.owner == connection_id for p in self.actors.values())

    def connection_closed(self, connection_id: int) -> None:
        """A client connection closed: the actors it made are killed on their workers."""
        for key in [k for k, p in self.actors.items() if p.owner == connection_id]:
            placed = self.actors.pop(key)
            if placed.address is not None:
                self._task_group.start_soon(self._kill_on, placed.address, placed.request.actor_id)

    async def _kill_on(self, address: str, actor_id: str) -> None:
        request = KILL_ACTOR.request.encode(wire.KillActor(actor_id))
        try:
            await self.pool.call(
                address, KILL_ACTOR.service, KILL_ACTOR.method, request, timeout=_KILL_TIMEOUT
            )
        except (WorkerUnavailable, RPCError) as exc:
            log.info("Kill of actor %s on %s failed: %s", actor_id, address, exc)

    def _bury(self, key: str, placed: _Placed, why: str) -> None:
        if self.actors.get(key) is placed:
            del self.actors[key]
        self._graves[key] = why
        while len(self._graves) > _GRAVES:
            self._graves.popitem(last=False)

    def _find(self, key: str) -> _Placed:
        placed = self.actors.get(key)
        if placed is not None:
            return placed
        why = self._graves.get(key)
        if why is not None:
            raise _died(key, why)
        raise RPCError(
            StatusCode.NOT_FOUND, f"no actor {key} on this scheduler", reason=Reason.ACTOR_DIED
        )

    # -- CreateActor ------------------------------------------------------------------

    async def _create(self, payload: bytes, ctx: CallContext) -> bytes:
        request = CREATE_ACTOR.request.decode(payload)
        CREATE_ACTOR.check(request, 0)
        function = self.tasks.functions.get(request.digest).payload
        key = request.actor_id
        if key in self.actors or key in self._graves:
            raise RPCError(StatusCode.ALREADY_EXISTS, f"actor {request.actor_id} exists already")
        limit = self.max_actors_per_connection
        if limit and sum(1 for p in self.actors.values() if p.owner == ctx.connection_id) >= limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this connection made {limit} actors, its most (scheduler option "
                "--max-actors-per-connection)",
            )
        placed = _Placed(request, function, ctx.connection_id)
        self.actors[key] = placed
        before, mine = placed.turn()
        try:
            await before.wait()
            reply = await self._place(placed, ctx, ())
        except BaseException as exc:
            self._bury(key, placed, f"could not be created: {exc}")
            raise
        finally:
            mine.set()
        if self.actors.get(key) is not placed:  # killed, or its client gone, meanwhile
            assert placed.address is not None
            self._task_group.start_soon(self._kill_on, placed.address, request.actor_id)
        elif isinstance(CREATE_ACTOR.reply.decode(reply), task_wire.TaskFailed):
            self._bury(key, placed, "failed in its constructor")
        return reply

    async def _place(self, placed: _Placed, ctx: CallContext, exclude: Sequence[str]) -> bytes:
        """Create the actor on the best worker not in *exclude*; its CreateActor reply."""
        request = placed.request
        forward = CREATE_ACTOR.request.encode(
            msgspec.structs.replace(request, owner=str(placed.owner), max_restarts=0)
        )
        tried = list(exclude)
        last_error = ""
        while True:
            worker = self._pick(request, tried, last_error)
            tried.append(worker.address)
            try:
                reply = await self.tasks.run_on(
                    worker.address,
                    worker.instance,
                    request,
                    forward,
                    placed.function,
                    Flight(request.actor_id, request.name),
                    ctx,
                    CREATE_ACTOR,
                )
            except WorkerUnavailable as exc:
                if exc.sent:
                    raise _died(request.actor_id, f"lost its worker {exc.address}: {exc}") from exc
                last_error = f"{exc.address}: {exc}"
            except NotServed as exc:
                last_error = f"{exc.address}: {exc}"
            except RPCError as exc:
                if exc.reason is Reason.ACTOR_DIED and exc.code == StatusCode.UNAVAILABLE:
                    if placed.restarts_left <= 0:  # its process lost in its constructor
                        raise
                    placed.restarts_left -= 1
                    tried.remove(worker.address)  # the worker is fine: it may go there again
                    last_error = f"{worker.address}: {exc.message}"
                elif exc.code != StatusCode.RESOURCE_EXHAUSTED:
                    raise
                else:
                    last_error = f"{worker.address}: {exc.message}"
            else:
                placed.address, placed.instance = worker.address, worker.instance
                log.info("Actor %s %s is on %s", request.name, request.actor_id, worker.address)
                return reply
            log.info("Actor %s goes elsewhere: %s", request.actor_id, last_error)

    def _pick(self, request: wire.CreateActor, tried: list[str], last_error: str) -> WorkerRecord:
        """The least-loaded capable worker among those holding the fewest of our actors."""
        held = collections.Counter(p.address for p in self.actors.values() if p.address)
        open_ = [w.address for w in self.pool.registry if w.routable and w.address not in tried]
        fewest = min((held[a] for a in open_), default=0)
        crowded = [a for a in open_ if held[a] > fewest]
        if crowded:
            try:
                return self.tasks.pick(request, [*tried, *crowded], last_error)
            except RPCError:
                pass  # the lighter workers cannot take it: any capable one will do
        return self.tasks.pick(request, tried, last_error)

    # -- CallActor, KillActor ---------------------------------------------------------

    async def _call(self, payload: bytes, ctx: CallContext) -> bytes:
        request = CALL_ACTOR.request.decode(payload)
        CALL_ACTOR.check(request, 0)
        key = request.actor_id
        placed = self._find(key)
        call_id = request.call_id
        placed.calls[call_id] = False
        before, mine = placed.turn()
        try:
            await before.wait()
            if call_id not in placed.calls:  # cancelled while it waited
                raise RPCError(
                    StatusCode.CANCELLED, f"call {request.method} of actor {key} was cancelled"
                )
            placed.calls[call_id] = True
            while True:
                if self.actors.get(key) is not placed:  # died while this call waited
                    self._find(key)
                address = placed.address
                assert address is not None
                try:
                    return await self.pool.call(
                        address,
                        CALL_ACTOR.service,
                        CALL_ACTOR.method,
                        payload,
                        timeout=ctx.time_left(),
                    )
                except WorkerUnavailable as exc:
                    why = f"lost its worker {exc.address} ({exc})"
                    if exc.sent:
                        why = f"{why} while running {request.method}"
                    ran, exclude = exc.sent, [exc.address]
                except RPCError as exc:
                    if exc.reason is not Reason.ACTOR_DIED:
                        raise
                    why = exc.message.removeprefix(f"actor {key} ")
                    if exc.code not in (StatusCode.UNAVAILABLE, StatusCode.NOT_FOUND):
                        self._bury(key, placed, why)  # killed, or failed: dead for good
                        raise
                    ran, exclude = exc.code == StatusCode.UNAVAILABLE, []
                await self._restart(key, placed, why, ctx, exclude)
                if ran:
                    raise _died(key, why)
                # It never reached the lost instance: on to the new one (or the grave).
        finally:
            placed.calls.pop(call_id, None)
            mine.set()

    async def _cancel_call(self, payload: bytes, ctx: CallContext) -> bytes:
        """Drop a call waiting its turn here; for one forwarded, ask its worker."""
        request = CANCEL_ACTOR_CALL.request.decode(payload)
        CANCEL_ACTOR_CALL.check(request, 0)
        placed = self.actors.get(request.actor_id)
        forwarded = None if placed is None else placed.calls.get(request.call_id)
        if placed is None or forwarded is None:
            state = wire.CallState.ENDED
        elif not forwarded:
            del placed.calls[request.call_id]
            state = wire.CallState.DROPPED
        else:
            assert placed.address is not None
            try:
                return await self.pool.call(
                    placed.address,
                    CANCEL_ACTOR_CALL.service,
                    CANCEL_ACTOR_CALL.method,
                    payload,
                    timeout=ctx.time_left(),
                )
            except WorkerUnavailable:  # the call fails with its worker
                state = wire.CallState.ENDED
        return CANCEL_ACTOR_CALL.reply.encode(wire.ActorCallCancelled(state))

    async def _restart(
        self, key: str, placed: _Placed, why: str, ctx: CallContext, exclude: Sequence[str]
    ) -> None:
        """The actor was lost: create it again while its restarts allow, else bury it."""
        if placed.restarts_left <= 0:
            self._bury(key, placed, why)
            return
        placed.restarts_left -= 1
        log.warning(
            "Actor %s %s; creating it again (%d restarts left)", key, why, placed.restarts_left
        )
        try:
            reply = await self._place(placed, ctx, exclude)
        except Exception as error:
            self._bury(key, placed, f"{why} and could not be created again: {error}")
            return
        if self.actors.get(key) is not placed:  # killed, or its client gone, meanwhile
            assert placed.address is not None
            self._task_group.start_soon(self._kill_on, placed.address, key)
        elif isinstance(CREATE_ACTOR.reply.decode(reply), task_wire.TaskFailed):
            self._bury(key, placed, f"{why} and failed in its constructor again")

    async def _kill(self, payload: bytes, ctx: CallContext) -> bytes:
        request = KILL_ACTOR.request.decode(payload)
        KILL_ACTOR.check(request, 0)
        key = request.actor_id
        placed = self.actors.get(key)
        if placed is None:
            return KILL_ACTOR.reply.encode(wire.ActorKilled(False))
        self._bury(key, placed, "was killed")
        if placed.address is None:  # not placed yet: its CreateActor sees it gone
            return KILL_ACTOR.reply.encode(wire.ActorKilled(True))
        try:
            return await self.pool.call(
                placed.address,
                KILL_ACTOR.service,
                KILL_ACTOR.method,
                payload,
                timeout=ctx.time_left(),
            )
        except WorkerUnavailable:  # gone with its worker
            return KILL_ACTOR.reply.encode(wire.ActorKilled(True))
