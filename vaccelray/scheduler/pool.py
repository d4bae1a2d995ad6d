"""Connections to the workers, and calls on them that never hang on a lost worker.

:class:`WorkerPool` joins the pure :class:`~vaccelray.scheduler.registry.Registry`
to the network: one multiplexed ttrpc connection per worker (opened on
demand), per-worker load accounting, and a cancel scope around every call so
that the moment a worker is declared down (by a health check or by another
call's broken connection) every call still waiting on it ends with
:class:`WorkerUnavailable`. This is the API the stateless task service uses
too: ``pick(op)`` then ``call(address, ...)``; on ``WorkerUnavailable`` with
``sent=False`` the work surely did not run and may go elsewhere.

:meth:`WorkerPool.start` is the same call without a task: started from the
loop on an open connection, answered through a callback (the scheduler's
forwarding of session calls, its busiest path).

Every connection carries the scheduler's own credential, never its client's:
to a TCP (or vsock) worker it is TLS and the membership proof, made before
the connection is used at all, the health check's included, so a worker that
cannot prove it holds the cluster token is never routed to and is sent
nothing (:mod:`vaccelray.membership`); to a unix socket worker, the token as
metadata (:meth:`WorkerPool.credential`). A worker refusing it is reported as
the scheduler's problem, naming the scheduler (:attr:`WorkerPool.hop`) and the fix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import anyio

from vaccelray.auth import METADATA_KEY
from vaccelray.errors import ConnectError, RPCError, StatusCode, TransportError, VaccelrayError
from vaccelray.membership import Credential, MembershipError
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.scheduler.registry import Change, Registry, WorkerRecord
from vaccelray.transport.client import Client, Outcome, PendingCall, Waiter, open_client

__all__ = ["ChangeListener", "StartedCall", "WorkerPool", "WorkerUnavailable"]

log = logging.getLogger("vaccelray.scheduler")

ChangeListener = Callable[[str, Change], None]


class WorkerUnavailable(VaccelrayError):
    """A call could not complete because its worker is gone.

    ``sent`` is False when the request surely never reached the worker (it
    is safe to send it elsewhere), True when it may have run there.
    """

    def __init__(self, address: str, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.address = address
        self.sent = sent


class StartedCall:
    """A call begun with :meth:`WorkerPool.start`; its callback is called exactly once."""

    __slots__ = ("_callback", "_pool", "address", "pending")

    def __init__(self, pool: WorkerPool, address: str, callback: Callable[[Outcome], None]) -> None:
        self._pool = pool
        self.address = address
        self._callback = callback
        self.pending: PendingCall | None = None

    def finish(self, outcome: Outcome) -> None:
        """The connection's answer (its PendingCall calls this exactly once)."""
        self._callback(self._pool.ended(self.address, outcome))

    def cancel(self) -> None:
        """Abandon the call (the caller went away); the callback gets CancelledError."""
        if self.pending is not None:
            self.pending.cancel()  # finishes with CancelledError


