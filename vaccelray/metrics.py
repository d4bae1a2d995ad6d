"""Call metrics of a ttrpc server: plain integers on the hot path, Prometheus families at scrape.

A :class:`CallMetrics` handed to ``serve(metrics=...)`` is given to every
connection's sans-IO :class:`~vaccelray.protocol.ServerConnection`, which on
each request notes the method and the clock, and on each answer appends its
latency to that method's (bucketed by the batch, see :class:`MethodStats`;
an error is counted apart, by status). Nothing else runs per call: reads and
the bytes read are counted per read, and the bytes of answers per write (by
the transport). The library's per-call metric objects cost several
microseconds a call, so :func:`collector` turns these integers into metric
families only when Prometheus scrapes (and the dashboard reads them).

Only the methods the server declares get their own counters; calls of any
other name count under ``service=""``, ``method=""`` (a peer cannot grow the
table). The last :data:`FAILURES_KEPT` failed calls are kept for the dashboard.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from vaccelray.errors import StatusCode
from vaccelray.protocol.connection import LATENCY_BOUNDS, ServerConnection

if TYPE_CHECKING:
    from prometheus_client.registry import Collector


__all__ = [
    "FAILURES_KEPT",
    "LATENCY_BOUNDS",
    "CallMetrics",
    "Failure",
    "Family",
    "MethodStats",
    "collector",
    "status_name",
]

#: Failed calls kept for the dashboard (the oldest leave first).
FAILURES_KEPT: Final = 50
#: Characters of a failure's message kept.
_MESSAGE_KEPT: Final = 200

_bisect_right = bisect.bisect_right


def status_name(code: int) -> str:
    """The gRPC name of a status code (``OK``, ``NOT_FOUND``), or its number for an unknown one."""
    try:
        return StatusCode(code).name
    except ValueError:
        return str(code)


class MethodStats:
    """The counters of one method: calls by status, latency buckets.

    An answered call only appends its latency to :attr:`latencies` (an error
    is also counted in :attr:`errors`: the calls answered OK are the others).
    The latencies are sorted into buckets (:meth:`fold`) by the batch, when
    ``FOLD_AT`` (256) are waiting or the buckets are read: per call, that
    costs about half of finding its bucket (``bench/bench_metrics.py --micro``,
    callgrind).
    """

    __slots__ = ("_answered", "_buckets", "_seconds", "errors", "latencies", "method", "service")

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
        #: Calls answered with an error, by status code.
        self.errors: dict[int, int] = {}
        #: Seconds each call answered since the last fold took.
        self.latencies: list[float] = []
        #: Calls answered up to the last fold.
        self._answered = 0
        self._buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self._seconds = 0.0

    @property
    def ok(self) -> int:
        """Calls answered OK."""
        return self._answered + len(self.latencies) - sum(self.errors.values())

    @property
    def buckets(self) -> list[int]:
        """Calls by latency bucket (not cumulative; the last holds those past every bound)."""
        self.fold()
        return self._buckets

    @property
    def seconds(self) -> float:
        """Seconds all answered calls took, together."""
        self.fold()
        return self._seconds

    def fold(self) -> None:
        """Count the latencies waiting in their buckets."""
        waiting = self.latencies
        if not waiting:
            return
        self.latencies = []
        self._answered += len(waiting)
        waiting.sort()
        self._seconds += sum(waiting)
        buckets = self._buckets
        below = 0
        for i, bound in enumerate(LATENCY_BOUNDS):
            upto = _bisect_right(waiting, bound, below)
            buckets[i] += upto - below
            below = upto
        buckets[-1] += len(waiting) - below

    @property
    def codes(self) -> dict[int, int]:
        """Calls answered, by status code (those never answered have none)."""
        ok = self.ok
        return {0: ok, **self.errors} if ok else dict(self.errors)


class Failure(NamedTuple):
    """A call answered with an error status."""

    #: Wall clock seconds (``time.time()``) when it was answered.
    time: float
    service: str
    method: str
    code: int
    message: str


class CallMetrics:
    """The counters of one server's calls (see the module's doc)."""

    __slots__ = ("bytes_in", "bytes_out", "failures", "methods", "other", "reads")

    def __init__(self) -> None:
        self.methods: dict[tuple[str, str], MethodStats] = {}
        #: Calls of methods the server does not declare, and requests it could not decode.
        self.other = MethodStats("", "")
        #: Reads of client connections (calls / reads: the requests a read held on
        #: average), the bytes they brought, and the bytes of the answers written.
        self.reads = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.failures: collections.deque[Failure] = collections.deque(maxlen=FAILURES_KEPT)

    def declare(self, service: str, method: str) -> None:
        """Give *service*/*method* counters of its own."""
        self.methods.setdefault((service, method), MethodStats(service, method))

    def connection(self, max_message_size: int) -> ServerConnection:
        """A server connection whose calls count here."""
        return ServerConnection(max_message_size, self)

    def failed(self, stats: MethodStats, code: int, message: str) -> None:
        """A call of *stats*' method was answered with the error *code*."""
        errors = stats.errors
        errors[code] = errors.get(code, 0) + 1
        self.failures.append(
            Failure(time.time(), stats.service, stats.method, code, message[:_MESSAGE_KEPT])
        )

    def all_methods(self) -> Iterator[MethodStats]:
        yield from self.methods.values()
        yield self.other

    def totals(self) -> tuple[int, int, float]:
        """Calls answered, of them failed, and the seconds they took, over every method."""
        calls = failed = 0
        seconds = 0.0
        for stats in self.all_methods():
            for code, count in stats.codes.items():
                calls += count
                if code:
                    failed += count
            seconds += stats.seconds
        return calls, failed, seconds

    def latency_buckets(self) -> list[int]:
        """Calls by latency bucket over every method (not cumulative)."""
        total = [0] * (len(LATENCY_BOUNDS) + 1)
        for stats in self.all_methods():
            for i, count in enumerate(stats.buckets):
                total[i] += count
        return total


# -- exposition ------------------------------------------------------------------------


class Family(NamedTuple):
    """A gauge or counter family a daemon adds to its call metrics at scrape time.

    *kind*: ``gauge`` or ``counter``; *samples*: (label values, value) pairs.
    """

    name: str
    help: str
    kind: str
    labels: tuple[str, ...]
    samples: Sequence[tuple[tuple[str, ...], float]]


#: The help text of each call family, by its name after the prefix.
_HELP: Final = {
    "calls": "Calls answered, by method and status.",
    "call_seconds": "Time from request to answer, by method.",
    "reads": "Reads of client connections (calls / reads: requests a read held, on average).",
    "received_bytes": "Bytes read from client connections.",
    "sent_bytes": "Bytes of answers written to client connections.",
}
_METHOD_LABELS: Final = ("service", "method")


def collector(
    prefix: str, calls: CallMetrics, extra: Callable[[], Iterable[Family]] = tuple
) -> Collector:
    """A Prometheus collector of *calls* and of the families *extra* gives, named *prefix*_…."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

    def family(kind: Callable[..., Any], name: str, labels: Sequence[str]) -> Any:
        return kind(f"{prefix}_{name}", _HELP[name], labels=list(labels))

    class _Collector:
        def collect(self) -> Iterator[Metric]:
            total = family(CounterMetricFamily, "calls", (*_METHOD_LABELS, "status"))
            latency = family(HistogramMetricFamily, "call_seconds", _METHOD_LABELS)
            for stats in calls.all_methods():
                names = [stats.service, stats.method]
                if not stats.codes and stats.service:
                    continue  # a declared method never called: no series
                for code, count in sorted(stats.codes.items()):
                    total.add_metric([*names, status_name(code)], count)
                latency.add_metric(names, _cumulative(LATENCY_BOUNDS, stats.buckets), stats.seconds)
            yield from (total, latency)
            for name, count in (
                ("reads", calls.reads),
                ("received_bytes", calls.bytes_in),
                ("sent_bytes", calls.bytes_out),
            ):
                counter = family(CounterMetricFamily, name, ())
                counter.add_metric([], count)
                yield counter
            for extra_family in extra():
                kind = GaugeMetricFamily if extra_family.kind == "gauge" else CounterMetricFamily
                metric = kind(
                    f"{prefix}_{extra_family.name}",
                    extra_family.help,
                    labels=list(extra_family.labels),
                )
                for values, value in extra_family.samples:
                    metric.add_metric(list(values), value)
                yield metric

    return _Collector()


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus histogram buckets (cumulative, ending with ``+Inf``) from per-bucket counts."""
    running = list(itertools.accumulate(counts))
    buckets = [(repr(float(bound)), float(running[i])) for i, bound in enumerate(bounds)]
    return [*buckets, ("+Inf", float(running[-1]))]
