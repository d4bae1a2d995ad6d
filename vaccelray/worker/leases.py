"""Leased pool processes: a client on this host talks to a process of its own, directly.

A blocking round trip through the worker crosses three processes (client,
worker, pool process) and the worker's event loop twice. A client on a unix
socket may instead lease a pool process (``Lease``): the worker starts one,
sandboxed and limited as its pool's, and hands the client the other end of
that process's task socket (see :mod:`vaccelray.worker.poolchild`). The client
then writes ``Run`` frames and reads ``Done`` frames itself
(:mod:`vaccelray.client.direct`). A result too large to travel back inline
comes to the worker instead, as a sealed segment on the process's channel,
and is kept in the object store for the leasing client, as any task's kept
result is.

The sockets are handed over on an abstract unix socket of the worker's own,
the *handoff*: the client sends the lease id and the Lease's one-time ticket
(32 random bytes), from a process of the same uid as the connection that
leased (``SO_PEERCRED``); the worker answers with the fd (``SCM_RIGHTS``) or
with a refusal. A ticket not used within :data:`TICKET_TTL` ends its lease.

The same handoff gives a client a *lane* to an actor's process
(``LeaseActor``, see :mod:`vaccelray.worker.actors`): one end of a socket
pair whose other end the process serves beside the worker's socket. An
actor's process serves at most ``poolchild.MAX_LANES`` lanes; a lane ends
with the process, or when its client closes it.

What the worker keeps: how many leased processes there are (``max_leases``,
``max_per_connection``: RESOURCE_EXHAUSTED past them), their sandbox and
limits, the run timeout (the process ends itself with SIGALRM past it, as no
one else sees its tasks), and their end: a lease ends when the connection that
made it closes, when the client closes its socket (the process exits), on
``EndLease`` (killed; the answer is its exit status, so a client that lost its
process can say why), or when its ticket expires. The worker's task metrics
do not see leased calls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Final

import anyio
from anyio.abc import TaskGroup

from vaccelray import segments
from vaccelray.auth import TokenCheck
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.services import END_LEASE, LEASE, LEASE_ACTOR
from vaccelray.transport.server import CallContext, Method
from vaccelray.worker.actors import ActorService
from vaccelray.worker.objects import ObjectStore
from vaccelray.worker.pool import Pool, exit_status
from vaccelray.worker.poolchild import RESULT_TAG

__all__ = [
    "DEFAULT_MAX_LEASES_PER_CONNECTION",
    "HANDOFF_TIMEOUT",
    "ID_BYTES",
    "TICKET_BYTES",
    "TICKET_TTL",
    "LeaseService",
]

log = logging.getLogger("vaccelray.leases")

#: Leased processes of one connection (a client leases one per thread that waits on
#: its calls, up to ``vaccelray.client.core``'s lanes).
DEFAULT_MAX_LEASES_PER_CONNECTION: Final = 4
#: Bytes of a lease id (hex: twice as many characters) and of its ticket.
ID_BYTES: Final = 8
TICKET_BYTES: Final = 32
#: Seconds a ticket may wait for the client to fetch its sockets.
TICKET_TTL: Final = 10.0
#: Seconds a handoff connection may take to name its lease.
HANDOFF_TIMEOUT: Final = 5.0
#: Handoff connections served at once; more are closed at once.
_MAX_HANDOFFS: Final = 16
#: Ended leases whose exit status EndLease still tells (its client may ask just after).
_KEEP_ENDED: Final = 256
#: Seconds EndLease waits for a killed process to be reaped.
_REAP_WAIT: Final = 5.0
_CREDENTIALS: Final = struct.Struct("3i")  # pid, uid, gid


class _Offer:
    """A socket waiting at the handoff for its client: its ticket, the user who may fetch
    it, and what ends it when nobody does in time."""

    __slots__ = ("expiry", "sock", "ticket", "uid")

    def __init__(self, sock: socket.socket, uid: int, expiry: asyncio.TimerHandle) -> None:
        self.sock = sock
        self.ticket = secrets.token_bytes(TICKET_BYTES)
        self.uid = uid
        self.expiry = expiry

    def withdraw(self) -> None:
        self.expiry.cancel()
        self.sock.close()


class _Lease:
    def __init__(
        self,
        lease_id: str,
        connection_id: int,
        client: str,
        process: subprocess.Popen[bytes],
        channel: socket.socket,
    ) -> None:
        self.lease_id = lease_id
        self.connection_id = connection_id
        #: Who owns the results kept (as ``Submit.client``).
        self.client = client
        self.process = process
        #: The worker's end of the process's channel (large results come on it).
        self.channel = channel
        #: How the process ended (None: it runs).
        self.status: str | None = None
        self.ended = asyncio.Event()

    def kill(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


class LeaseService:
    """The Lease, EndLease and LeaseActor methods, the handoff socket, and the leased
    processes."""

    def __init__(
        self,
        pool: Pool,
        check: TokenCheck,
        objects: ObjectStore,
        *,
        max_leases: int,
        max_per_connection: int,
        task_timeout: float,
        actors: ActorService | None = None,
    ) -> None:
        """At most *max_leases* processes (0: leases are off, and lanes), *max_per_connection*
        of one connection (0: no limit); a leased task or a lane's call runs at most
        *task_timeout* s (0: no limit); large results are kept in *objects*; lanes go to
        the processes of *actors*."""
        self.pool = pool
        self.check = check
        self.objects = objects
        self.max_leases = max_leases
        self.max_per_connection = max_per_connection
        self.task_timeout = task_timeout
        self.actors = actors
        self.leases: dict[str, _Lease] = {}
        #: The sockets waiting at the handoff, by lease id (a lane's: an id of its own).
        self.offers: dict[str, _Offer] = {}
        #: The connection and exit status of leases ended lately, oldest first.
        self.ended: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
        #: The handoff socket's abstract name (without its leading NUL).
        self.name = f"vaccelray-lease-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener: socket.socket | None = None
        self._handoffs = 0
        self._closing = False

    def methods(self) -> dict[str, Method]:
        return {
            LEASE.method: Method(self._lease, inline=True),
            END_LEASE.method: Method(self._end),
            LEASE_ACTOR.method: Method(self._lease_actor),
        }

    # -- methods ---------------------------------------------------------------

    def _caller(self, ctx: CallContext, one: str, many: str) -> int:
        """The uid of a caller who may lease *one* (of *many*): on a unix socket, leases on."""
        uid = ctx.origin.uid
        if uid is None:
            raise RPCError(
                StatusCode.FAILED_PRECONDITION,
                f"{one} is leased only on a unix socket (the client must be on this host)",
            )
        if not self.max_leases or self._listener is None:
            raise RPCError(
                StatusCode.FAILED_PRECONDITION,
                f"this worker leases no {many} (worker option --max-leases)",
            )
        if self._closing:
            raise RPCError(StatusCode.UNAVAILABLE, "the worker is shutting down")
        return uid

    def _lease(self, payload: bytes, ctx: CallContext) -> bytes:
        self.check.check(ctx)
        request = LEASE.request.decode(payload)
        LEASE.check(request, 0)
        uid = self._caller(ctx, "a pool process", "pool processes")
        if len(self.leases) >= self.max_leases:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this worker has {self.max_leases} leased pool processes, its most "
                "(worker option --max-leases)",
            )
        limit = self.max_per_connection
        if limit and self.leased_by(ctx.connection_id) >= limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this connection leased {limit} pool processes, its most (worker option "
                "--max-leases-per-connection)",
            )
        lease, ticket = self._start(ctx.connection_id, uid, request.client)
        return LEASE.reply.encode(wire.Leased(lease.lease_id, ticket, "@" + self.name))

    async def _lease_actor(self, payload: bytes, ctx: CallContext) -> bytes:
        self.check.check(ctx)
        request = LEASE_ACTOR.request.decode(payload)
        LEASE_ACTOR.check(request, 0)
        uid = self._caller(ctx, "an actor's lane", "actor lanes")
        if self.actors is None:
            raise RPCError(StatusCode.FAILED_PRECONDITION, "this worker runs no actors")
        ours, theirs = socket.socketpair()
        try:
            await self.actors.lane(request.actor_id, ours)
            lane_id = secrets.token_hex(ID_BYTES)
            ticket = self._offer(lane_id, theirs, uid, self._withdraw)
        except BaseException:
            theirs.close()
            raise
        return LEASE_ACTOR.reply.encode(wire.Leased(lane_id, ticket, "@" + self.name))

    def _offer(
        self, offer_id: str, sock: socket.socket, uid: int, expired: Callable[[str], object]
    ) -> bytes:
        """Put *sock* at the handoff for user *uid* under *offer_id*: its ticket.
        Not fetched within TICKET_TTL, ``expired(offer_id)`` ends it."""
        loop = asyncio.get_running_loop()
        offer = _Offer(sock, uid, loop.call_later(TICKET_TTL, expired, offer_id))
        self.offers[offer_id] = offer
        return offer.ticket

    def _withdraw(self, offer_id: str) -> None:
        offer = self.offers.pop(offer_id, None)
        if offer is not None:
            offer.withdraw()

    def _start(self, connection_id: int, uid: int, client: str) -> tuple[_Lease, bytes]:
        """Spawn a leased process and watch for its end and its large results."""
        try:
            process, sock, channel = self.pool.spawn_process(self.task_timeout)
        except OSError as exc:
            raise RPCError(
                StatusCode.UNAVAILABLE, f"cannot start a pool process to lease: {exc}"
            ) from None
        lease_id = secrets.token_hex(ID_BYTES)
        lease = _Lease(lease_id, connection_id, client, process, channel)
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError:  # cannot watch it: do not lease it
            lease.kill()
            process.wait()
            sock.close()
            channel.close()
            raise RPCError(
                StatusCode.FAILED_PRECONDITION, "this host cannot watch a leased process (pidfd)"
            ) from None
        loop.add_reader(pidfd, self._exited, lease, pidfd)
        loop.add_reader(channel.fileno(), self._deposit, lease)
        ticket = self._offer(lease_id, sock, uid, self._expired)
        self.leases[lease.lease_id] = lease
        log.debug("Leased pool process %d to connection %d", process.pid, connection_id)
        return lease, ticket

    async def _end(self, payload: bytes, ctx: CallContext) -> bytes:
        self.check.check(ctx)
        request = END_LEASE.request.decode(payload)
        lease = self.leases.get(request.lease_id)
        ended = self.ended.get(request.lease_id)
        if lease is None and ended is not None and ended[0] == ctx.connection_id:
            return END_LEASE.reply.encode(wire.LeaseEnded(ended[1]))
        if lease is None or lease.connection_id != ctx.connection_id:
            raise RPCError(StatusCode.NOT_FOUND, f"no lease {request.lease_id[:40]} here")
        lease.kill()
        with anyio.move_on_after(_REAP_WAIT):
            await lease.ended.wait()
        return END_LEASE.reply.encode(wire.LeaseEnded(lease.status or "stopped answering"))

    # -- the processes ---------------------------------------------------------

    def leased_by(self, connection_id: int) -> int:
        return sum(1 for lease in self.leases.values() if lease.connection_id == connection_id)

    def holds_state(self, connection_id: int) -> bool:
        """A connection with leases is not closed for being quiet (they die with it)."""
        return any(lease.connection_id == connection_id for lease in self.leases.values())

    def connection_closed(self, connection_id: int) -> None:
        for lease in list(self.leases.values()):
            if lease.connection_id == connection_id:
                lease.kill()

    def _expired(self, lease_id: str) -> None:
        self._withdraw(lease_id)
        lease = self.leases.get(lease_id)
        if lease is not None:
            log.info("Lease %s was not taken within %g s: its process is stopped",
                     lease_id, TICKET_TTL)  # fmt: skip
            lease.kill()

    def _exited(self, lease: _Lease, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        loop.remove_reader(lease.channel.fileno())
        lease.channel.close()
        lease.status = exit_status(lease.process.wait())
        self._withdraw(lease.lease_id)
        self.leases.pop(lease.lease_id, None)
        self.ended[lease.lease_id] = (lease.connection_id, lease.status)
        while len(self.ended) > _KEEP_ENDED:
            self.ended.popitem(last=False)
        lease.ended.set()
        log.debug("Leased pool process %d %s", lease.process.pid, lease.status)

    def _deposit(self, lease: _Lease) -> None:
        """Keep the large result the process sent on its channel; answer it its id."""
        try:
            if not lease.channel.recv(1, socket.MSG_PEEK):  # it ended: _exited follows
                asyncio.get_running_loop().remove_reader(lease.channel.fileno())
                return
            fds = segments.receive_fds(lease.channel, RESULT_TAG, 1)
        except BlockingIOError:
            return
        except (OSError, segments.SegmentError) as exc:  # it broke the channel's rules
            self._misbehaved(lease, f"sent on its channel what is not a result ({exc})")
            return
        fd = fds[0]
        try:
            size = os.fstat(fd).st_size
            segments.check(fd, size)
            store = self.objects
            owner = store.owner(lease.client, lease.connection_id)
            answer = b"+" + store.adopt(os.dup(fd), size, owner, lease.connection_id).encode()
        except segments.SegmentError as exc:
            answer = f"-the result is not a sealed segment ({exc})".encode()
        except RPCError as exc:
            answer = b"-" + exc.message.encode()
        finally:
            os.close(fd)
        try:
            lease.channel.send(answer)
        except OSError as exc:  # it does not read its answers
            self._misbehaved(lease, f"does not read its channel ({exc})")

    def _misbehaved(self, lease: _Lease, why: str) -> None:
        log.warning("Leased pool process %d %s: it is stopped", lease.process.pid, why)
        asyncio.get_running_loop().remove_reader(lease.channel.fileno())
        lease.kill()

    # -- the handoff -----------------------------------------------------------

    def listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind("\0" + self.name)
            listener.listen(_MAX_HANDOFFS)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        return listener

    async def serve_handoffs(self, listener: socket.socket, tg: TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            if self._handoffs >= _MAX_HANDOFFS:
                conn.close()
                continue
            self._handoffs += 1
            tg.start_soon(self._handoff, conn)

    async def _handoff(self, conn: socket.socket) -> None:
        try:
            with conn, anyio.move_on_after(HANDOFF_TIMEOUT):
                conn.setblocking(False)
                loop = asyncio.get_running_loop()
                wanted = 2 * ID_BYTES + TICKET_BYTES
                data = b""
                while len(data) < wanted:
                    more = await loop.sock_recv(conn, wanted - len(data))
                    if not more:
                        return
                    data += more
                sock = self._take(conn, data)
                if sock is None:
                    await loop.sock_sendall(conn, b"no")
                    return
                with sock:
                    socket.send_fds(conn, [b"ok"], [sock.fileno()])
        except OSError as exc:  # the peer went away
            log.debug("A lease handoff failed: %s", exc)
        except Exception:  # one peer's handoff never ends the service (a bug: said loudly)
            log.exception("A lease handoff failed")
        finally:
            self._handoffs -= 1

    def _take(self, conn: socket.socket, data: bytes) -> socket.socket | None:
        """The socket *data* names, when its ticket is right and the peer is the leasing
        user (taken: no one fetches it again); else None."""
        offer_id = data[: 2 * ID_BYTES].decode("ascii", "replace")
        offer = self.offers.get(offer_id)
        if offer is None:
            return None
        if not hmac.compare_digest(data[2 * ID_BYTES :], offer.ticket):
            return None
        _, uid, _ = _CREDENTIALS.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
        )
        if uid != offer.uid:
            return None
        del self.offers[offer_id]
        offer.expiry.cancel()
        return offer.sock

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[LeaseService]:
        """This service, its handoff socket served while the block runs (none when leases
        are off); its leased processes are stopped at the end."""
        if not self.max_leases:
            yield self
            return
        listener = self.listen()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.serve_handoffs, listener, tg)
                try:
                    yield self
                finally:
                    await self.aclose()
                    tg.cancel_scope.cancel()
        finally:
            listener.close()

    async def aclose(self) -> None:
        """Stop every leased process (and wait, briefly, for them to be reaped)."""
        self._closing = True
        for offer_id in list(self.offers):
            self._withdraw(offer_id)
        leases = list(self.leases.values())
        for lease in leases:
            lease.kill()
        with anyio.move_on_after(_REAP_WAIT), anyio.CancelScope(shield=True):
            for lease in leases:
                await lease.ended.wait()