class WorkerPool:
    """Workers to route to: registry, connections, load accounting, failure fan-out."""

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        connect_timeout: float = 1.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        credential: Credential | None = None,
    ) -> None:
        self.registry = registry if registry is not None else Registry()
        #: What the scheduler proves to workers (the token never leaves the host).
        self.own = credential or Credential()
        self._credentials: dict[str, tuple[tuple[str, str], ...]] = {}
        #: Names the scheduler in what it says of workers refusing it ("scheduler tcp://...").
        self.hop = "scheduler"
        self.connect_timeout = connect_timeout
        #: The scheduler's own limit: what it accepts from clients it must accept from workers.
        self.max_message_size = max_message_size
        self._clients: dict[str, Client] = {}
        #: Connections of the health checks, apart from the calls' (see probe_client).
        self._probes: dict[str, Client] = {}
        self._locks: dict[tuple[str, bool], anyio.Lock] = {}
        self._scopes: dict[str, set[anyio.CancelScope]] = {}
        #: Calls started without a task (start, send) and not ended, per worker.
        self._started: dict[str, int] = {}
        self._listeners: list[ChangeListener] = []
        #: Called with a worker's address when a calls connection to it opens.
        self._connected: list[Callable[[str], None]] = []
        self._closing: set[str] = set()
        #: Workers whose last connection failed the membership proof (logged once each).
        self._unproven: set[str] = set()
        #: Tasks sent to another worker after one could not take them, and sessions
        #: re-created on another worker after theirs was lost (the metrics count them).
        self.failovers = 0
        self.moved_sessions = 0

    # -- state -------------------------------------------------------------

    def add_listener(self, listener: ChangeListener) -> None:
        """Call *listener(address, change)* whenever a worker's routability changes."""
        self._listeners.append(listener)

    def add_connected_listener(self, listener: Callable[[str], None]) -> None:
        """Call *listener(address)* when a new calls connection to a worker opens (what the
        worker tied to the last one ended with it)."""
        self._connected.append(listener)

    def pick(self, op: str | None = None, *, exclude: Sequence[str] = ()) -> WorkerRecord | None:
        """The least-loaded healthy worker supporting *op* (None: no such worker)."""
        return self.registry.pick(op, exclude=frozenset(exclude))

    def changed(self, address: str, change: Change) -> None:
        """Apply a routability change: on DOWN, end the calls waiting on the worker.

        (On RESTARTED the connection that answered is to the new process: calls
        to the old one have already failed with their connection.)
        """
        if change is Change.NONE:
            return
        if change is Change.DOWN:
            for scope in self._scopes.pop(address, set()):
                scope.cancel()
            # Calls started without a task fail with the connection (WorkerUnavailable).
            self._close_client(address)
        for listener in self._listeners:
            listener(address, change)

    def mark_down(self, address: str, reason: str) -> None:
        change = self.registry.check_failed(address, reason, anyio.current_time())
        if change is Change.DOWN:
            log.warning("Worker %s is down: %s", address, reason)
        self.changed(address, change)

    def forget(self, address: str) -> None:
        """The worker left the registry (it said goodbye): no new calls go there.

        Calls in flight finish (a worker says goodbye before it stops serving);
        the connection is closed once they have.
        """
        self._unproven.discard(address)
        if self._scopes.get(address) or self._started.get(address):
            self._closing.add(address)
        else:
            self._close_client(address)
        # Nothing kept per address outlives the worker: discovered addresses come and go.
        self._credentials.pop(address, None)
        for key in ((address, False), (address, True)):
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]
        for listener in self._listeners:
            listener(address, Change.DOWN)

    # -- credentials -------------------------------------------------------------

    def credential(self, address: str) -> tuple[tuple[str, str], ...]:
        """The metadata the scheduler presents to the worker at *address*."""
        found = self._credentials.get(address)
        if found is None:
            found = self._credentials[address] = self.own.metadata_for(address)
        return found

    def _metadata(
        self, address: str, metadata: Sequence[tuple[str, str]]
    ) -> Sequence[tuple[str, str]]:
        own = self.credential(address)
        if not metadata:
            return own
        return (*own, *(m for m in metadata if m[0] != METADATA_KEY))

    def refused(self, address: str, exc: RPCError) -> RPCError:
        """What the scheduler answers when the worker at *address* refused its credential."""
        log.warning("Worker %s refused the scheduler's credential: %s", address, exc.message)
        return RPCError(
            StatusCode.UNAUTHENTICATED,
            f"{self.hop}: worker {address} refused the scheduler's own credential "
            f"({exc.message}); give the scheduler the workers' cluster token: "
            "vaccelray scheduler --token-file FILE (or VACCELRAY_TOKEN)",
        )

    # -- connections -----------------------------------------------------------

    def _close_client(self, address: str) -> None:
        for table in (self._clients, self._probes):
            client = table.pop(address, None)
            if client is not None:
                client.abort()

    async def client(self, address: str, *, connect_timeout: float | None = None) -> Client:
        """The open connection to *address*, connecting if needed (raises ConnectError;
        MembershipError when the worker does not prove it holds the cluster token)."""
        return await self._connection(address, False, connect_timeout)

    async def probe_client(self, address: str, *, connect_timeout: float | None = None) -> Client:
        """The health checks' own connection to *address* (raises ConnectError).

        Apart from the calls' connection, so that a check's answer never waits
        behind a burst of large answers to calls: a busy worker is not a dead one.
        """
        return await self._connection(address, True, connect_timeout)

    async def _connection(self, address: str, probe: bool, timeout: float | None) -> Client:
        table = self._probes if probe else self._clients
        client = table.get(address)
        if client is not None and not client.is_closed:
            return client
        lock = self._locks.setdefault((address, probe), anyio.Lock())
        async with lock:
            client = table.get(address)
            if client is not None and not client.is_closed:
                return client
            try:
                client = await open_client(
                    address,
                    connect_timeout=timeout or self.connect_timeout,
                    max_message_size=self.max_message_size,
                    coalesce=not probe,  # the calls forwarded from one read leave in one write
                    ssl=self.own.ssl_for(address),
                    setup=self.own.setup_for(address),  # the worker proves itself first
                )
            except MembershipError as exc:
                if address not in self._unproven:  # once, not at every health check
                    self._unproven.add(address)
                    log.warning("Worker %s is not routed to: %s", address, exc)
                raise
            self._unproven.discard(address)
            table[address] = client
            if not probe:
                for listener in self._connected:
                    listener(address)
            return client

    def drop_client(self, address: str) -> None:
        """Close the connection to *address* (the next call reconnects)."""
        self._close_client(address)

    async def aclose(self) -> None:
        for address in {*self._clients, *self._probes}:
            self._close_client(address)
        await anyio.lowlevel.checkpoint()

    # -- calls ---------------------------------------------------------------

    async def call(
        self,
        address: str,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> bytes:
        """Call *service*/*method* on the worker at *address*.

        Raises :class:`~vaccelray.errors.RPCError` for the worker's own
        non-OK answers (and DEADLINE_EXCEEDED when *timeout* passes), and
        :class:`WorkerUnavailable` when the worker cannot be reached, its
        connection breaks, or it is declared down while the call waits.
        """
        try:
            client = await self.client(address)
        except ConnectError as exc:
            self.mark_down(address, str(exc))
            raise WorkerUnavailable(address, str(exc), sent=False) from exc
        registry = self.registry
        scope = anyio.CancelScope()
        scopes = self._scopes.setdefault(address, set())
        scopes.add(scope)
        registry.call_started(address)
        try:
            with scope:
                return await client.call(
                    service,
                    method,
                    payload,
                    timeout=timeout,
                    metadata=self._metadata(address, metadata),
                )
        except RPCError as exc:
            if exc.code == StatusCode.UNAUTHENTICATED:
                raise self.refused(address, exc) from exc
            raise
        except TransportError as exc:
            self.mark_down(address, f"connection lost: {exc}")
            raise WorkerUnavailable(
                address, f"connection to {address} lost: {exc}", sent=True
            ) from exc
        finally:
            scopes.discard(scope)
            self._call_ended(address)
        # Only reached when ``changed`` cancelled the scope: the worker went down.
        raise WorkerUnavailable(address, f"worker {address} became unavailable", sent=True)

    def start(
        self,
        address: str,
        service: str,
        method: str,
        payload: bytes,
        callback: Callable[[Outcome], None],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        expire: bool = True,
    ) -> StartedCall | None:
        """:meth:`call` without a task, on the open connection to *address*; None if none is.

        *callback* gets the answer's payload or what :meth:`call` would raise
        (:class:`WorkerUnavailable` with ``sent=True`` when the connection
        breaks or the worker is declared down meanwhile), or CancelledError
        after :meth:`StartedCall.cancel`. Raises RPCError when *timeout* has
        already passed. *expire* as for :meth:`Client.start_call`.
        """
        client = self._clients.get(address)
        if client is None:
            return None
        call = StartedCall(self, address, callback)
        try:
            call.pending = client.start_call(
                service,
                method,
                payload,
                call.finish,
                timeout=timeout,
                metadata=self._metadata(address, metadata)
                if metadata
                else self.credential(address),
                expire=expire,
            )
        except TransportError:
            return None
        self._call_started(address)
        return call

    def send(
        self,
        address: str,
        service: str,
        method: str,
        payload: bytes,
        waiter: Waiter,
        *,
        timeout: float | None = None,
    ) -> tuple[Client, int] | None:
        """:meth:`start` at its leanest, for a relay's hot path: *waiter* answers itself.

        The request leaves on the open connection to *address* (None if none
        is); returned are that connection and the call's stream id (to
        :meth:`abandon` it). ``waiter.finish`` gets the connection's outcome,
        which it passes through :meth:`ended` first (where the call ends,
        and an outcome of the worker's connection becomes what :meth:`call`
        raises). *timeout* is only sent to the worker.
        """
        client = self._clients.get(address)
        if client is None:
            return None
        try:
            stream_id = client.send(
                service, method, payload, waiter, timeout=timeout, metadata=self.credential(address)
            )
        except TransportError:
            return None
        self._call_started(address)
        return client, stream_id

    def abandon(self, address: str, sent: tuple[Client, int], waiter: Waiter) -> None:
        """Abandon a call :meth:`send` started (if it is still waiting): it ends now."""
        client, stream_id = sent
        if client.abandon(stream_id, waiter):
            self.ended(address, asyncio.CancelledError())

    def ended(self, address: str, outcome: Outcome) -> Outcome:
        """A call :meth:`start` or :meth:`send` started ended with *outcome*: what the caller gets.

        A broken connection marks the worker down (WorkerUnavailable, ``sent=True``);
        a worker refusing the scheduler's credential is the scheduler's problem.
        """
        left = self._started[address] - 1
        if left:
            self._started[address] = left
        else:
            del self._started[address]
        self._call_ended(address)
        if isinstance(outcome, bytes):
            return outcome
        if isinstance(outcome, TransportError):
            self.mark_down(address, f"connection lost: {outcome}")
            return WorkerUnavailable(address, f"connection to {address} lost: {outcome}", sent=True)
        if isinstance(outcome, RPCError) and outcome.code == StatusCode.UNAUTHENTICATED:
            return self.refused(address, outcome)
        return outcome

    def _call_started(self, address: str) -> None:
        self._started[address] = self._started.get(address, 0) + 1
        self.registry.call_started(address)

    def _call_ended(self, address: str) -> None:
        registry = self.registry
        registry.call_ended(address)
        if (
            address in self._closing
            and not self._scopes.get(address)
            and not self._started.get(address)
        ):
            self._closing.discard(address)
            if address not in registry:
                self._close_client(address)
