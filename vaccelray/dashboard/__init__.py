"""Seeing a daemon: Prometheus metrics (``--metrics``) and a live dashboard (``--dashboard``).

:func:`observed` runs a worker or a scheduler with its calls counted
(:mod:`vaccelray.metrics`) and serves, on their own small HTTP listeners,
``/metrics`` (for a bearer of the cluster token) and the dashboard (signed
in with the one-time link it logs at start). See :mod:`.app` for the pages.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio

from vaccelray.auth import daemon_token
from vaccelray.dashboard.app import SAMPLE_INTERVAL, Dashboard, MetricsPage
from vaccelray.dashboard.http import serve_http
from vaccelray.dashboard.views import SchedulerView, View, WorkerView
from vaccelray.metrics import CallMetrics

__all__ = ["ObserveConfig", "Observed", "observed"]

log = logging.getLogger("vaccelray.dashboard")

_D = TypeVar("_D")


@dataclass(frozen=True)
class ObserveConfig:
    """Where to serve the metrics and the dashboard (``HOST:PORT``; None: not served)."""

    metrics: str | None = None
    dashboard: str | None = None
    #: The token ``/metrics`` asks; None: the daemon's (given, else the user's default).
    token: str | None = None


@dataclass
class Observed:
    """A daemon served with its metrics and dashboard, and where they are."""

    daemon: object
    calls: CallMetrics | None = None
    metrics_url: str | None = None
    dashboard_url: str | None = None
    #: The one-time link that signs a browser in to the dashboard.
    login_url: str | None = None
    dashboard: Dashboard | None = None


def _view(daemon: object) -> View:
    from vaccelray.scheduler.daemon import Scheduler

    if isinstance(daemon, Scheduler):
        return SchedulerView(daemon)
    from vaccelray.worker.daemon import Worker

    assert isinstance(daemon, Worker)
    return WorkerView(daemon)


async def _sample(dashboard: Dashboard) -> None:
    while True:
        await anyio.sleep(SAMPLE_INTERVAL)
        dashboard.history.sample()


@asynccontextmanager
async def observed(
    start: Callable[[CallMetrics | None], AbstractAsyncContextManager[_D]], config: ObserveConfig
) -> AsyncIterator[Observed]:
    """Run the daemon ``start(metrics)`` makes, serving its metrics and dashboard as *config* says.

    *start* gets the :class:`CallMetrics` to hand its server (None when
    neither is asked: then nothing is counted).
    """
    wanted = config.metrics is not None or config.dashboard is not None
    calls = CallMetrics() if wanted else None
    async with start(calls) as daemon, AsyncExitStack() as stack:
        seen = Observed(daemon, calls)
        if calls is not None:
            view = _view(daemon)
            if config.metrics is not None:
                token = config.token or daemon_token(None)[0]
                page = MetricsPage(view, calls, token)
                seen.metrics_url = await stack.enter_async_context(
                    serve_http(config.metrics, page.handle)
                )
                log.info("Metrics on %s/metrics", seen.metrics_url)
            if config.dashboard is not None:
                board = Dashboard(view, calls)
                url = await stack.enter_async_context(serve_http(config.dashboard, board.handle))
                tg = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(tg.cancel_scope.cancel)
                tg.start_soon(_sample, board)
                seen.dashboard, seen.dashboard_url = board, url
                seen.login_url = url + board.login_path()
                # Shown at any log level: it is the only way in.
                level = max(logging.INFO, log.getEffectiveLevel())
                log.log(level, "dashboard: %s", seen.login_url)
        yield seen
