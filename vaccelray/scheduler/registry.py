"""The worker registry: every worker the scheduler knows and its state (pure).

No I/O and no clock: callers pass ``now`` and report what they observed
(a health check answered or failed, zeroconf saw or lost a name, a call
started or ended). The registry answers which workers are routable and
picks one through :mod:`vaccelray.scheduler.policy`. Methods that change a
worker's health return a :class:`Change` so the caller can react (drop
connections, re-bind sessions).

Workers are keyed by their canonical endpoint (``tcp://10.0.0.2:8194``):
a static ``--worker`` and a zeroconf name that resolve to the same endpoint
are one worker.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from vaccelray.protocol.info import WorkerInfo, WorkerStatus
from vaccelray.scheduler.policy import pick_least_loaded
from vaccelray.transport.endpoints import parse_endpoint

__all__ = ["Change", "Health", "Registry", "WorkerRecord"]


class Health(str, enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Change(enum.Enum):
    """What a report did to a worker's routability."""

    NONE = "none"
    #: Became routable (first check, or back after being down, same instance).
    UP = "up"
    #: Answered with a new instance id: it restarted and lost every session.
    RESTARTED = "restarted"
    #: Stopped being routable.
    DOWN = "down"


@dataclass
class WorkerRecord:
    address: str
    name: str = ""
    static: bool = False
    discovered: bool = False
    health: Health = Health.UNKNOWN
    backend: str = ""
    ops: frozenset[str] = frozenset()
    capacity: int = 1
    version: str = ""
    instance: str = ""
    reported_inflight: int = 0
    reported_sessions: int = 0
    #: This scheduler's calls in flight on the worker and sessions bound to it.
    inflight: int = 0
    sessions: int = 0
    #: Sessions this scheduler left on the worker and is destroying now, and those
    #: destroyed since its last report: the report still counts them, placement must not.
    releasing: int = 0
    released: int = 0
    last_error: str = ""
    last_seen: float | None = None
    #: Sessions this scheduler bound to the worker and tasks it sent there, ever.
    placements: int = 0
    #: From the zeroconf TXT record, until the first health check says better.
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def routable(self) -> bool:
        return self.health is Health.UP

    @property
    def leaving(self) -> int:
        """Sessions in the worker's last report that this scheduler is destroying (or did)."""
        return self.releasing + self.released

    def status(self, now: float) -> WorkerStatus:
        return WorkerStatus(
            address=self.address,
            name=self.name,
            static=self.static,
            health=self.health.value,
            backend=self.backend or self.txt.get("backend", ""),
            ops=tuple(sorted(self.ops)),
            capacity=self.capacity,
            inflight=self.inflight,
            sessions=self.sessions,
            reported_inflight=self.reported_inflight,
            reported_sessions=self.reported_sessions,
            version=self.version or self.txt.get("version", ""),
            instance=self.instance,
            last_error=self.last_error,
            last_seen=-1.0 if self.last_seen is None else max(0.0, now - self.last_seen),
        )


def canonical(address: str) -> str:
    return str(parse_endpoint(address))


