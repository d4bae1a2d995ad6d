"""Active health checks: every worker is asked ``vaccelray.v1.Worker/Info`` on a timer.

mDNS never says a worker died (a crashed worker's record lingers for many
minutes), so the scheduler finds out itself: a check that fails or gets no
answer within ``timeout`` takes the worker out of routing at once, and the
first check that succeeds again puts it back. With the defaults (every 0.5 s,
1 s timeout) a dead or hung worker leaves routing within 1.5 s of its last
answer, and a restarted one returns within about 0.5 s of being reachable.

A worker that answers Info with UNIMPLEMENTED is a plain vAccel agent (not
vaccelray): it is up, with the agent's operations and capacity 1.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from vaccelray.errors import RPCError, StatusCode, TransportError
from vaccelray.protocol.info import InfoRequest, WorkerInfo
from vaccelray.protocol.services import INFO
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.scheduler.registry import Change

__all__ = ["AGENT_INFO", "HealthChecker"]

log = logging.getLogger("vaccelray.scheduler")

#: What a plain vAccel agent (no Info method) is taken to be.
AGENT_INFO = WorkerInfo(
    version="",
    instance="vaccel-agent",
    backend="vaccel-agent",
    ops=("classify", "genop"),
    capacity=1,
)


class HealthChecker:
    """Checks every worker of a pool; run :meth:`run` in a task group."""

    def __init__(self, pool: WorkerPool, *, interval: float = 0.5, timeout: float = 1.0) -> None:
        self.pool = pool
        self.interval = interval
        self.timeout = timeout
        self._watched: set[str] = set()
        self._wake = anyio.Event()

    def poke(self) -> None:
        """Look for new workers now (zeroconf found one, say) instead of at the next tick."""
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                for record in self.pool.registry:
                    if record.address not in self._watched:
                        self._watched.add(record.address)
                        tg.start_soon(self._watch, record.address)
                with anyio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _watch(self, address: str) -> None:
        try:
            while address in self.pool.registry:
                await self.check(address)
                await anyio.sleep(self.interval)
        finally:
            self._watched.discard(address)

    async def check(self, address: str) -> Change:
        """Check one worker now; returns what changed (already applied to the pool)."""
        pool = self.pool
        registry = pool.registry
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
                    info = INFO.reply.decode(payload)  # a garbled answer fails the check
        except (TimeoutError, RPCError, TransportError, OSError) as exc:
            reason = (
                f"no answer to the health check within {self.timeout:g} s"
                if isinstance(exc, TimeoutError)
                else f"health check failed: {exc}"
            )
            change = registry.check_failed(address, reason, anyio.current_time())
            if change is Change.DOWN:
                log.warning("Worker %s is down: %s", address, reason)
            pool.drop_client(address)
        else:
            change = registry.check_ok(address, info, anyio.current_time())
            if change is Change.UP:
                log.info("Worker %s is up (%s, capacity %d)", address, info.backend, info.capacity)
            elif change is Change.RESTARTED:
                log.warning(
                    "Worker %s restarted (instance %s): its sessions are gone",
                    address,
                    info.instance,
                )
        pool.changed(address, change)
        return change
