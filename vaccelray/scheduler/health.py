"""Active health checks: every worker is asked ``vaccelray.v1.Worker/Info`` on a timer.

mDNS never says a worker died (a crashed worker's record lingers for many
minutes), so the scheduler finds out itself: a check that fails or gets no
answer within ``timeout`` takes the worker out of routing at once, and the
first check that succeeds again puts it back. With the defaults (every 0.5 s,
1 s timeout) a dead or hung worker leaves routing within 1.5 s of its last
answer, and a restarted one returns within about 0.5 s of being reachable.

A worker that answers Info with UNIMPLEMENTED is a plain vAccel agent (not
vaccelray): it is up, with the agent's operations and capacity 1. One that
answers as a scheduler (this one, found through a forged record, or another)
is refused: calls routed there would come back round. A discovered worker
that has never answered is checked less and less often (up to every
:data:`MAX_BACKOFF` seconds), and :meth:`HealthChecker.recheck` checks one
now (zeroconf saw its goodbye).

What a failed check records (``last_error``, shown by ``vaccelray status``)
is the scheduler's own words, never bytes the peer sent.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from vaccelray.errors import ConnectError, RPCError, StatusCode, TransportError
from vaccelray.membership import MembershipError
from vaccelray.protocol.info import SCHEDULER_BACKEND, InfoRequest, WorkerInfo
from vaccelray.protocol.services import INFO
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.scheduler.registry import Change, WorkerRecord

__all__ = ["AGENT_INFO", "MAX_BACKOFF", "HealthChecker"]

log = logging.getLogger("vaccelray.scheduler")

#: What a plain vAccel agent (no Info method) is taken to be.
AGENT_INFO = WorkerInfo(
    version="",
    instance="vaccel-agent",
    backend="vaccel-agent",
    ops=("classify", "genop"),
    capacity=1,
)

#: Seconds between checks of a discovered worker that has never answered, at most.
MAX_BACKOFF = 10.0


class _Refused(Exception):
    """A check that was answered, by something that is not a usable worker."""


class HealthChecker:
    """Checks every worker of a pool; run :meth:`run` in a task group.

    *instance* is the scheduler's own instance id: a worker answering with it
    is this scheduler.
    """

    def __init__(
        self,
        pool: WorkerPool,
        *,
        interval: float = 0.5,
        timeout: float = 1.0,
        instance: str = "",
    ) -> None:
        self.pool = pool
        self.interval = interval
        self.timeout = timeout
        self.instance = instance
        self._watched: dict[str, anyio.Event] = {}
        self._wake = anyio.Event()

    def poke(self) -> None:
        """Look for new workers now (zeroconf found one, say) instead of at the next tick."""
        self._wake.set()

    def recheck(self, address: str) -> None:
        """Check the worker at *address* now instead of at its next turn."""
        nudge = self._watched.get(address)
        if nudge is not None:
            nudge.set()

    def delay(self, record: WorkerRecord | None) -> float:
        """Seconds until *record*'s next check: backed off while it never answered."""
        if record is None or not record.discovered or record.last_seen is not None:
            return self.interval
        return min(self.interval * (1 << min(record.failures, 16)), MAX_BACKOFF)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                for record in self.pool.registry:
                    if record.address not in self._watched:
                        self._watched[record.address] = anyio.Event()
                        tg.start_soon(self._watch, record.address)
                with anyio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _watch(self, address: str) -> None:
        registry = self.pool.registry
        try:
            while address in registry:
                await self.check(address)
                nudge = self._watched[address] = anyio.Event()
                with anyio.move_on_after(self.delay(registry.get(address))):
                    await nudge.wait()
        finally:
            del self._watched[address]

    def _refusal(self, info: WorkerInfo) -> str | None:
        if self.instance and info.instance == self.instance:
            return "it is this scheduler (calls would come back here)"
        if info.backend == SCHEDULER_BACKEND:
            return "it is a scheduler, not a worker"
        return None

    async def check(self, address: str) -> Change:
        """Check one worker now; returns what changed (already applied to the pool)."""
        pool = self.pool
        registry = pool.registry
        record = registry.get(address)
        goodbye = record is not None and record.goodbye and not record.answered_goodbye
        last_error = "" if record is None else record.last_error
        try:
            with anyio.fail_after(self.timeout):
                client = await pool.probe_client(address, connect_timeout=self.timeout)
                request = INFO.request.encode(InfoRequest())
                try:
                    payload = await client.call(
                        INFO.service, INFO.method, request, timeout=self.timeout
                    )
                except RPCError as exc:
                    if exc.code not in (StatusCode.UNIMPLEMENTED, StatusCode.INVALID_ARGUMENT):
                        raise
                    info = AGENT_INFO  # no vaccelray service: a plain vAccel agent
                else:
                    try:
                        info = INFO.reply.decode(payload)
                    except RPCError:
                        raise _Refused("its Info answer is garbled or implausible") from None
            refusal = self._refusal(info)
            if refusal is not None:
                raise _Refused(refusal)
        except (TimeoutError, RPCError, TransportError, OSError, _Refused) as exc:
            reason = self._reason(exc)
            change = registry.check_failed(address, reason, anyio.current_time())
            if change is Change.DOWN:
                log.warning("Worker %s is down: %s", address, reason)
            elif isinstance(exc, _Refused) and record is not None and last_error != reason:
                log.warning("Worker %s %s", address, reason)
            pool.drop_client(address)
        else:
            change = registry.check_ok(address, info, anyio.current_time())
            if goodbye:
                log.info("Worker %s still answers after a goodbye: it stays while it does", address)
            if change is Change.UP:
                log.info("Worker %s is up (%s, capacity %d)", address, info.backend, info.capacity)
            elif change is Change.RESTARTED:
                log.warning(
                    "Worker %s restarted (instance %s): its sessions are gone",
                    address,
                    info.instance,
                )
        pool.changed(address, change)
        if change is Change.UP:
            await self._connect(address)
        if record is not None and address not in registry:
            log.info("Worker %s left (it said goodbye, or its name moved)", address)
            pool.forget(address)
        return change

    async def _connect(self, address: str) -> None:
        """Open the calls connection to a worker that came up, rather than at its next call:
        the clients owning objects there renew their claims on it at once (see
        :mod:`vaccelray.scheduler.clients`), before the grace that began when the last
        connection closed runs out."""
        try:
            with anyio.fail_after(self.timeout):
                await self.pool.client(address, connect_timeout=self.timeout)
        except (TimeoutError, ConnectError, MembershipError, OSError) as exc:
            log.info("Worker %s is up, but its calls connection is not yet: %s", address, exc)

    def _reason(self, exc: BaseException) -> str:
        """Why a check failed, in the scheduler's words (no peer bytes)."""
        if isinstance(exc, TimeoutError):
            return f"no answer to the health check within {self.timeout:g} s"
        if isinstance(exc, _Refused):
            return f"refused: {exc}"
        if isinstance(exc, RPCError):
            try:
                return f"health check answered {StatusCode(exc.code).name}"
            except ValueError:
                return f"health check answered status {int(exc.code)}"
        if isinstance(exc, MembershipError):
            return "refused: it did not prove it holds the cluster token"
        if isinstance(exc, ConnectError):
            return "health check cannot connect"
        return "health check connection failed"
