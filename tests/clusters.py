"""A scheduler for tests, yielded once its static workers have passed a health check.

The scheduler serves after its first health checks or ``health_timeout``,
whichever comes first: on a loaded machine a live worker may not have
answered yet, and a call made at once would find no healthy worker. Tests
wait for what they need instead (the checks go on every ``health_interval``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.waiting import eventually
from vaccelray.metrics import CallMetrics
from vaccelray.scheduler import Scheduler, SchedulerConfig, run_scheduler

__all__ = ["serving_scheduler"]


@asynccontextmanager
async def serving_scheduler(
    config: SchedulerConfig, *, metrics: CallMetrics | None = None
) -> AsyncIterator[Scheduler]:
    async with run_scheduler(config, metrics=metrics) as sched:
        registry = sched.pool.registry

        def all_up() -> bool:
            records = [registry.get(address) for address in config.workers]
            return all(record is not None and record.routable for record in records)

        await eventually(all_up, f"the workers {', '.join(config.workers)} healthy")
        yield sched
