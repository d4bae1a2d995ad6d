"""Actors on a worker: instances of offloaded classes, each in a pool process of its own.

``CreateActor`` places an actor: a one-process :class:`~vaccelray.worker.pool.Pool`
(sandboxed and limited like the task pool's processes, beside it) whose
process runs the class's constructor and keeps the instance. ``CallActor``
calls a method of it. The worker keeps each actor's calls in a bounded queue
and hands its process one call at a time, in the order the calls arrived: a
method never runs beside another method of the same actor, and later calls
see what earlier ones did.

An actor whose process is lost (it crashed, was killed, ran past the task
timeout) is created again, constructor re-run, while ``max_restarts`` allows:
the call it was running fails, the queued ones run on the new instance.
Otherwise it is dead: its running and queued calls, and every later one,
fail with the reason ``ACTOR_DIED``. ``KillActor``, and the close of the
connection that created it, kill it the same way.

The status code says what its caller may do (a scheduler restarts the actors
it placed itself, so it forwards them with no restarts of their own):
UNAVAILABLE, the actor was *lost* (its process, or the worker stopping) with
the call accepted, which may have run; NOT_FOUND, no actor by that id here,
never one or one lost before the call came, which did not run; ABORTED, it
was killed or its constructor failed: dead for good. A lost actor's id may
be created again; a dead one's may not.

A client on the worker's host may also call an actor's process directly,
on a *lane* (``LeaseActor``, see :mod:`vaccelray.worker.leases`): the worker
hands the process one end of a socket pair, in turn with the actor's calls,
and the client the other. The process takes the worker's calls and the lanes'
one at a time (:mod:`vaccelray.worker.poolchild`); the worker does not see
lane calls. As one of its calls may then wait in the process behind a lane's,
which is bounded by the task timeout too, the worker allows an actor with
lanes twice the task timeout per call. A lane ends with its actor's process.

Bounds: ``max_actors`` on the worker and ``max_actors_per_connection`` per
client connection (a CreateActor past either is refused RESOURCE_EXHAUSTED at
once), and ``max_pending_calls`` queued per actor (likewise). Behind a
scheduler, one connection carries many clients: ``CreateActor.owner`` names
the scheduler's client, counted apart (the worker-wide bound holds whatever
a caller claims).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import anyio
from anyio.abc import TaskGroup

from vaccelray.auth import TokenCheck
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.functions import FunctionCache
from vaccelray.protocol import actors as wire
from vaccelray.protocol import tasks as task_wire
from vaccelray.protocol.services import (
    CALL_ACTOR,
    CANCEL_ACTOR_CALL,
    CREATE_ACTOR,
    KILL_ACTOR,
    WORKER,
)
from vaccelray.transport.server import Answer, CallContext, Method, Service
from vaccelray.worker.pool import Pool, PoolProcessLost, TaskTimedOut
from vaccelray.worker.poolchild import LANE, OK, Done
from vaccelray.worker.replies import outcome_reply
from vaccelray.worker.sandbox import Sandbox

if TYPE_CHECKING:
    from vaccelray.worker.pool import _Job

__all__ = [
    "DEFAULT_MAX_ACTORS",
    "DEFAULT_MAX_ACTORS_PER_CONNECTION",
    "DEFAULT_MAX_PENDING_CALLS",
    "ActorService",
    "running_actors",
]

log = logging.getLogger("vaccelray.actors")

#: Actors alive on a worker, and created by one connection.
DEFAULT_MAX_ACTORS: Final = 16
DEFAULT_MAX_ACTORS_PER_CONNECTION: Final = 8
#: Calls queued for one actor.
DEFAULT_MAX_PENDING_CALLS: Final = 1024
#: Why recently dead actors died, kept to tell their later callers.
_GRAVES: Final = 1024
#: The constructor's ``Run.method``.
_CREATE: Final = "__init__"


def _died(actor_id: str, why: str, *, lost: bool) -> RPCError:
    """The error of a call the actor had accepted: UNAVAILABLE when *lost*, else ABORTED."""
    code = StatusCode.UNAVAILABLE if lost else StatusCode.ABORTED
    return RPCError(code, f"actor {actor_id} {why}", reason=Reason.ACTOR_DIED)


class _Call:
    """One method call (the server's *callback* kind of work): it waits its turn in its
    actor's queue, runs, and answers through ``done``."""

    __slots__ = ("actor", "args", "call_id", "done", "lane", "method")
    #: What answers it, given by the server when it starts it; None once it ended (answered,
    #: or given up by the server: its deadline, its client gone, shutdown).
    done: Callable[[Answer], None] | None

    def __init__(self, actor: _Actor, call_id: str, method: str, args: bytes) -> None:
        self.actor = actor
        self.call_id = call_id
        self.method = method
        self.args = args
        #: The lane a LANE call hands the process (the pool closes it).
        self.lane: socket.socket | None = None

    def start(self, done: Callable[[Answer], None]) -> None:
        self.done = done
        self.actor.queue.append(self)
        self.actor._next()

    def cancel(self) -> None:
        """The server answered it: dropped at its turn; a running method is not interrupted."""
        self.done = None

    def end(self, answer: Answer) -> None:
        """Answer it, unless it ended already."""
        done, self.done = self.done, None
        if done is not None:
            done(answer)


class _Actor:
    """One actor: its process (a one-process pool), its queue of calls, its restarts."""

    def __init__(
        self,
        service: ActorService,
        request: wire.CreateActor,
        function: bytes,
        owner: tuple[int, str],
        created: asyncio.Future[bytes],
    ) -> None:
        self.service = service
        self.id = request.actor_id
        self.name = request.name
        self.request = request
        self.function = function
        self.owner = owner
        self.restarts_left = request.max_restarts
        self.queue: collections.deque[_Call] = collections.deque()
        #: The call its process runs, and its pool job; None while idle or (re)constructing.
        self.running: _Call | None = None
        self.job: _Job | None = None
        #: The reply of CreateActor until the first constructor has run.
        self.created: asyncio.Future[bytes] | None = created
        self.constructing = True
        #: Why it died; None while alive.
        self.death: str | None = None
        #: It died for the loss of its process (not killed, not failed): it may be created again.
        self.lost = False
        #: Its pool's start has ended: from then on, whoever buries it closes the pool.
        self.started = False
        #: Its process serves lanes (its calls may wait there behind a lane's).
        self.laned = False
        self.pool = Pool(
            1,
            env=service.env,
            max_message_size=service.max_message_size,
            sandbox=service.sandbox,
            on_lost=self._lost,
        )

    def label(self) -> str:
        return f"{self.name} {self.id}"

    # -- construction ----------------------------------------------------------

    def construct(self) -> None:
        """Run the constructor on the (new) process; calls wait until it has run."""
        self.constructing = True
        self.laned = False  # a new process: the lanes ended with the old one
        request = self.request
        try:
            self.pool.submit(
                request.digest,
                request.name,
                self.function,
                request.args,
                on_done=self._constructed,
                timeout=self.service.task_timeout or None,
                method=_CREATE,
                # A process lost while idle (a lane's call) is reported after a wait, in
                # which a call may have been queued: the constructor runs first.
                first=True,
            )
        except PoolProcessLost as exc:
            self.die(f"could not start: {exc}", lost=True)

    def _constructed(self, outcome: Done | PoolProcessLost) -> None:
        if isinstance(outcome, PoolProcessLost):
            return  # _lost decides (a restart, or death)
        created, self.created = self.created, None
        if outcome.status != OK:
            error = outcome.error
            what = f": {error.qualname}: {error.message}" if error is not None else ""
            if created is not None and not created.done():
                created.set_result(outcome_reply(outcome, CREATE_ACTOR.method, 1 << 62))
            self.die(f"failed in its constructor ({outcome.message}{what})")
            return
        self.constructing = False
        if created is not None and not created.done():
            created.set_result(CREATE_ACTOR.reply.encode(task_wire.TaskDone(b"")))
        log.info("Actor %s ready (pool process %s)", self.label(), self.pool.pids)
        self._next()

    # -- calls -----------------------------------------------------------------

    def call(self, request: wire.CallActor) -> _Call:
        return self._new_call(request.call_id, request.method, request.args)

    def lane(self, sock: socket.socket) -> _Call:
        """The call that hands its process the lane *sock* (in turn with the calls; with no
        id, which no CancelActorCall can name)."""
        call = self._new_call("", LANE, b"")
        call.lane = sock
        return call

    def _new_call(self, call_id: str, method: str, args: bytes) -> _Call:
        """A call to queue, unless its actor's queue is full (RESOURCE_EXHAUSTED)."""
        limit = self.service.max_pending_calls
        if limit and len(self.queue) >= limit:
            # Calls given up while waiting (deadline, client gone) leave the queue only
            # here or at their turn: no callback per call for the rare case.
            self.queue = collections.deque(c for c in self.queue if c.done is not None)
            if len(self.queue) >= limit:
                raise RPCError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"actor {self.label()} has {limit} calls waiting, its most",
                )
        return _Call(self, call_id, method, args)

    def _timeout(self, call: _Call) -> float | None:
        """*call*'s timeout on the worker (see the module for why lanes double it); a LANE
        call's is the lane's calls' (see ``Pool.submit``)."""
        timeout = self.service.task_timeout
        return (2 * timeout if self.laned and call.lane is None else timeout) or None

    def _next(self) -> None:
        if self.running is not None or self.constructing or self.death is not None:
            return
        while self.queue:
            call = self.queue.popleft()
            if call.done is None:
                continue
            self.running = call
            try:
                self.job = self.pool.submit(
                    "",
                    f"{self.name}.{call.method}",
                    b"",
                    call.args,
                    on_done=functools.partial(self._answered, call),
                    timeout=self._timeout(call),
                    method=call.method,
                    lane=call.lane,
                )
                call.lane = None
            except PoolProcessLost as exc:
                self.running = None
                self.die(f"was lost: {exc}", lost=True)
            return

    def _answered(self, call: _Call, outcome: Done | PoolProcessLost) -> None:
        self.running = None
        if isinstance(outcome, PoolProcessLost) and not isinstance(outcome, TaskTimedOut):
            call.end(_died(self.id, f"was lost while running {call.method}: {outcome}", lost=True))
            return  # _lost decides what comes next
        if call.method == LANE and isinstance(outcome, Done):
            self.laned = self.laned or outcome.status == OK
            call.end(b"" if outcome.status == OK else _no_lane(self, outcome.message))
        elif call.done is not None:
            try:
                answer: Answer = outcome_reply(
                    outcome, CALL_ACTOR.method, self.service.max_message_size
                )
            except Exception as exc:  # an error must not escape into the pool's read
                answer = exc
            call.end(answer)
        if not isinstance(outcome, PoolProcessLost):
            self._next()

    def cancel_direct(self) -> wire.CallState:
        """A lane's call is cancelled with force: kill the process (a loss as any other)."""
        if self.death is not None or not self.laned:
            return wire.CallState.ENDED
        why = "was killed to stop a call of a lane (cancelled with force)"
        if self.restarts_left > 0:  # (calls made meanwhile wait for the new process)
            log.warning("Actor %s %s", self.label(), why)
            self.pool.kill_processes()
        else:
            self.die(why, lost=True)
        return wire.CallState.KILLED

    def cancel(self, call_id: str, force: bool) -> wire.CallState:
        """Drop the call *call_id* if it waits; if it runs, kill the process when *force*."""
        for call in self.queue:
            if call.call_id == call_id:
                self.queue.remove(call)
                call.end(
                    RPCError(
                        StatusCode.CANCELLED,
                        f"call {call.method} of actor {self.label()} was cancelled",
                    )
                )
                return wire.CallState.DROPPED
        running, job = self.running, self.job
        if running is None or running.call_id != call_id or job is None:
            return wire.CallState.ENDED
        if not force:
            return wire.CallState.RUNNING
        why = f"was killed to stop {running.method} (cancelled with force)"
        running.end(_died(self.id, why, lost=True))
        self.running = None
        if self.restarts_left > 0:
            log.warning("Actor %s %s", self.label(), why)
            self.constructing = True  # no call goes to the process: _lost restarts it
            self.pool.abort(job)
        else:  # dead at once: a scheduler may create it again under its id now
            self.die(why, lost=True)
        return wire.CallState.KILLED

    # -- loss and death ----------------------------------------------------------

    def _lost(self, status: str) -> bool:
        """Its process is gone (the pool's hook): True to create it again in a new one."""
        if self.death is not None:
            return False
        if self.restarts_left > 0:
            self.restarts_left -= 1
            log.warning(
                "Actor %s: its process %s; creating it again (%d restarts left)",
                self.label(),
                status,
                self.restarts_left,
            )
            self.construct()
            return True
        self.die(f"died: its process {status}", lost=True)
        return False

    def die(self, why: str, *, lost: bool = False, level: int = logging.WARNING) -> None:
        """Fail its calls, now and later; stop its process. *lost*: see the module."""
        if self.death is not None:
            return
        self.death, self.lost = why, lost
        log.log(level, "Actor %s %s", self.label(), why)
        created, self.created = self.created, None
        if created is not None and not created.done():
            created.set_exception(_died(self.id, why, lost=lost))
        calls = [self.running, *self.queue] if self.running is not None else list(self.queue)
        self.running = None
        self.queue.clear()
        for call in calls:
            call.end(_died(self.id, why, lost=lost))
        # Killed now, not once the pool's close runs: a lane's client, told of the death,
        # must find no process to answer its next call.
        self.pool.close(kill=True)
        self.service._buried(self)


