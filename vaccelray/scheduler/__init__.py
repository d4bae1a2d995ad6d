"""The scheduler: discovers workers, checks their health, routes vAccel sessions and tasks.

``vaccelray scheduler`` runs :func:`run_scheduler`. The pure parts
(:mod:`.registry`, :mod:`.policy`) hold no sockets; :class:`WorkerPool` is
the API for routing other work to the least-loaded capable worker.
"""

from vaccelray.scheduler.daemon import (
    DEFAULT_SCHEDULER_ADDRESS,
    Scheduler,
    SchedulerConfig,
    run_scheduler,
)
from vaccelray.scheduler.pool import WorkerPool, WorkerUnavailable
from vaccelray.scheduler.registry import Change, Health, Registry, WorkerRecord
from vaccelray.scheduler.sessions import SessionLimits

__all__ = [
    "DEFAULT_SCHEDULER_ADDRESS",
    "Change",
    "Health",
    "Registry",
    "Scheduler",
    "SchedulerConfig",
    "SessionLimits",
    "WorkerPool",
    "WorkerRecord",
    "WorkerUnavailable",
    "run_scheduler",
]
