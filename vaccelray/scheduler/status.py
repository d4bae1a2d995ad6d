"""``vaccelray.v1.Scheduler/Workers``: what the scheduler sees of its cluster.

The scheduler answers ``vaccelray.v1.Worker/Info`` too, as backend
``scheduler`` with its own instance id: a scheduler that finds it (through a
forged announcement, say) knows it is no worker, and this one knows itself.
Worker errors it shows are the scheduler's own words (see
:mod:`vaccelray.scheduler.health`), never bytes a peer sent, and only to
callers holding the cluster credential.
"""

from __future__ import annotations

import anyio

from vaccelray._version import __version__
from vaccelray.protocol.info import SCHEDULER_BACKEND, ClusterStatus, WorkerInfo
from vaccelray.protocol.services import INFO, SCHEDULER, WORKERS
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.scheduler.sessions import SessionTable
from vaccelray.transport.server import CallContext, Method, Service

__all__ = ["ClusterView"]


class ClusterView:
    """The scheduler's sessions and each worker's health and load, as one status."""

    def __init__(self, pool: WorkerPool, table: SessionTable, instance: str = "") -> None:
        self.pool = pool
        self.table = table
        #: The scheduler's own instance id (random per start).
        self.instance = instance

    def status(self) -> ClusterStatus:
        return ClusterStatus(
            version=__version__,
            sessions=len(self.table.sessions),
            workers=tuple(self.pool.registry.statuses(anyio.current_time())),
        )

    def service(self) -> Service:
        """``Scheduler/Workers``: the daemon serves it behind the task service's credential
        (what it tells of workers' health says which ports of other hosts answer)."""

        def workers(payload: bytes, ctx: CallContext) -> bytes:
            WORKERS.request.decode(payload)
            return WORKERS.reply.encode(self.status())

        return Service(SCHEDULER.name, {WORKERS.method: Method(workers, inline=True)})

    def info_service(self) -> Service:
        """``Worker/Info``, answered as a scheduler (open, as a worker's is)."""

        def info(payload: bytes, ctx: CallContext) -> bytes:
            INFO.request.decode(payload)
            return INFO.reply.encode(
                WorkerInfo(version=__version__, instance=self.instance, backend=SCHEDULER_BACKEND)
            )

        return Service(INFO.service, {INFO.method: Method(info, inline=True)})
