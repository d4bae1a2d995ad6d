"""The clients behind the scheduler's connections, for the workers' object stores.

A worker keeps a client's objects while the client has a connection to it,
and for its grace period (``--object-grace``) after the last one closes. A
client that comes through the scheduler speaks to the worker on the
scheduler's connection, which outlives the client: the scheduler tells the
worker instead (``ClientPresence``). It knows a client by the id its
requests name (``Submit.client``, the object methods' ``client``) and the
connections it used; when the client's last connection to the scheduler
closes, each worker it sent tasks or objects to is told it is gone (its
grace starts there), and when it comes back within a while (the newest
``MAX_GONE`` gone clients are remembered) that it is present again.

A connection whose client owns objects on some worker (it put one, or a
result was kept for it) holds state: the scheduler does not close it for
being quiet, as a worker would not.

It also remembers the tasks a client cancelled before their Submit came (a
lane's Submit and the main connection's Cancel race by two connections): the
newest ``MAX_CANCELLED_EARLY`` of each client, for as long as it has a
connection, so no client's cancels push out another's.

Bounds: a connection names at most ``MAX_CLIENTS_PER_CONNECTION`` clients (a
real client names one); one more is RESOURCE_EXHAUSTED. So the table holds at
most that many clients per open connection, each with at most the workers
the registry knows and ``MAX_CANCELLED_EARLY`` task ids.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Final

from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import CLIENT_PRESENCE
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.transport.client import Outcome

__all__ = ["MAX_CANCELLED_EARLY", "MAX_CLIENTS_PER_CONNECTION", "MAX_GONE", "ClientTable"]

log = logging.getLogger("vaccelray.routing")

#: Client ids one connection may name.
MAX_CLIENTS_PER_CONNECTION: Final = 4
#: Gone clients remembered, to tell their workers when they come back.
MAX_GONE: Final = 4096
#: Tasks of one client remembered as cancelled before their Submit came.
MAX_CANCELLED_EARLY: Final = 256
#: Seconds a ClientPresence may take.
_PRESENCE_TIMEOUT: Final = 5.0


@dataclass
class _Client:
    connections: set[int] = field(default_factory=set)
    #: The workers it sent tasks or objects to (their addresses).
    workers: set[str] = field(default_factory=set)
    #: Whether it owns objects on one of them (as far as the scheduler saw).
    owns: bool = False
    #: Its tasks cancelled before their Submit came (task ids, oldest first).
    cancelled_early: dict[str, None] = field(default_factory=dict)


class ClientTable:
    """Which client ids speak on which connections, and where their objects may be."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._clients: dict[str, _Client] = {}
        self._on: dict[int, set[str]] = {}
        #: Gone clients (oldest first), to tell their workers if they come back.
        self._gone: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        pool.add_connected_listener(self._connected)

    def seen(self, client: str, connection_id: int) -> None:
        """*client* speaks on *connection_id*; RESOURCE_EXHAUSTED past the bound."""
        if not client:
            return
        state = self._clients.get(client)
        if state is not None and connection_id in state.connections:
            return
        names = self._on.setdefault(connection_id, set())
        if len(names) >= MAX_CLIENTS_PER_CONNECTION:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this connection named {len(names)} client ids, the most it may",
            )
        names.add(client)
        if state is None:
            state = self._gone.pop(client, None)
            if state is not None:  # back: its workers hold its objects again
                self._tell(client, state.workers, present=True)
            else:
                state = _Client()
            self._clients[client] = state
        state.connections.add(connection_id)

    def used(self, client: str, address: str, *, owns: bool = False) -> None:
        """*client* sent a task or an object to the worker at *address*; *owns*: it owns
        an object there now."""
        state = self._clients.get(client) if client else None
        if state is not None:
            state.workers.add(address)
            state.owns = state.owns or owns

    def cancel_early(self, client: str, connection_id: int, task_id: str) -> None:
        """*client*'s Cancel on *connection_id* found no task *task_id*: its Submit may
        still be on its way by another connection (RESOURCE_EXHAUSTED as for :meth:`seen`)."""
        self.seen(client, connection_id)
        early = self._clients[client].cancelled_early
        early[task_id] = None
        if len(early) > MAX_CANCELLED_EARLY:
            del early[next(iter(early))]

    def cancelled_before(self, client: str, task_id: str) -> bool:
        """Whether *client* cancelled *task_id* before its Submit came (forgotten once asked)."""
        state = self._clients.get(client)
        if state is None or task_id not in state.cancelled_early:
            return False
        del state.cancelled_early[task_id]
        return True

    def holds_state(self, connection_id: int) -> bool:
        """Whether a client speaking on *connection_id* owns objects on a worker."""
        clients = self._clients
        return any(clients[c].owns for c in self._on.get(connection_id, ()))

    def connection_closed(self, connection_id: int) -> None:
        """Tell the workers of the clients this connection was the last of that they left."""
        for client in self._on.pop(connection_id, ()):
            state = self._clients[client]
            state.connections.discard(connection_id)
            if state.connections:
                continue
            del self._clients[client]
            state.cancelled_early.clear()
            if not state.workers:
                continue
            self._tell(client, state.workers, present=False)
            self._gone[client] = state
            while len(self._gone) > MAX_GONE:
                self._gone.popitem(last=False)

    def _connected(self, address: str) -> None:
        """A new connection to the worker at *address*: the claims of the clients owning
        objects there ended with the last one (their grace runs); renew them on this one."""
        for client, state in self._clients.items():
            if state.owns and address in state.workers:
                self._tell(client, {address}, present=True)

    def _tell(self, client: str, workers: set[str], *, present: bool) -> None:
        """Send ClientPresence to each of *workers* now, on the open connection to it (one
        closed meanwhile ended the client's claim there by itself)."""
        payload = CLIENT_PRESENCE.request.encode(wire.ClientPresence(client, present))
        for address in workers:

            def answered(outcome: Outcome, address: str = address) -> None:
                if isinstance(outcome, BaseException):
                    log.info("ClientPresence of %s to %s failed: %s", client, address, outcome)

            self.pool.start(
                address,
                CLIENT_PRESENCE.service,
                CLIENT_PRESENCE.method,
                payload,
                answered,
                timeout=_PRESENCE_TIMEOUT,
            )