def _no_lane(actor: _Actor, why: str) -> RPCError:
    return RPCError(StatusCode.RESOURCE_EXHAUSTED, f"actor {actor.label()}: {why}")


class ActorService:
    """The actors of one worker, by id; use through :func:`running_actors`."""

    def __init__(
        self,
        tg: TaskGroup,
        check: TokenCheck,
        functions: FunctionCache,
        check_requirements: Callable[[str, str, tuple[str, ...]], None],
        *,
        sandbox: Sandbox,
        env: Mapping[str, str],
        max_message_size: int,
        task_timeout: float,
        max_actors: int = DEFAULT_MAX_ACTORS,
        max_actors_per_connection: int = DEFAULT_MAX_ACTORS_PER_CONNECTION,
        max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
    ) -> None:
        self._tg = tg
        #: Its event loop (asyncio.get_running_loop() per call costs a getpid syscall).
        self.loop = asyncio.get_running_loop()
        self.check = check
        self.functions = functions
        self._check_requirements = check_requirements
        self.sandbox = sandbox
        self.env = dict(env)
        self.max_message_size = max_message_size
        self.task_timeout = task_timeout
        self.max_actors = max_actors
        self.max_actors_per_connection = max_actors_per_connection
        self.max_pending_calls = max_pending_calls
        self.actors: dict[str, _Actor] = {}
        #: Why recently dead actors died, and whether they were lost (see the module).
        self._graves: collections.OrderedDict[str, tuple[str, bool]] = collections.OrderedDict()
        self._closing = False

    def methods(self) -> dict[str, Method]:
        """CreateActor, CallActor and KillActor, for the worker's clients (token checked)."""
        return {
            CREATE_ACTOR.method: Method(self._create, future=True),
            CALL_ACTOR.method: Method(self._call, callback=True),
            KILL_ACTOR.method: Method(self._kill, inline=True),
            CANCEL_ACTOR_CALL.method: Method(self._cancel_call, inline=True),
        }

    def local_service(self) -> Service:
        """CallActor and KillActor for tasks and actors (the worker's private socket)."""
        return Service(
            WORKER.name,
            {
                CALL_ACTOR.method: Method(self._call_local, callback=True),
                KILL_ACTOR.method: Method(self._kill_local, inline=True),
            },
        )

    # -- bookkeeping --------------------------------------------------------------

    def owned_by(self, owner: tuple[int, str]) -> int:
        return sum(1 for a in self.actors.values() if a.owner == owner)

    def holds_state(self, connection_id: int) -> bool:
        """Whether the connection created actors that live (its idle close would kill them)."""
        return any(a.owner[0] == connection_id for a in self.actors.values())

    def connection_closed(self, connection_id: int) -> None:
        """A client connection closed: the actors it created die with it."""
        for actor in [a for a in self.actors.values() if a.owner[0] == connection_id]:
            actor.die("was killed: the connection that created it closed")

    def _buried(self, actor: _Actor) -> None:
        if self.actors.get(actor.id) is actor:
            del self.actors[actor.id]
        self._graves[actor.id] = (actor.death or "died", actor.lost)
        while len(self._graves) > _GRAVES:
            self._graves.popitem(last=False)
        if actor.started:  # else _start closes it when its start ends
            self._tg.start_soon(actor.pool.aclose)

    def _find(self, actor_id: str) -> _Actor:
        actor = self.actors.get(actor_id)
        if actor is not None:
            return actor
        grave = self._graves.get(actor_id)
        if grave is None:
            why, code = "is not on this worker", StatusCode.NOT_FOUND
        else:
            why, lost = grave
            code = StatusCode.NOT_FOUND if lost else StatusCode.ABORTED
        raise RPCError(code, f"actor {actor_id} {why}", reason=Reason.ACTOR_DIED)

    # -- methods ------------------------------------------------------------------

    def _create(self, payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        self.check.check(ctx)
        request = CREATE_ACTOR.request.decode(payload)
        CREATE_ACTOR.check(request, self.max_message_size)
        function = self.functions.get(request.digest).request
        self._check_requirements(request.name, request.backend, request.ops)
        if self._closing:
            raise RPCError(StatusCode.UNAVAILABLE, "the worker is shutting down")
        grave = self._graves.get(request.actor_id)
        if request.actor_id in self.actors or (grave is not None and not grave[1]):
            raise RPCError(StatusCode.ALREADY_EXISTS, f"actor {request.actor_id} exists already")
        if request.max_restarts < 0:
            raise RPCError(StatusCode.INVALID_ARGUMENT, "max_restarts must be >= 0")
        limit = self.max_actors
        if limit and len(self.actors) >= limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this worker holds {limit} actors, its most (worker option --max-actors)",
            )
        owner = (ctx.connection_id, request.owner)
        limit = self.max_actors_per_connection
        if limit and self.owned_by(owner) >= limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this connection made {limit} actors, its most (worker option "
                "--max-actors-per-connection)",
            )
        created: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        actor = _Actor(self, request, function.pickled, owner, created)
        self._graves.pop(request.actor_id, None)  # a lost one, created again
        self.actors[request.actor_id] = actor
        actor.construct()  # queued in its pool until the process is up
        self._tg.start_soon(self._start, actor)
        log.info("Creating actor %s", actor.label())
        return created

    async def _start(self, actor: _Actor) -> None:
        if actor.death is None:
            try:
                await actor.pool.start()
            except Exception as exc:
                actor.die(f"could not start its process: {exc}", lost=True)
        actor.started = True
        if actor.death is not None:  # it died while its process was being started
            await actor.pool.aclose()

    def _call(self, payload: bytes, ctx: CallContext) -> _Call:
        self.check.check(ctx)
        return self._call_local(payload, ctx)

    def _call_local(self, payload: bytes, ctx: CallContext) -> _Call:
        request = CALL_ACTOR.request.decode(payload)
        CALL_ACTOR.check(request, self.max_message_size)
        return self._find(request.actor_id).call(request)

    async def lane(self, actor_id: str, sock: socket.socket) -> None:
        """Hand the process of actor *actor_id* the lane *sock* (closed here in any case);
        raises RPCError when it takes none (no such actor, or it serves its most)."""
        try:
            actor = self._find(actor_id)
            call = actor.lane(sock)
        except BaseException:
            sock.close()
            raise
        taken: asyncio.Future[Answer] = self.loop.create_future()

        def answered(answer: Answer) -> None:
            if not taken.done():
                taken.set_result(answer)

        call.start(answered)
        try:
            answer = await taken
        finally:
            call.cancel()
            if call.lane is not None:  # dropped before its turn
                call.lane.close()
        if isinstance(answer, BaseException):
            raise answer

    def _kill(self, payload: bytes, ctx: CallContext) -> bytes:
        self.check.check(ctx)
        return self._kill_local(payload, ctx)

    def _kill_local(self, payload: bytes, ctx: CallContext) -> bytes:
        request = KILL_ACTOR.request.decode(payload)
        actor = self.actors.get(request.actor_id)
        if actor is not None:
            actor.die("was killed", level=logging.INFO)
        return KILL_ACTOR.reply.encode(wire.ActorKilled(actor is not None))

    def _cancel_call(self, payload: bytes, ctx: CallContext) -> bytes:
        self.check.check(ctx)
        request = CANCEL_ACTOR_CALL.request.decode(payload)
        CANCEL_ACTOR_CALL.check(request, 0)
        actor = self.actors.get(request.actor_id)
        state = wire.CallState.ENDED
        if actor is not None and request.direct:
            state = actor.cancel_direct() if request.force else wire.CallState.RUNNING
        elif actor is not None:
            state = actor.cancel(request.call_id, request.force)
        return CANCEL_ACTOR_CALL.reply.encode(wire.ActorCallCancelled(state))

    async def aclose(self) -> None:
        self._closing = True
        for actor in list(self.actors.values()):
            actor.die("was stopped: the worker is shutting down", lost=True)


@asynccontextmanager
async def running_actors(
    check: TokenCheck,
    functions: FunctionCache,
    check_requirements: Callable[[str, str, tuple[str, ...]], None],
    *,
    sandbox: Sandbox,
    env: Mapping[str, str],
    max_message_size: int,
    task_timeout: float,
    max_actors: int = DEFAULT_MAX_ACTORS,
    max_actors_per_connection: int = DEFAULT_MAX_ACTORS_PER_CONNECTION,
    max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
) -> AsyncIterator[ActorService]:
    """An :class:`ActorService` (see it for the arguments); its actors die on exit."""
    async with anyio.create_task_group() as tg:
        service = ActorService(
            tg,
            check,
            functions,
            check_requirements,
            sandbox=sandbox,
            env=env,
            max_message_size=max_message_size,
            task_timeout=task_timeout,
            max_actors=max_actors,
            max_actors_per_connection=max_actors_per_connection,
            max_pending_calls=max_pending_calls,
        )
        try:
            yield service
        finally:
            with anyio.CancelScope(shield=True):
                await service.aclose()
