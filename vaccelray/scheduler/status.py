"""``vaccelray.v1.Scheduler/Workers``: what the scheduler sees of its cluster."""

from __future__ import annotations

import anyio

from vaccelray._version import __version__
from vaccelray.protocol.info import ClusterStatus
from vaccelray.protocol.services import SCHEDULER, WORKERS
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.scheduler.sessions import SessionTable
from vaccelray.transport.server import CallContext, Method, Service

__all__ = ["ClusterView"]


class ClusterView:
    """The scheduler's sessions and each worker's health and load, as one status."""

    def __init__(self, pool: WorkerPool, table: SessionTable) -> None:
        self.pool = pool
        self.table = table

    def status(self) -> ClusterStatus:
        return ClusterStatus(
            version=__version__,
            sessions=len(self.table.sessions),
            workers=tuple(self.pool.registry.statuses(anyio.current_time())),
        )

    def services(self) -> list[Service]:
        def workers(payload: bytes, ctx: CallContext) -> bytes:
            WORKERS.request.decode(payload)
            return WORKERS.reply.encode(self.status())

        return [Service(SCHEDULER.name, {WORKERS.method: Method(workers, inline=True)})]
