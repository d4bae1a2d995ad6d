"""The event-loop half of a client: one connection, registered functions, tasks in flight.

A :class:`Core` lives on one asyncio loop (the client's background thread,
see ``vaccelray.client.api``). :meth:`Core.submit` may be called from any
thread: it pickles the arguments in the caller's thread (so a pickling
error is raised at the call site), queues the task for the loop and returns
its :class:`TaskRef` at once; the loop is woken once for all the tasks
queued meanwhile. On the loop, the common case (a registered function, no
TaskRef arguments, an open connection) is sent at once and settled from the
call's done callback: no asyncio task. Anything else (resolve TaskRef
arguments, ``RegisterFunction`` once per connection and function, retries)
runs as one asyncio task. Worker loss (connection lost, pool process died,
worker shutting down) is retried up to ``retries`` times on a fresh connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from ssl import SSLContext
from typing import Any, Final, TypeVar

from vaccelray.allocator import keep_heap_for
from vaccelray.client.actorcalls import ActorLines, ActorRequest
from vaccelray.client.actorlanes import ActorLane, fetch_actor_lane
from vaccelray.client.direct import DirectLane, fetch_lane
from vaccelray.client.errors import (
    AuthenticationError,
    TaskCancelledError,
    TaskError,
    WorkerLostError,
)
from vaccelray.client.lane import MAX_LANES, Lane, LaneOutcome, open_lane
from vaccelray.client.objects import (
    INLINE,
    ObjectRef,
    Objects,
    Pending,
    Stored,
    pickle_task_args,
)
from vaccelray.client.outcomes import load_result, rpc_failure, task_failure
from vaccelray.client.refs import TaskRef, _settle
from vaccelray.client.remote import FunctionSpec, Options
from vaccelray.errors import ConnectError, Reason, RPCError, StatusCode, TransportError
from vaccelray.membership import Credential, MembershipError
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol import tasks as wire
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.actors import LeaseActor
from vaccelray.protocol.agent import tag_text
from vaccelray.protocol.services import (
    CANCEL,
    CREATE_SESSION,
    DESTROY_SESSION,
    END_LEASE,
    IMAGE_CLASSIFICATION,
    LEASE,
    LEASE_ACTOR,
    REGISTER_FUNCTION,
    SUBMIT,
    Rpc,
)
from vaccelray.transport.client import Client as Connection
from vaccelray.transport.client import Outcome, PendingCall, open_client
from vaccelray.transport.endpoints import UnixEndpoint, parse_endpoint

__all__ = ["Core"]

log = logging.getLogger("vaccelray.client")

_BACKOFF: Final = 0.1
#: Tasks in flight on the connection at once; the client holds the others (a worker
#: refuses a connection's queue past --max-queued-per-connection, 256 by default).
WINDOW: Final = 128
#: Set to 0, no pool process is leased: every call goes by the worker (see
#: vaccelray.client.direct).
DIRECT_ENV: Final = "VACCELRAY_DIRECT"
#: Seconds each step of leasing a pool process may take (asking, fetching, its start).
_LEASE_TIMEOUT: Final = 30.0
#: Seconds a leased process may go unused before its lane is closed (the process exits,
#: and the worker has room for another lease; its thread leases again on its next call).
LEASE_IDLE: Final = 60.0
#: A thread's entry in Core._direct after its first call (a thread that calls once needs
#: no process of its own: the second call leases one), while its process is being leased,
#: and before any call. Likewise for a (thread, actor id) pair and the actor's lane.
_CALLED: Final = object()
_LEASING: Final = object()
_NO_LEASE: Final = object()
#: Entries of Core._direct: threads with a leased process, and (thread, actor) lanes.
MAX_DIRECT: Final = 2 * MAX_LANES
#: A thread's direct path: its leased process (by thread id), or an actor's process (by
#: thread id and actor id).
_Key = int | tuple[int, str]
_Leased = DirectLane | ActorLane
_R = TypeVar("_R")


class Core:
    """Create with ``await Core.open(...)`` on the loop that will run it."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None,
        ssl: SSLContext | None,
        connect_timeout: float,
        max_message_size: int,
        ca: str | None = None,
    ) -> None:
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.thread_id = threading.get_ident()
        #: TLS and the membership proof to TCP addresses; the token only on unix sockets.
        self.credential = Credential(token, ca=ca, tls=ssl)
        self.metadata = self.credential.metadata_for(address)
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.arg_limit = max_message_size - wire.ARG_LIMIT_MARGIN
        self._conn: Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._registered: set[str] = set()
        self._registering: dict[str, asyncio.Future[None]] = {}
        #: The call (fast path) or asyncio task of each task in flight, by task id.
        self._running: dict[str, PendingCall | asyncio.Task[None]] = {}
        #: Submissions (and actor requests) waiting for the loop, and whether it has been
        #: woken for them.
        self._queued: collections.deque[_Queued | ActorRequest] = collections.deque()
        self.actors = ActorLines(self)
        #: Tasks held while WINDOW are in flight, started as those end.
        self._waiting: collections.deque[_Queued] = collections.deque()
        self._woken = False
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{secrets.token_hex(3)}-"
        self._closed = False
        #: Connections being closed after a transport error (see ``_forget``), and leased
        #: processes being stopped (see ``cancel_soon``): shutdown waits for them.
        self._closing: set[asyncio.Task[Any]] = set()
        self._session_id = 0
        #: Names this client to workers: it owns the objects it puts and the results kept
        #: for it, across reconnections (see ``vaccelray.client.objects``).
        self.client_id = secrets.token_hex(16)
        self.objects = Objects(self)
        #: Each calling thread's lane (None: it gets none), at most MAX_LANES of them.
        self._lanes: dict[int, Lane | None] = {}
        self._lanes_lock = threading.Lock()
        #: Each calling thread's leased pool process (see vaccelray.client.direct), and its
        #: lanes to actors' processes (see vaccelray.client.actorlanes): the lane, None (it
        #: gets none), _CALLED or _LEASING before; at most MAX_DIRECT of them.
        self._direct: dict[_Key, _Leased | object | None] = {}
        self._idle_check: asyncio.TimerHandle | None = None
        #: Leases are asked of a worker on this host, unless VACCELRAY_DIRECT=0.
        self._may_lease = (
            isinstance(parse_endpoint(address), UnixEndpoint)
            and os.environ.get(DIRECT_ENV, "1") != "0"
        )

    @classmethod
    async def open(
        cls,
        address: str,
        *,
        token: str | None = None,
        ssl: SSLContext | None = None,
        connect_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        ca: str | None = None,
    ) -> Core:
        """A core connected to *address* (raises ConnectError when it cannot be reached,
        AuthenticationError when the peer does not prove it holds the cluster token)."""
        core = cls(
            address,
            token=token,
            ssl=ssl,
            ca=ca,
            connect_timeout=connect_timeout,
            max_message_size=max_message_size,
        )
        await core.connection()
        return core

    # -- threads ---------------------------------------------------------------

    def check_blocking(self, what: str) -> None:
        """Refuse to block the client's own loop (that would wait forever)."""
        if threading.get_ident() == self.thread_id:
            raise RuntimeError(f"{what} would block the client's event loop: use 'await ref' there")

    def _call_soon(self, callback: Any, *args: Any) -> None:
        if threading.get_ident() == self.thread_id:
            callback(*args)
        else:
            self.loop.call_soon_threadsafe(callback, *args)

    # -- submitting --------------------------------------------------------------

    def submit(
        self,
        spec: FunctionSpec,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        options: Options,
        *,
        session_id: int = 0,
    ) -> TaskRef[Any]:
        """Submit a task from any thread; its TaskRef is returned at once."""
        if self._closed:
            raise RuntimeError("this client is shut down")
        ref: TaskRef[Any] = TaskRef(self, f"{self._prefix}{next(self._ids)}", spec.name)
        # Pickled here, in the caller's thread: a pickling error raises at the call site.
        payload: bytes | None
        try:
            payload = self._pickle(ref, spec, args, kwargs)
        except Pending:
            payload = None  # pickled again once the TaskRef has its result
        if payload is not None and len(payload) <= self.arg_limit:
            keep_heap_for(len(payload))
            # Needing nothing of the worker itself, it may go to a leased process (which is
            # sent the function itself); else by a lane, once the worker has the function.
            direct = not session_id and not ref._inputs and not options.backend and not options.ops
            if direct or spec.digest in self._registered:
                request = _request(ref, spec, payload, options, session_id, self.client_id)
                on_done = functools.partial(self._lane_answered, ref, spec, request, options)
                if direct and self.by_direct(ref, spec, payload, options.timeout, on_done):
                    return ref
                if spec.digest in self._registered and self.by_lane(
                    ref, SUBMIT, request, on_done, options.timeout
                ):
                    return ref
        queued = (ref, spec, args, kwargs, payload, options, session_id)
        if threading.get_ident() == self.thread_id:
            self._start(queued)
            return ref
        self._queued.append(queued)
        # The flag is cleared before the loop empties the queue, so a task queued
        # meanwhile is either seen by that pass or wakes the loop again.
        if not self._woken:
            self._woken = True
            self.loop.call_soon_threadsafe(self._start_queued)
        return ref

    def _pickle(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        args: Sequence[object],
        kwargs: Mapping[str, object],
    ) -> bytes:
        """The task's pickled arguments; raises :class:`Pending` when a TaskRef among them
        has no result yet. The refs among them are kept alive (their objects held) until
        the task ends.
        """
        payload, refs = pickle_task_args(spec.name, args, kwargs)
        if refs:
            ref.inputs(refs)
        return payload

    def live_connection(self) -> Connection | None:
        """The connection, when one is open (nothing is opened here)."""
        conn = self._conn
        return None if conn is None or conn.is_closed else conn

    def next_id(self) -> str:
        """A new id, unique among this client's tasks and calls."""
        return f"{self._prefix}{next(self._ids)}"

    def submit_actor(self, request: ActorRequest) -> None:
        """Send an actor's request from any thread, after that actor's earlier ones."""
        if self._closed:
            raise RuntimeError("this client is shut down")
        if threading.get_ident() == self.thread_id:
            self._start(request)
            return
        self._queued.append(request)
        if not self._woken:
            self._woken = True
            self.loop.call_soon_threadsafe(self._start_queued)

    # -- the blocking path (see vaccelray.client.lane) ------------------------------

    def by_lane(
        self,
        ref: TaskRef[Any],
        rpc: Rpc[Any, Any],
        request: bytes,
        on_done: Callable[[LaneOutcome], None],
        timeout: float | None,
    ) -> bool:
        """Send *request* on the calling thread's own lane; False when it cannot go that way.

        Only plain threads get a lane (not the client's loop, not another event loop:
        there the reply is awaited, not read), and only while their lane is idle.
        """
        if self._closed or threading.get_ident() == self.thread_id:
            return False
        if asyncio._get_running_loop() is not None:
            return False
        lane = self._lane()
        if lane is None or not lane.idle:
            return False
        ref._lane = lane
        if lane.send(
            rpc.service, rpc.method, request, on_done, timeout=timeout, metadata=self.metadata
        ):
            return True
        ref._lane = None
        return False

    def by_direct(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        args: bytes,
        timeout: float | None,
        on_done: Callable[[LaneOutcome], None],
    ) -> bool:
        """Send a task to the calling thread's leased pool process; False when it cannot go
        that way (a thread's second call starts leasing one, and goes by the worker)."""
        thread = self._plain_thread()
        if thread is None:
            return False
        lane = self._leased(thread)
        if not isinstance(lane, DirectLane) or not lane.idle:
            return False
        ref._lane = lane
        if lane.send_task(spec, args, timeout, on_done):
            return True
        ref._lane = None
        return False

    def by_actor_lane(
        self,
        ref: TaskRef[Any],
        actor_id: str,
        method: str,
        args: bytes,
        on_done: Callable[[LaneOutcome], None],
    ) -> bool:
        """Send a method call to the actor's process, on the calling thread's lane to it;
        False when it cannot go that way (a thread's second call on an actor asks for one,
        and goes by the worker). The caller sees to the order of the actor's calls."""
        thread = self._plain_thread()
        if thread is None:
            return False
        lane = self._leased((thread, actor_id))
        if not isinstance(lane, ActorLane) or not lane.idle:
            return False
        ref._lane = lane
        if lane.send_call(ref.name, method, args, on_done):
            return True
        ref._lane = None
        return False

    def _plain_thread(self) -> int | None:
        """The calling thread's id when its calls may go direct: leases are on, and it is
        a plain thread (not the client's loop, not another event loop)."""
        thread = threading.get_ident()
        if not self._may_lease or self._closed or thread == self.thread_id:
            return None
        if asyncio._get_running_loop() is not None:
            return None
        return thread

    def _leased(self, key: _Key) -> _Leased | object | None:
        """The lane of *key*, when there is one to use; else a lease starts (the key's
        second call, or its lane was lost), and what stands in its place is returned."""
        lane = self._direct.get(key, _NO_LEASE)
        if lane is _NO_LEASE:
            with self._lanes_lock:
                if len(self._direct) < MAX_DIRECT:
                    self._direct.setdefault(key, _CALLED)
        elif lane is _CALLED or (isinstance(lane, _Leased) and lane.closed):
            self._start_lease(key)
        return lane

    def _start_lease(self, key: _Key) -> None:
        """Lease a pool process, or a lane to an actor's, for *key*, in a thread of its own
        (a pool process takes a start-up; an actor's takes the lane in its turn)."""
        with self._lanes_lock:
            if self._closed or self._direct.get(key) is _LEASING:
                return
            self._direct[key] = _LEASING
        threading.Thread(
            target=self._lease_for, args=(key,), name="vaccelray-lease", daemon=True
        ).start()

    def _lease_for(self, key: _Key) -> None:
        lane: _Leased | None = None
        try:
            if isinstance(key, tuple):
                thread, actor_id = key
                leased = self._ask(self._lease_actor(actor_id))
                lane = fetch_actor_lane(
                    leased, actor_id, self.max_message_size, _LEASE_TIMEOUT, thread
                )
            else:
                leased = self._ask(self._lease())
                lane = fetch_lane(
                    leased, self.max_message_size, _LEASE_TIMEOUT, self._lease_ended, key
                )
        except Exception as exc:
            log.debug("Calls of %s go by the worker: %s", key, exc)
        with self._lanes_lock:
            if self._closed and lane is not None:
                lane.close(WorkerLostError("the client was shut down"))
                lane = None
            self._direct[key] = lane
        if lane is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the lane
                self.loop.call_soon_threadsafe(self._arm_idle_check)

    def _arm_idle_check(self) -> None:
        if self._idle_check is None and not self._closed:
            self._idle_check = self.loop.call_later(LEASE_IDLE / 2, self._close_idle_leases)

    def _close_idle_leases(self) -> None:
        """Close the lanes of leased processes unused for LEASE_IDLE seconds (threads that
        stopped calling, or ended)."""
        self._idle_check = None
        stale = time.monotonic() - LEASE_IDLE
        with self._lanes_lock:
            for key, lane in list(self._direct.items()):
                if isinstance(lane, _Leased) and lane.used < stale and lane.close_if_idle():
                    del self._direct[key]
            leased = any(isinstance(lane, _Leased) for lane in self._direct.values())
        if leased:
            self._arm_idle_check()

    def _ask(self, request: Coroutine[Any, Any, wire.Leased]) -> wire.Leased:
        """*request*'s answer, from the loop (called in a lease's thread)."""
        future = asyncio.run_coroutine_threadsafe(request, self.loop)
        return future.result(self.connect_timeout + _LEASE_TIMEOUT)

    async def _lease(self) -> wire.Leased:
        conn = await self.connection()
        return await conn.call_rpc(
            LEASE, wire.Lease(self.client_id), timeout=_LEASE_TIMEOUT, metadata=self.metadata
        )

    async def _lease_actor(self, actor_id: str) -> wire.Leased:
        conn = await self.connection()
        return await conn.call_rpc(
            LEASE_ACTOR,
            LeaseActor(actor_id),
            timeout=_LEASE_TIMEOUT,
            metadata=self.metadata,
        )

    def _lease_ended(self, lease_id: str) -> str:
        """How a leased process ended, as its worker says (asked from a lane's reader)."""
        try:
            return asyncio.run_coroutine_threadsafe(self._end_lease(lease_id), self.loop).result(
                _LEASE_TIMEOUT
            )
        except Exception as exc:
            return f"was lost ({type(exc).__name__}: {exc})"

    async def _end_lease(self, lease_id: str) -> str:
        conn = self.live_connection()
        if conn is None:
            return "was lost with the connection to its worker"
        ended = await conn.call_rpc(
            END_LEASE, wire.EndLease(lease_id), timeout=_LEASE_TIMEOUT, metadata=self.metadata
        )
        return ended.status

    def _lane(self) -> Lane | None:
        thread = threading.get_ident()
        lane = self._lanes.get(thread)
        if lane is not None and not lane.closed:
            return lane
        with self._lanes_lock:
            if thread in self._lanes and lane is None:
                return None  # this thread gets none
            if lane is None and len(self._lanes) >= MAX_LANES:
                return None
            if self.credential.ssl_for(self.address) is not None:
                lane = None  # TLS and its membership proof stay on the loop's connection
            else:
                lane = open_lane(self.address, self.max_message_size, self.connect_timeout)
            if self._closed and lane is not None:
                lane.close(WorkerLostError("the client was shut down"))
                lane = None
            self._lanes[thread] = lane
            return lane

    def _lane_answered(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        request: bytes,
        options: Options,
        outcome: LaneOutcome,
    ) -> None:
        """A lane's reply (on the thread reading it): a result or a raised error settles the
        TaskRef here; anything else goes on on the loop, as a fast-path call would."""
        if isinstance(outcome, bytes):
            try:
                reply = SUBMIT.reply.decode(outcome)
            except RPCError as exc:
                _settle(ref._future, error=TaskError(f"{spec.name}: {exc}", task=spec.name))
                return
            if isinstance(reply, wire.TaskDone):
                try:
                    _settle(ref._future, self.task_value(reply, spec, request, options))
                except TaskError as exc:
                    _settle(ref._future, error=exc)
                return
            if reply.kind != wire.FailureKind.CRASHED:
                _settle(ref._future, error=task_failure(reply, spec.name))
                return
        if self._closed:
            _settle(ref._future, error=self._cancelled(spec))
            return
        self.loop.call_soon_threadsafe(self._answered, ref, spec, request, options, None, outcome)

    def _close_lanes(self) -> None:
        with self._lanes_lock:
            lanes, self._lanes = self._lanes, {}
            direct, self._direct = self._direct, {}
        for lane in (*lanes.values(), *direct.values()):
            if isinstance(lane, Lane):
                lane.close(WorkerLostError("the client was shut down"))

    def _start_queued(self) -> None:
        self._woken = False
        queued, conn = self._queued, self._conn
        count = len(queued)
        # Only those queued by now (later ones wake the loop again); several leave in one write.
        with conn.batch() if conn is not None and count > 1 else contextlib.nullcontext():
            for _ in range(count):
                self._start(queued.popleft())

    def _start(self, queued: _Queued | ActorRequest) -> None:
        if isinstance(queued, ActorRequest):
            if self._closed:
                _settle(queued.ref._future, error=self._cancelled_error(queued.ref.name))
            elif not queued.ref.done():
                self.actors.put(queued)
            return
        ref, spec, args, kwargs, payload, options, session_id = queued
        if ref.done():  # cancelled before it left the caller's thread
            return
        if self._closed:
            _settle(ref._future, error=WorkerLostError("the client was shut down", task=spec.name))
            return
        if len(self._running) >= WINDOW:
            self._waiting.append(queued)
            return
        conn = self._conn
        if (
            payload is not None
            and len(payload) <= self.arg_limit
            and conn is not None
            and spec.digest in self._registered
            and not conn.is_closed
        ):
            request = _request(ref, spec, payload, options, session_id, self.client_id)
            try:
                self._running[ref.task_id] = conn.start_call(
                    SUBMIT.service,
                    SUBMIT.method,
                    request,
                    functools.partial(self._answered, ref, spec, request, options, conn),
                    timeout=options.timeout,
                    metadata=self.metadata,
                )
            except (TransportError, RPCError) as exc:
                self._answered(ref, spec, request, options, conn, exc)
        else:
            work = self._prepare(ref, spec, args, kwargs, payload, options, session_id)
            self._spawn(ref, spec, work)

    def _answered(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        request: bytes,
        options: Options,
        conn: Connection | None,
        outcome: Outcome | LaneOutcome,
    ) -> None:
        """The fast path's first attempt ended: settle the TaskRef, or go on in a task."""
        self._running.pop(ref.task_id, None)
        if isinstance(outcome, asyncio.CancelledError):  # TaskRef.cancel(), or shutdown
            _settle(ref._future, error=self._cancelled(spec))
            return  # _cancel or aclose frees the window
        try:
            verdict, value = self._judge(conn, spec, request, options, outcome, 0)
        except Exception as exc:  # raised here, it would break the connection's read loop
            verdict, value = _Verdict.FAILED, exc
        if verdict is _Verdict.DONE:
            _settle(ref._future, value)
        elif verdict is _Verdict.FAILED:
            _settle(ref._future, error=value)
        elif self._closed:
            _settle(ref._future, error=self._cancelled(spec))
        else:
            unknown, lost = (1, None) if verdict is _Verdict.UNKNOWN else (0, value)
            work = self._attempts(spec, request, options, unknown=unknown, lost=lost)
            self._spawn(ref, spec, work)
        self._window_freed()

    def _window_freed(self) -> None:
        """Start the tasks held back, as far as the window allows."""
        waiting = self._waiting
        while waiting and len(self._running) < WINDOW:
            self._start(waiting.popleft())

    def _spawn(self, ref: TaskRef[Any], spec: FunctionSpec, work: Coroutine[Any, Any, Any]) -> None:
        """Run *work* as an asyncio task that settles *ref* with its outcome."""
        task = self.loop.create_task(self._settle_with(ref, spec, work))
        self._running[ref.task_id] = task

    async def _settle_with(
        self, ref: TaskRef[Any], spec: FunctionSpec, work: Coroutine[Any, Any, Any]
    ) -> None:
        try:
            result = await work
        except asyncio.CancelledError:
            _settle(ref._future, error=self._cancelled(spec))
        except BaseException as exc:
            _settle(ref._future, error=exc)
        else:
            _settle(ref._future, result)
        finally:
            if self._running.get(ref.task_id) is asyncio.current_task():
                del self._running[ref.task_id]
            self._window_freed()

    def _cancelled(self, spec: FunctionSpec) -> TaskError:
        return self._cancelled_error(spec.name)

    def _cancelled_error(self, name: str) -> TaskError:
        if self._closed:
            return WorkerLostError("the client was shut down", task=name)
        return TaskCancelledError(f"{name} was cancelled", task=name)

    async def _prepare(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        payload: bytes | None,
        options: Options,
        session_id: int,
    ) -> Any:
        """The slow path from the start: wait for TaskRef arguments, put arguments too large
        for a message, then :meth:`_attempts`."""
        while payload is None:
            try:
                payload = self._pickle(ref, spec, args, kwargs)
            except Pending as pending:  # a failed one raises its error here
                await pending.ref.ended()  # its kept result stays on its worker
        args_object = ""
        if len(payload) > self.arg_limit:
            stored: ObjectRef[bytes] = ObjectRef(
                self.objects, await self.objects.put_bytes(payload), len(payload)
            )
            ref.inputs({stored.object_id: stored})
            args_object, payload = stored.object_id, b""
        request = _request(ref, spec, payload, options, session_id, self.client_id, args_object)
        return await self._attempts(spec, request, options)

    async def _attempts(
        self,
        spec: FunctionSpec,
        request: bytes,
        options: Options,
        *,
        unknown: int = 0,
        lost: BaseException | str | None = None,
    ) -> Any:
        """Submit *request* until it has an outcome; *unknown*, *lost*: the fast path's try."""
        attempt = 0
        while True:
            if lost is not None:
                attempt += 1
                if attempt > options.retries:
                    if isinstance(lost, ConnectError):
                        raise lost
                    tries = f" (tried {attempt} times)" if attempt > 1 else ""
                    raise WorkerLostError(f"{spec.name}: {lost}{tries}", task=spec.name)
                log.info("Retrying %s (%d of %d): %s", spec.name, attempt, options.retries, lost)
                await asyncio.sleep(min(_BACKOFF * 2 ** (attempt - 1), 2.0))
            conn = None
            outcome: bytes | BaseException
            try:
                conn = await self.connection()
                if spec.digest not in self._registered:
                    # The task's deadline bounds this too: a hung worker must not hang it.
                    await self._register(conn, spec, options.timeout)
                outcome = await conn.call(
                    SUBMIT.service,
                    SUBMIT.method,
                    request,
                    timeout=options.timeout,
                    metadata=self.metadata,
                )
            except (TransportError, RPCError) as exc:
                outcome = exc
            verdict, value = self._judge(conn, spec, request, options, outcome, unknown)
            if verdict is _Verdict.DONE:
                return value
            if verdict is _Verdict.FAILED:
                raise value
            if verdict is _Verdict.UNKNOWN:
                unknown += 1
                lost = None
            else:
                lost = value

    def task_value(
        self, reply: wire.TaskDone, spec: FunctionSpec, request: bytes, options: Options
    ) -> Any:
        """A task's value, or the :class:`Stored` ref to it when its worker kept it (a task
        that may be retried is run again, *request* once more, if that is lost)."""
        if reply.object_id:
            again = None
            if options.retries:
                again = functools.partial(self._attempts, spec, request, options)
            return Stored(self.objects, reply.object_id, reply.size, spec.name, again)
        return load_result(reply.result, spec.name)

    def _judge(
        self,
        conn: Connection | None,
        spec: FunctionSpec,
        request: bytes,
        options: Options,
        outcome: bytes | BaseException,
        unknown: int,
    ) -> tuple[_Verdict, Any]:
        """What one Submit's reply (or error) means: a result, an error, or try again."""
        if isinstance(outcome, bytes):
            reply = SUBMIT.reply.decode(outcome)
            if isinstance(reply, wire.TaskDone):
                try:
                    return _Verdict.DONE, self.task_value(reply, spec, request, options)
                except TaskError as exc:
                    return _Verdict.FAILED, exc
            if reply.kind != wire.FailureKind.CRASHED:
                return _Verdict.FAILED, task_failure(reply, spec.name)
            return _Verdict.LOST, reply.message
        if isinstance(outcome, ConnectError):
            return _Verdict.LOST, outcome
        if isinstance(outcome, TransportError):
            self._forget(conn)
            return _Verdict.LOST, outcome
        if isinstance(outcome, RPCError):
            if outcome.reason is Reason.UNKNOWN_FUNCTION and unknown < 3:
                self._registered.discard(spec.digest)  # the worker dropped it from its cache
                return _Verdict.UNKNOWN, None
            if outcome.code != StatusCode.UNAVAILABLE:
                return _Verdict.FAILED, rpc_failure(outcome, spec.name, options)
            return _Verdict.LOST, outcome
        return _Verdict.FAILED, outcome

    async def _register(
        self, conn: Connection, spec: FunctionSpec, timeout: float | None = None
    ) -> None:
        waiting = self._registering.get(spec.digest)
        if waiting is not None:
            await asyncio.shield(waiting)
            return
        future: asyncio.Future[None] = self.loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._registering[spec.digest] = future
        try:
            await conn.call(
                REGISTER_FUNCTION.service,
                REGISTER_FUNCTION.method,
                REGISTER_FUNCTION.request.encode(
                    wire.RegisterFunction(spec.digest, spec.name, spec.pickled)
                ),
                timeout=timeout,
                metadata=self.metadata,
            )
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            if conn is self._conn:
                self._registered.add(spec.digest)
            future.set_result(None)
        finally:
            del self._registering[spec.digest]

    # -- cancelling ----------------------------------------------------------------

    def cancel_soon(self, ref: TaskRef[Any]) -> None:
        lane = ref._lane
        if isinstance(lane, DirectLane):  # its process is killed: the task ends with it
            lane.abandoned = True
            lane.close(asyncio.CancelledError())  # no other call goes there meanwhile
            self._call_soon(self._kill_lease, lane.lease_id)
            return
        self._call_soon(self._cancel, ref.task_id, lane is not None)

    def _kill_lease(self, lease_id: str) -> None:
        task = self.loop.create_task(self._end_lease(lease_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(_lease_killed)

    def _cancel(self, task_id: str, by_lane: bool = False) -> None:
        """Stop a task; *by_lane*: it went by a lane (the worker is told all the same)."""
        task = self._running.pop(task_id, None)
        if task is not None:
            task.cancel()
            self._window_freed()
        elif not by_lane:
            return  # ended, or held back: it is dropped when its turn comes (done already)
        conn = self._conn
        if conn is None:
            return
        # Sent from here, its answer only logged: no task to keep or wait for. The client id
        # lets a scheduler find a task that went by a lane (another connection).
        request = CANCEL.request.encode(wire.Cancel((task_id,), self.client_id))
        with contextlib.suppress(TransportError):  # closed: the worker saw the client go
            conn.start_call(
                CANCEL.service,
                CANCEL.method,
                request,
                functools.partial(_cancel_answered, task_id),
                metadata=self.metadata,
                timeout=5.0,
            )

    # -- connection ----------------------------------------------------------------

    async def connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.is_closed:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is None or conn.is_closed:
                try:
                    conn = await open_client(
                        self.address,
                        connect_timeout=self.connect_timeout,
                        max_message_size=self.max_message_size,
                        ssl=self.credential.ssl_for(self.address),
                        setup=self.credential.setup_for(self.address),
                    )
                except MembershipError as exc:  # nothing was sent: results come from members
                    raise AuthenticationError(str(exc)) from None
                if self._closed:  # shut down while connecting: nobody would close it
                    conn.close()
                    raise TransportError("the client was shut down")
                self._conn = conn
                self._registered = set()
                self._session_id = 0
        return conn

    def _forget(self, conn: Connection | None) -> None:
        if conn is not None and conn is self._conn:
            self._conn = None
            closing = self.loop.create_task(conn.aclose())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Fail the tasks in flight with WorkerLostError, close the connection."""
        self._closed = True
        if self._idle_check is not None:
            self._idle_check.cancel()
        self._close_lanes()
        self._start_queued()  # fails them: the client is shut down
        waiting, self._waiting = self._waiting, collections.deque()
        for queued in waiting:
            self._start(queued)  # fails them too
        self.actors.cancel_all()
        running, self._running = self._running, {}
        for entry in running.values():
            entry.cancel()  # a fast-path call settles its TaskRef right here
        tasks = [t for t in running.values() if isinstance(t, asyncio.Task)]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.actors.aclose()
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None
        if self._closing:  # connections dropped earlier: their sockets must be closed too
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- vAccel sessions (data-only calls to the worker's agent service) ---------------

    async def _agent_call(self, rpc: Rpc[Any, _R], request: Any, timeout: float | None) -> _R:
        conn = await self.connection()
        try:
            return await conn.call_rpc(rpc, request, timeout=timeout, metadata=self.metadata)
        except RPCError as exc:
            if exc.code == StatusCode.UNAUTHENTICATED:
                # The message names the hop that refused and the fix.
                raise AuthenticationError(f"{rpc.method} refused: {exc.message}") from None
            raise

    async def create_session(self, flags: int = 0, timeout: float | None = 30.0) -> int:
        request = pb.CreateSessionRequest(flags=flags)
        return int((await self._agent_call(CREATE_SESSION, request, timeout)).session_id)

    async def destroy_session(self, session_id: int, timeout: float | None = 30.0) -> None:
        request = pb.DestroySessionRequest(session_id=session_id)
        await self._agent_call(DESTROY_SESSION, request, timeout)

    async def classify(
        self, image: bytes, session_id: int = 0, timeout: float | None = None
    ) -> str:
        """The tag of *image*, in *session_id* (0: a session this core opens once and keeps)."""
        if not session_id:
            if not self._session_id:
                self._session_id = await self.create_session()
            session_id = self._session_id
        request = pb.ImageClassificationRequest(session_id=session_id, image=image)
        return tag_text((await self._agent_call(IMAGE_CLASSIFICATION, request, timeout)).tags)


def _lease_killed(task: asyncio.Task[str]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("A cancelled task's leased process was not killed: %s", task.exception())


def _cancel_answered(task_id: str, outcome: Outcome) -> None:
    if isinstance(outcome, BaseException):
        log.debug("Cancel of %s not delivered: %s", task_id, outcome)


class _Verdict(enum.Enum):
    DONE = 1  # the task's result
    FAILED = 2  # the error to raise
    UNKNOWN = 3  # the worker does not know the function: register it, submit again
    LOST = 4  # the worker (or its pool process) was lost: retry if allowed


#: A submission on its way to the loop: ref, spec, args, kwargs, payload, options, session id.
_Queued = tuple[
    TaskRef[Any], FunctionSpec, Sequence[object], Mapping[str, object], bytes | None, Options, int
]


def _request(
    ref: TaskRef[Any],
    spec: FunctionSpec,
    payload: bytes,
    options: Options,
    session_id: int,
    client: str,
    args_object: str = "",
) -> bytes:
    return SUBMIT.request.encode(
        wire.Submit(
            ref.task_id,
            spec.digest,
            spec.name,
            payload,
            options.backend or "",
            options.ops,
            session_id,
            client,
            INLINE,
            ref.object_ids(),
            args_object,
            ref.object_sizes(),
        )
    )
