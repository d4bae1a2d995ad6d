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

zeroconf records are hints anyone can send, so no record takes a healthy
worker away: a record moving a name whose worker is up is only kept as a
claim (the name moves when that worker stops answering), and a goodbye
only asks for a re-check (the worker stays while it answers, and leaves at
the first check that fails, unless a record announced it again since).
Discovered workers are capped (:attr:`Registry.max_discovered`); past the
cap a new one takes the place of one that never answered, or is refused.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from vaccelray.protocol.info import WorkerInfo, WorkerStatus
from vaccelray.scheduler.policy import pick_least_loaded
from vaccelray.transport.endpoints import parse_endpoint

__all__ = ["DEFAULT_MAX_DISCOVERED", "Admission", "Change", "Health", "Registry", "WorkerRecord"]

#: Workers found by zeroconf kept at most (static ones do not count).
DEFAULT_MAX_DISCOVERED = 256


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
    #: Health checks failed in a row.
    failures: int = 0
    #: zeroconf said goodbye for its last name (and no record came since): it stays
    #: while it answers, and leaves at the first check that fails.
    goodbye: bool = False
    #: A check answered since that goodbye.
    answered_goodbye: bool = False
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


@dataclass(frozen=True)
class Admission:
    """What a zeroconf record did: the worker it names (None: refused, and why),
    and the workers it took out of the registry (their connections must go)."""

    record: WorkerRecord | None
    removed: tuple[str, ...] = ()
    refused: str = ""


class Registry:
    """Workers by address; see the module docstring."""

    def __init__(self, *, max_discovered: int = DEFAULT_MAX_DISCOVERED) -> None:
        self.max_discovered = max_discovered
        self._workers: dict[str, WorkerRecord] = {}
        #: zeroconf instance name -> address
        self._names: dict[str, str] = {}
        #: name -> address a record moved it to while its worker was up
        self._claims: dict[str, str] = {}
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
    ) -> Admission:
        """zeroconf resolved *name* to *address*; see :class:`Admission`."""
        address = canonical(address)
        removed: list[str] = []
        old = self._names.get(name)
        if old is not None and old != address:
            if self._workers[old].routable:
                self._claims[name] = address
                return Admission(None, refused=f"name {name} is held by healthy worker {old}")
            if self._forget_name(name) is not None:
                removed.append(old)
        if address not in self._workers:
            discovered = [w for w in self._workers.values() if not w.static]
            if len(discovered) >= self.max_discovered:
                never_up = [w for w in discovered if w.last_seen is None]
                if not never_up:  # (nothing was removed: a removal would have made room)
                    return Admission(
                        None, refused=f"{self.max_discovered} discovered workers already"
                    )
                victim = max(never_up, key=lambda w: w.failures)
                self._remove(victim)
                removed.append(victim.address)
        record = self._workers.setdefault(address, WorkerRecord(address))
        record.discovered = True
        record.goodbye = record.answered_goodbye = False
        record.name = name
        if txt is not None:
            record.txt = dict(txt)
        self._names[name] = address
        self._claims.pop(name, None)
        return Admission(record, tuple(removed))

    def vanished(self, name: str) -> str | None:
        """zeroconf saw *name* leave: the address to check again now, if any.

        Nothing is removed here (anyone can send a goodbye): a discovered
        worker whose last name left goes at the first health check that fails
        (a worker says goodbye before it stops serving), unless a record
        announces it again first.
        """
        self._claims.pop(name, None)
        address = self._names.get(name)
        if address is None:
            return None
        record = self._workers[address]
        others = [n for n, a in self._names.items() if a == address and n != name]
        if others:  # still announced under another name (a restart that took a new one)
            del self._names[name]
            record.name = others[0]
        else:
            record.goodbye = True
            record.answered_goodbye = False
        return address

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
        self._remove(record)
        return record

    def _remove(self, record: WorkerRecord) -> None:
        del self._workers[record.address]
        for name in [n for n, a in self._names.items() if a == record.address]:
            del self._names[name]
        record.health = Health.DOWN

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
        record.failures = 0
        record.answered_goodbye = record.goodbye
        if restarted:
            return Change.RESTARTED
        return Change.NONE if was_up else Change.UP

    def check_failed(self, address: str, error: str, now: float) -> Change:
        """A health check or a call failed in a way that means the worker is unusable.

        A discovered worker that said goodbye leaves the registry; names its
        worker held against a claim move to the claimed address.
        """
        record = self._workers.get(address)
        if record is None:
            return Change.NONE
        record.last_error = error
        record.failures += 1
        was_up = record.health is Health.UP
        record.health = Health.DOWN
        for name, claimed in list(self._claims.items()):
            if self._names.get(name) == address:
                self.discovered(name, claimed)
        if record.goodbye and address in self._workers:
            for name in [n for n, a in self._names.items() if a == address]:
                self._forget_name(name)
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