class Registry:
    """Workers by address; see the module docstring."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        #: zeroconf instance name -> address
        self._names: dict[str, str] = {}
        self._turn = 0

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, address: object) -> bool:
        return address in self._workers

    def get(self, address: str) -> WorkerRecord | None:
        return self._workers.get(address)

    # -- membership --------------------------------------------------------------

    def add_static(self, address: str) -> WorkerRecord:
        """A worker given on the command line; it stays however it fares."""
        record = self._workers.setdefault(canonical(address), WorkerRecord(canonical(address)))
        record.static = True
        return record

    def discovered(
        self, name: str, address: str, txt: Mapping[str, str] | None = None
    ) -> tuple[WorkerRecord, str | None]:
        """zeroconf resolved *name* to *address*: its record, and the address it moved
        from if that worker left with it (not static, and no other name there)."""
        address = canonical(address)
        moved_from = None
        old = self._names.get(name)
        if old is not None and old != address and self._forget_name(name) is not None:
            moved_from = old
        record = self._workers.setdefault(address, WorkerRecord(address))
        record.discovered = True
        record.name = name
        if txt is not None:
            record.txt = dict(txt)
        self._names[name] = address
        return record, moved_from

    def vanished(self, name: str) -> WorkerRecord | None:
        """zeroconf saw *name* leave; returns the record if it was removed.

        A static worker is kept (it came from the command line), and so is one
        still announced under another name (a restarted worker that took a new
        name while its old one lingered in the caches).
        """
        if name not in self._names:
            return None
        return self._forget_name(name)

    def _forget_name(self, name: str) -> WorkerRecord | None:
        # Every name maps to a worker: a worker is removed only with its last name.
        address = self._names.pop(name)
        record = self._workers[address]
        others = [n for n, a in self._names.items() if a == address]
        if others:
            record.name = others[0]
            return None
        record.discovered = False
        if record.static:
            return None
        del self._workers[address]
        record.health = Health.DOWN
        return record

    # -- health --------------------------------------------------------------

    def check_ok(self, address: str, info: WorkerInfo, now: float) -> Change:
        record = self._workers.get(address)
        if record is None:
            return Change.NONE
        restarted = bool(record.instance) and record.instance != info.instance
        was_up = record.health is Health.UP
        record.health = Health.UP
        record.backend = info.backend
        record.ops = frozenset(info.ops)
        record.capacity = max(1, info.capacity)
        record.version = info.version
        record.instance = info.instance
        record.reported_inflight = info.inflight
        record.reported_sessions = info.sessions
        # This report no longer counts the sessions destroyed before it; a new process
        # never had the sessions the scheduler is still destroying on the old one.
        record.released = 0
        if restarted:
            record.releasing = 0
        record.last_error = ""
        record.last_seen = now
        if restarted:
            return Change.RESTARTED
        return Change.NONE if was_up else Change.UP

    def check_failed(self, address: str, error: str, now: float) -> Change:
        """A health check or a call failed in a way that means the worker is unusable."""
        record = self._workers.get(address)
        if record is None:
            return Change.NONE
        record.last_error = error
        if record.health is Health.DOWN:
            return Change.NONE
        was_up = record.health is Health.UP
        record.health = Health.DOWN
        return Change.DOWN if was_up else Change.NONE

    # -- load --------------------------------------------------------------

    def call_started(self, address: str) -> None:
        record = self._workers.get(address)
        if record is not None:
            record.inflight += 1

    def call_ended(self, address: str) -> None:
        record = self._workers.get(address)
        if record is not None and record.inflight > 0:
            record.inflight -= 1

    def session_bound(self, address: str) -> None:
        record = self._workers.get(address)
        if record is not None:
            record.sessions += 1
            record.placements += 1

    def session_unbound(self, address: str) -> None:
        record = self._workers.get(address)
        if record is not None and record.sessions > 0:
            record.sessions -= 1

    def releasing_sessions(self, address: str, count: int) -> None:
        """The scheduler is destroying *count* sessions it left on the worker.

        The worker's last report counts them, but they are going: placement
        discounts them at once (not only after the next health check), until
        a report made after they are gone arrives. Call
        :meth:`session_released` when each destroy ends, however it ends.
        """
        record = self._workers.get(address)
        if record is not None:
            record.releasing += count

    def session_released(self, address: str) -> None:
        record = self._workers.get(address)
        if record is not None and record.releasing > 0:
            record.releasing -= 1
            record.released += 1

    # -- routing -------------------------------------------------------------

    def routable(self, op: str | None = None) -> list[WorkerRecord]:
        return [w for w in self._workers.values() if w.routable and (op is None or op in w.ops)]

    def pick(
        self, op: str | None = None, *, exclude: frozenset[str] = frozenset()
    ) -> WorkerRecord | None:
        """The least-loaded routable worker supporting *op*; ties take turns."""
        candidates = [w for w in self.routable() if w.address not in exclude]
        chosen = pick_least_loaded(candidates, op=op, turn=self._turn)
        if chosen is None:
            return None
        self._turn += 1
        assert isinstance(chosen, WorkerRecord)
        return chosen

    def statuses(self, now: float) -> list[WorkerStatus]:
        return [w.status(now) for w in sorted(self._workers.values(), key=lambda w: w.address)]
