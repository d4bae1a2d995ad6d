"""The dashboard and metrics pages of a daemon: routes, credentials, the history of its calls.

Credentials (see SECURITY.md): ``/metrics`` asks ``Authorization: Bearer
<cluster token>``, as Prometheus scrapers send it. The dashboard is for a
browser: the daemon prints a one-time link (``/login?once=CODE``) at start;
the first visit of it sets an HttpOnly, SameSite=Strict cookie holding a
random session secret (not the cluster token) and redirects to ``/``; the
code is spent then. Every other page asks for that cookie (else 401).
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Final

from vaccelray.dashboard.charts import line_chart
from vaccelray.dashboard.http import Request, Response
from vaccelray.dashboard.views import View
from vaccelray.metrics import LATENCY_BOUNDS, CallMetrics, Failure, collector, status_name

__all__ = ["COOKIE", "Dashboard", "History", "MetricsPage", "Sample"]

COOKIE: Final = "vaccelray_dashboard"
#: Samples kept for the charts, one per :data:`SAMPLE_INTERVAL`.
SAMPLES_KEPT: Final = 300
SAMPLE_INTERVAL: Final = 1.0
#: Failed calls the page lists (the newest first).
FAILURES_SHOWN: Final = 20
_STATIC: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
_PAGE_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
)


def _unauthorized(text: str) -> Response:
    return Response(401, (text + "\n").encode(), headers=_PAGE_HEADERS)


@dataclass(frozen=True)
class Sample:
    """The calls of one interval: per second answered and failed, latency (ms) mean and p95."""

    time: float
    calls: float
    failed: float
    mean_ms: float
    p95_ms: float


class History:
    """The last :data:`SAMPLES_KEPT` samples of a server's calls, taken by :meth:`sample`."""

    def __init__(self, calls: CallMetrics) -> None:
        self.calls = calls
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        self._last = (time.monotonic(), *calls.totals(), calls.latency_buckets())

    def sample(self) -> Sample:
        """Take a sample of the calls answered since the last one."""
        now = time.monotonic()
        calls, failed, seconds = self.calls.totals()
        buckets = self.calls.latency_buckets()
        then, calls0, failed0, seconds0, buckets0 = self._last
        self._last = (now, calls, failed, seconds, buckets)
        span = max(now - then, 1e-9)
        answered = calls - calls0
        mean = (seconds - seconds0) / answered * 1e3 if answered else 0.0
        sample = Sample(
            time.time(),
            answered / span,
            (failed - failed0) / span,
            mean,
            _quantile([b - b0 for b, b0 in zip(buckets, buckets0, strict=True)], 0.95) * 1e3,
        )
        self.samples.append(sample)
        return sample


def _quantile(counts: list[int], q: float) -> float:
    """The upper bound (seconds) of the latency bucket holding quantile *q* (0 for no calls)."""
    total = sum(counts)
    if not total:
        return 0.0
    running = 0
    for bound, count in zip((*LATENCY_BOUNDS, LATENCY_BOUNDS[-1] * 2), counts, strict=True):
        running += count
        if running >= q * total:
            return bound
    raise AssertionError("unreachable: the counts add up to their total")


class Dashboard:
    """The dashboard's pages for one daemon (a :class:`View` of it, its call metrics)."""

    def __init__(self, view: View, calls: CallMetrics) -> None:
        self.view = view
        self.calls = calls
        self.history = History(calls)
        #: The one-time code of the login link; None once it was used.
        self.once: str | None = secrets.token_urlsafe(24)
        #: The secret of the browser session the login made (its cookie), if any.
        self.session: str | None = None

    def login_path(self) -> str:
        """The one-time link's path (and query), until it is used."""
        assert self.once is not None
        return f"/login?once={self.once}"

    def handle(self, request: Request) -> Response:
        if request.path == "/login":
            return self._login(request)
        if not self._signed_in(request):
            return _unauthorized(
                "not signed in: open the one-time link the daemon printed at start "
                "(dashboard: http://.../login?once=...)"
            )
        if request.path == "/state.json":
            return Response(
                200, json.dumps(self.state()).encode(), "application/json", _PAGE_HEADERS
            )
        static = _STATIC.get(request.path)
        if static is None:
            return Response(404, b"not found\n", headers=_PAGE_HEADERS)
        name, content_type = static
        body = resources.files("vaccelray.dashboard").joinpath("static").joinpath(name).read_bytes()
        return Response(200, body, content_type, _PAGE_HEADERS)

    def _login(self, request: Request) -> Response:
        code = request.param("once") or ""
        if self.once is None or not hmac.compare_digest(code.encode(), self.once.encode()):
            return Response(
                403,
                b"this login link is wrong or was used already: restart the daemon for a new one\n",
                headers=_PAGE_HEADERS,
            )
        self.once = None
        self.session = secrets.token_urlsafe(32)
        cookie = f"{COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"
        return Response(303, b"", headers=(("Location", "/"), ("Set-Cookie", cookie)))

    def _signed_in(self, request: Request) -> bool:
        if self.session is None:
            return False
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.session.encode()):
                return True
        return False

    def state(self) -> dict[str, object]:
        """What the page shows, as JSON: workers, charts (SVG), recent failures."""
        samples = list(self.history.samples)
        span = len(samples) * SAMPLE_INTERVAL
        return {
            "kind": self.view.kind,
            "listening": self.view.listening(),
            "time": time.time(),
            "workers": self.view.rows(),
            "throughput": line_chart(
                "Throughput",
                "calls/s",
                [("answered", [s.calls for s in samples]), ("failed", [s.failed for s in samples])],
                span,
            ),
            "latency": line_chart(
                "Latency",
                "ms",
                [("mean", [s.mean_ms for s in samples]), ("p95", [s.p95_ms for s in samples])],
                span,
            ),
            "failures": [
                {
                    "time": f.time,
                    "call": f"{f.service}/{f.method}" if f.service else "(unknown method)",
                    "status": status_name(f.code),
                    "message": f.message,
                }
                for f in _newest(self.calls, FAILURES_SHOWN)
            ],
        }


def _newest(calls: CallMetrics, count: int) -> Iterator[Failure]:
    failures = list(calls.failures)
    return reversed(failures[-count:])


class MetricsPage:
    """``/metrics`` in the Prometheus text format, for a bearer of the cluster token."""

    def __init__(self, view: View, calls: CallMetrics, token: str) -> None:
        from prometheus_client import CollectorRegistry

        self.token = token
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector(f"vaccelray_{view.kind}", calls, view.families))

    def handle(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            return Response(
                401,
                b"send the cluster token: Authorization: Bearer <token>\n",
                headers=(("WWW-Authenticate", 'Bearer realm="vaccelray"'),),
            )
        if request.path != "/metrics":
            return Response(404, b"not found: the metrics are at /metrics\n")
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
