"""What a worker and a scheduler show: workers' rows for the dashboard, metric families.

A view reads the daemon's state when asked (a scrape, a page refresh); it
keeps nothing and counts nothing itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from vaccelray.metrics import Family

if TYPE_CHECKING:
    from vaccelray.scheduler.daemon import Scheduler
    from vaccelray.worker.daemon import Worker

__all__ = ["SchedulerView", "View", "WorkerView"]

Row = dict[str, Any]


class View(Protocol):
    #: ``worker`` or ``scheduler``: names the metrics (``vaccelray_worker_…``).
    kind: str

    def rows(self) -> list[Row]:
        """One row per worker: address, health, backend, inflight, sessions, capacity, error."""

    def families(self) -> Iterable[Family]:
        """The daemon's gauges and counters besides its call counts."""

    def listening(self) -> list[str]:
        """The daemon's ttrpc addresses."""


def _gauge(name: str, text: str, value: float) -> Family:
    return Family(name, text, "gauge", (), [((), value)])


class WorkerView:
    """One worker: its own row, and its agent's, pool's and server's state."""

    kind = "worker"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def listening(self) -> list[str]:
        return list(self.worker.addresses)

    def rows(self) -> list[Row]:
        assert self.worker.info is not None
        info = self.worker.info.info()
        return [
            {
                "address": ", ".join(info.addresses),
                "health": "up",
                "backend": info.backend,
                "inflight": info.inflight,
                "sessions": info.sessions,
                "capacity": info.capacity,
                "error": "",
            }
        ]

    def families(self) -> Iterable[Family]:
        worker = self.worker
        server, agent = worker.server, worker.agent
        yield _gauge("inflight_calls", "Calls being handled off the event loop.", server.inflight)
        yield _gauge("connections", "Client connections open.", server.connections)
        yield _gauge("sessions", "vAccel sessions open.", len(agent.sessions))
        yield _gauge("resources", "vAccel resources registered.", len(agent.resources))
        tasks = worker.tasks
        if tasks is None:
            return
        pool = tasks.pool
        yield _gauge("pool_processes", "Processes of the task pool.", len(pool.pids))
        yield _gauge("pool_busy_processes", "Pool processes running a task.", pool.busy)
        yield _gauge("tasks_queued", "Tasks waiting for a pool process.", pool.queued)
        yield Family(
            "tasks",
            "Tasks ended, by outcome.",
            "counter",
            ("outcome",),
            [((outcome,), count) for outcome, count in sorted(tasks.outcomes.items())],
        )
        store = tasks.objects
        if store is None:
            return
        yield _gauge("objects", "Objects in the store (being sent or sealed).", len(store))
        yield Family(
            "object_bytes",
            "Bytes of the store's objects, in memory or spilled to disk.",
            "gauge",
            ("place",),
            [(("memory",), store.memory_used), (("disk",), store.disk_used)],
        )


class SchedulerView:
    """A scheduler: a row per worker it knows, its placements, failovers, moved sessions."""

    kind = "scheduler"

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def listening(self) -> list[str]:
        return list(self.scheduler.addresses)

    def rows(self) -> list[Row]:
        status = self.scheduler.view.status()
        return [
            {
                "address": w.address,
                "health": w.health,
                "backend": w.backend,
                "inflight": w.inflight,
                "sessions": w.sessions,
                "capacity": w.capacity,
                "error": w.last_error,
            }
            for w in status.workers
        ]

    def families(self) -> Iterable[Family]:
        scheduler = self.scheduler
        server, pool = scheduler.server, scheduler.pool
        yield _gauge("inflight_calls", "Calls being handled off the event loop.", server.inflight)
        yield _gauge("connections", "Client connections open.", server.connections)
        yield _gauge("sessions", "vAccel sessions of the clients.", len(scheduler.table.sessions))
        records = list(pool.registry)
        label = ("worker",)

        def per_worker(name: str, text: str, kind: str, values: Iterable[float]) -> Family:
            samples = [((r.address,), v) for r, v in zip(records, values, strict=True)]
            return Family(name, text, kind, label, samples)

        yield per_worker(
            "worker_up",
            "1 when the worker passes its health checks.",
            "gauge",
            (1.0 if r.routable else 0.0 for r in records),
        )
        yield per_worker(
            "worker_inflight",
            "Calls the scheduler has in flight on the worker.",
            "gauge",
            (r.inflight for r in records),
        )
        yield per_worker(
            "worker_sessions",
            "Sessions bound to the worker.",
            "gauge",
            (r.sessions for r in records),
        )
        yield per_worker(
            "worker_capacity",
            "Calls the worker runs at once (its report).",
            "gauge",
            (r.capacity for r in records),
        )
        yield per_worker(
            "placements",
            "Sessions and tasks placed on the worker.",
            "counter",
            (r.placements for r in records),
        )
        yield Family(
            "failovers",
            "Tasks sent to another worker after one failed them.",
            "counter",
            (),
            [((), pool.failovers)],
        )
        yield Family(
            "moved_sessions",
            "Sessions re-created on another worker after theirs was lost.",
            "counter",
            (),
            [((), pool.moved_sessions)],
        )
