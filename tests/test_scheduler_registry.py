"""The scheduler's registry and routing policy: pure code, no sockets, no clock."""

from __future__ import annotations

from collections import Counter

import pytest

from vaccelray.protocol.info import ClusterStatus, WorkerInfo, decode, encode
from vaccelray.scheduler.policy import load_score, pick_least_loaded
from vaccelray.scheduler.registry import Change, Health, Registry, WorkerRecord

A, B, C = "tcp://10.0.0.2:8194", "tcp://10.0.0.3:8194", "tcp://10.0.0.4:8194"


def info(instance: str = "i1", **kw: object) -> WorkerInfo:
    fields: dict[str, object] = {
        "version": "0.1.0",
        "instance": instance,
        "backend": "noop",
        "ops": ("classify", "genop"),
        "capacity": 2,
    }
    fields.update(kw)
    return WorkerInfo(**fields)  # type: ignore[arg-type]


def up_registry(*addresses: str) -> Registry:
    registry = Registry()
    for address in addresses:
        registry.add_static(address)
        assert registry.check_ok(address, info(), now=0.0) is Change.UP
    return registry


def test_unchecked_workers_are_not_routable() -> None:
    registry = Registry()
    registry.add_static(A)
    assert registry.discovered("w1", B, {"backend": "noop"}).removed == ()
    assert [w.health for w in registry] == [Health.UNKNOWN, Health.UNKNOWN]
    assert registry.pick() is None
    assert registry.routable() == []


def test_addresses_are_canonical_and_static_plus_discovered_is_one_worker() -> None:
    registry = Registry()
    registry.add_static("tcp://10.0.0.2:8194")
    record = registry.discovered("w1", "tcp://10.0.0.2:8194").record
    assert record is not None
    assert len(registry) == 1
    assert record.static
    assert record.discovered
    assert record.name == "w1"
    # Losing the zeroconf name (a goodbye, then a failed check) keeps a static worker.
    assert registry.vanished("w1") == A
    registry.check_failed(A, "refused", now=1.0)
    assert A in registry
    assert not record.discovered


def test_a_goodbye_asks_for_a_check_and_a_name_of_a_worker_never_up_moves() -> None:
    registry = Registry()
    registry.discovered("w1", A)
    admission = registry.discovered("w1", B)
    assert admission.removed == (A,)
    assert A not in registry
    record = admission.record
    assert record is not None
    assert record.address == B
    assert registry.vanished("w1") == B
    assert B in registry  # a goodbye alone removes nothing
    assert registry.check_failed(B, "refused", now=1.0) is Change.NONE
    assert B not in registry  # ... the check failing after it does
    assert record.health is Health.DOWN
    assert len(registry) == 0
    assert registry.vanished("never-seen") is None
    assert registry.vanished("w1") is None


def test_a_record_for_a_known_name_never_evicts_a_healthy_worker() -> None:
    registry = Registry()
    registry.discovered("w1", A, {"backend": "noop"})
    assert registry.check_ok(A, info(), now=1.0) is Change.UP
    squat = registry.discovered("w1", B, {"backend": "rogue"})
    assert squat.record is None
    assert squat.removed == ()
    assert squat.refused == f"name w1 is held by healthy worker {A}"
    assert [w.address for w in registry] == [A]
    assert registry.get(A).name == "w1"  # type: ignore[union-attr]
    assert registry.pick().address == A  # type: ignore[union-attr]
    # The claim is kept: when the worker stops answering, the name moves there.
    assert registry.check_failed(A, "timeout", now=2.0) is Change.DOWN
    assert [w.address for w in registry] == [B]
    assert registry.get(B).name == "w1"  # type: ignore[union-attr]
    # A claim a later record replaced, or a goodbye withdrew, moves nothing.
    registry.check_ok(B, info(), now=3.0)
    registry.discovered("w1", C)
    registry.discovered("w1", A)
    registry.vanished("w1")
    registry.discovered("w1", B)  # announced again: the goodbye is void
    registry.check_failed(B, "timeout", now=5.0)
    assert [w.address for w in registry] == [B]


def test_a_spoofed_goodbye_does_not_remove_a_worker_that_answers() -> None:
    registry = Registry()
    record = registry.discovered("w1", A).record
    assert record is not None
    registry.check_ok(A, info(), now=1.0)
    assert registry.vanished("w1") == A
    assert (record.goodbye, record.answered_goodbye) == (True, False)
    assert registry.check_ok(A, info(), now=2.0) is Change.NONE
    assert registry.check_ok(A, info(), now=2.5) is Change.NONE
    assert record.answered_goodbye
    assert registry.routable() == [record]
    # It said goodbye and has stopped answering: now it goes (a real graceful stop).
    assert registry.check_failed(A, "timeout", now=3.0) is Change.DOWN
    assert A not in registry
    # A record announcing it again voids the goodbye.
    record = registry.discovered("w1", A).record
    assert record is not None
    registry.check_ok(A, info(), now=4.0)
    registry.vanished("w1")
    registry.check_ok(A, info(), now=4.5)
    registry.discovered("w1", A)
    assert (record.goodbye, record.answered_goodbye) == (False, False)
    assert registry.check_failed(A, "timeout", now=5.0) is Change.DOWN
    assert A in registry


def test_a_claim_ends_when_the_name_is_announced_again_or_leaves() -> None:
    registry = Registry()
    registry.discovered("w1", A)
    registry.check_ok(A, info(), now=1.0)
    assert registry.discovered("w1", B).record is None  # a claim on the name
    registry.discovered("w1", A)  # the worker itself announces it again
    registry.check_failed(A, "timeout", now=2.0)
    assert [w.address for w in registry] == [A]  # the claim did not survive it
    registry.check_ok(A, info(), now=3.0)
    assert registry.discovered("w1", B).record is None
    registry.vanished("w1")  # a goodbye for the name ends the claim too
    registry.check_failed(A, "timeout", now=4.0)
    assert len(registry) == 0
    # Positive control: an open claim moves the name when its worker stops answering.
    registry.discovered("w1", A)
    registry.check_ok(A, info(), now=5.0)
    registry.discovered("w1", B)
    registry.check_failed(A, "timeout", now=6.0)
    assert [w.address for w in registry] == [B]


def test_discovered_workers_are_capped_and_one_never_up_makes_room() -> None:
    registry = Registry(max_discovered=2)
    registry.add_static(C)  # static workers do not count
    registry.discovered("a", A)
    registry.discovered("b", B)
    registry.check_failed(A, "refused", now=1.0)
    registry.check_failed(A, "refused", now=2.0)
    registry.check_failed(B, "refused", now=2.0)
    d = "tcp://10.0.0.5:8194"
    admission = registry.discovered("d", d)
    assert admission.removed == (A,)  # the one that failed most
    assert sorted(w.address for w in registry) == [B, C, d]
    assert registry.vanished("a") is None  # its name went with it
    # Workers that answered are never pushed out: past the cap a new one is refused.
    registry.check_ok(B, info(), now=3.0)
    registry.check_ok(d, info(), now=3.0)
    registry.check_failed(d, "timeout", now=4.0)  # down now, but it has answered
    e = "tcp://10.0.0.6:8194"
    refused = registry.discovered("e", e)
    assert refused.record is None
    assert refused.refused == "2 discovered workers already"
    assert e not in registry
    # A known address under a new name is no new worker.
    assert registry.discovered("b2", B).record is registry.get(B)


def test_health_transitions() -> None:
    registry = Registry()
    registry.add_static(A)
    assert registry.check_failed(A, "refused", now=1.0) is Change.NONE  # never was up
    assert registry.get(A).health is Health.DOWN  # type: ignore[union-attr]
    assert registry.check_ok(A, info("i1"), now=2.0) is Change.UP
    assert registry.check_ok(A, info("i1"), now=2.5) is Change.NONE
    assert registry.check_failed(A, "timeout", now=3.0) is Change.DOWN
    assert registry.check_failed(A, "timeout", now=3.5) is Change.NONE
    record = registry.get(A)
    assert record is not None
    assert record.last_error == "timeout"
    assert not record.routable
    assert registry.check_ok(A, info("i1"), now=4.0) is Change.UP
    assert record.last_error == ""
    assert record.last_seen == 4.0
    # A new instance id means the process restarted (even with no failed check between).
    assert registry.check_ok(A, info("i2"), now=4.5) is Change.RESTARTED
    assert record.instance == "i2"
    # Reports about unknown workers change nothing.
    assert registry.check_ok(C, info(), now=5.0) is Change.NONE
    assert registry.check_failed(C, "x", now=5.0) is Change.NONE


def test_pick_prefers_least_load_per_capacity() -> None:
    registry = up_registry(A, B)
    registry.check_ok(B, info(capacity=8), now=1.0)
    for _ in range(3):
        registry.session_bound(A)
        registry.session_bound(B)
    # A: 3 sessions / 2 slots; B: 3 / 8.
    picked = registry.pick()
    assert picked is not None
    assert picked.address == B
    # The worker's own report counts when it is higher (other clients' sessions).
    registry.check_ok(B, info(capacity=8, sessions=40), now=2.0)
    picked = registry.pick()
    assert picked is not None
    assert picked.address == A


def test_pick_counts_calls_in_flight() -> None:
    registry = up_registry(A, B)
    registry.call_started(A)
    assert registry.pick().address == B  # type: ignore[union-attr]
    registry.call_ended(A)
    registry.call_ended(A)  # never below zero
    assert registry.get(A).inflight == 0  # type: ignore[union-attr]


def test_ties_are_broken_round_robin() -> None:
    registry = up_registry(A, B, C)
    picks = Counter(registry.pick().address for _ in range(30))  # type: ignore[union-attr]
    assert picks == {A: 10, B: 10, C: 10}


def test_sessions_spread_evenly_when_bound_as_picked() -> None:
    registry = up_registry(A, B, C)
    for _ in range(50):
        chosen = registry.pick()
        assert chosen is not None
        registry.session_bound(chosen.address)
    counts = sorted(w.sessions for w in registry)
    assert counts == [16, 17, 17]


def test_pick_needs_capability_health_and_respects_exclude() -> None:
    registry = up_registry(A, B)
    registry.check_ok(B, info(ops=("classify", "exec")), now=1.0)
    assert registry.pick("exec").address == B  # type: ignore[union-attr]
    assert registry.pick("tensorflow") is None
    assert registry.pick(exclude=frozenset({A})).address == B  # type: ignore[union-attr]
    registry.check_failed(B, "dead", now=2.0)
    assert registry.pick("exec") is None
    assert registry.pick().address == A  # type: ignore[union-attr]


def test_policy_alone() -> None:
    a = WorkerRecord(A, ops=frozenset({"classify"}), capacity=4, inflight=2, sessions=2)
    b = WorkerRecord(B, ops=frozenset({"classify"}), capacity=1, reported_inflight=1)
    assert load_score(a) == pytest.approx(1.0)
    assert load_score(b) == pytest.approx(1.0)
    assert pick_least_loaded([a, b], turn=0) is a
    assert pick_least_loaded([a, b], turn=1) is b
    assert pick_least_loaded([a, b], op="genop") is None
    assert pick_least_loaded([]) is None


def test_status_rows_and_messagepack_round_trip() -> None:
    registry = up_registry(A)
    registry.discovered("gpu-box", B, {"backend": "onnx", "version": "0.1.0"})
    rows = registry.statuses(now=10.0)
    assert [r.address for r in rows] == [A, B]
    assert rows[0].health == "up"
    assert rows[0].static
    assert rows[0].last_seen == 10.0
    assert rows[1].health == "unknown"
    assert rows[1].backend == "onnx"
    assert rows[1].last_seen == -1.0
    status = ClusterStatus(version="0.1.0", sessions=3, workers=tuple(rows))
    assert decode(encode(status), ClusterStatus) == status
    # An empty payload is the request with its defaults; info round-trips too.
    assert decode(encode(info()), WorkerInfo) == info()


def test_sessions_being_destroyed_on_a_returning_worker_do_not_repel_placement() -> None:
    # B went away holding 3 of this scheduler's sessions (moved to A meanwhile); the
    # check that brings it back still counts them while the scheduler destroys them.
    registry = up_registry(A, B)
    for _ in range(2):
        registry.session_bound(A)
    registry.check_failed(B, "timeout", now=1.0)
    assert registry.check_ok(B, info(sessions=3), now=2.0) is Change.UP
    registry.releasing_sessions(B, 3)
    record = registry.get(B)
    assert record is not None
    assert record.leaving == 3
    picked = registry.pick()
    assert picked is not None
    assert picked.address == B  # without the discount B (3 reported) loses to A (2)
    # Destroys ending does not bring the stale count back before a new report.
    for _ in range(3):
        registry.session_released(B)
    assert (record.releasing, record.released) == (0, 3)
    assert registry.pick().address == B  # type: ignore[union-attr]
    # A report made after they are gone ends the discount.
    registry.check_ok(B, info(sessions=3), now=3.0)
    assert record.leaving == 0
    assert registry.pick().address == A  # type: ignore[union-attr]


def test_status_row_reports_every_field() -> None:
    registry = Registry()
    registry.add_static("tcp://10.0.0.2:08194")  # canonical: the port without its zero
    registry.discovered("w1", A, {"backend": "from-txt", "version": "9.9"})
    registry.check_ok(
        A,
        info("inst", version="1.2.3", capacity=3, inflight=4, sessions=5, ops=("b", "a")),
        now=4.0,
    )
    registry.call_started(A)
    registry.session_bound(A)
    registry.session_bound(A)
    registry.check_failed(A, "boom", now=5.0)
    [row] = registry.statuses(now=10.0)
    assert row.address == A
    assert row.name == "w1"
    assert row.static
    assert row.health == "down"
    assert row.backend == "noop"  # the check's answer beats the TXT record
    assert row.ops == ("a", "b")
    assert row.capacity == 3
    assert (row.inflight, row.sessions) == (1, 2)
    assert (row.reported_inflight, row.reported_sessions) == (4, 5)
    assert row.version == "1.2.3"
    assert row.instance == "inst"
    assert row.last_error == "boom"
    assert row.last_seen == 6.0  # seconds since the last answer
    # A clock read before the answer (another clock) never shows a negative age.
    [row] = registry.statuses(now=3.5)
    assert row.last_seen == 0.0


def test_status_row_before_any_check_uses_the_txt_record_or_nothing() -> None:
    registry = Registry()
    registry.discovered("w1", A, {"backend": "onnx", "version": "0.1.0"})
    registry.discovered("w2", B)
    rows = registry.statuses(now=1.0)
    assert [(r.backend, r.version, r.last_seen) for r in rows] == [
        ("onnx", "0.1.0", -1.0),
        ("", "", -1.0),
    ]
    assert [r.name for r in rows] == ["w1", "w2"]
    assert not rows[0].static


def test_check_ok_takes_what_the_worker_says() -> None:
    registry = Registry()
    record = registry.add_static(A)
    registry.check_ok(A, info("i1", backend="onnx", version="2.0", capacity=1), now=1.0)
    assert (record.backend, record.version, record.capacity) == ("onnx", "2.0", 1)
    assert record.ops == frozenset({"classify", "genop"})
    # A worker claiming no slots still takes one session at a time.
    registry.check_ok(A, info("i1", capacity=0), now=2.0)
    assert record.capacity == 1


def test_a_rediscovered_name_keeps_its_txt_unless_given_a_new_one() -> None:
    registry = Registry()
    record = registry.discovered("w1", A, {"backend": "onnx"}).record
    assert record is not None
    registry.discovered("w1", A)
    assert record.txt == {"backend": "onnx"}
    registry.discovered("w1", A, {"backend": "noop"})
    assert record.txt == {"backend": "noop"}
    assert len(registry) == 1


def test_a_static_worker_losing_its_name_is_no_longer_discovered() -> None:
    registry = Registry()
    record = registry.add_static(A)
    assert record.static
    registry.discovered("w1", A)
    assert record.discovered
    assert registry.vanished("w1") == A
    registry.check_failed(A, "refused", now=1.0)
    assert record.discovered is False
    assert record.static
    # Its name moving elsewhere does not make the static worker "moved".
    registry.discovered("w1", A)
    assert registry.discovered("w1", B).removed == ()
    assert A in registry
    assert B in registry


def test_a_worker_leaves_with_its_last_name() -> None:
    # A worker restarted under a new name while its old one lingers in the caches.
    registry = Registry()
    registry.discovered("old", A)
    record = registry.discovered("new", A).record
    assert record is not None
    assert registry.vanished("old") == A
    registry.check_failed(A, "refused", now=1.0)
    assert A in registry  # still announced as "new": the goodbye was for a stale name
    assert record.name == "new"
    assert record.discovered
    # And a name that moves off a worker (never up) still announced under another name.
    registry.discovered("third", A)
    assert record.name == "third"
    assert registry.discovered("third", B).removed == ()
    assert A in registry
    assert record.name == "new"  # the name it is still announced under
    assert registry.vanished("new") == A
    registry.check_failed(A, "refused", now=2.0)
    assert A not in registry
    assert record.health is Health.DOWN
    assert registry.vanished("new") is None
    assert [w.address for w in registry] == [B]


def test_load_counts_never_go_below_zero_and_ignore_unknown_workers() -> None:
    registry = up_registry(A)
    record = registry.get(A)
    assert record is not None
    registry.call_started(A)
    registry.call_started(A)
    assert record.inflight == 2
    registry.call_ended(A)
    assert record.inflight == 1
    registry.call_ended(A)
    registry.call_ended(A)
    assert record.inflight == 0
    registry.session_bound(A)
    registry.session_bound(A)
    assert record.sessions == 2
    registry.session_unbound(A)
    assert record.sessions == 1
    registry.session_unbound(A)
    registry.session_unbound(A)
    assert record.sessions == 0
    registry.releasing_sessions(A, 2)
    registry.releasing_sessions(A, 1)
    assert (record.releasing, record.released, record.leaving) == (3, 0, 3)
    for _ in range(4):
        registry.session_released(A)
    assert (record.releasing, record.released, record.leaving) == (0, 3, 3)
    for call in (
        registry.call_started,
        registry.call_ended,
        registry.session_bound,
        registry.session_unbound,
        registry.session_released,
    ):
        call(C)
    registry.releasing_sessions(C, 1)
    assert C not in registry


def test_a_restarted_worker_has_none_of_the_sessions_being_destroyed_on_its_old_process() -> None:
    registry = up_registry(A)
    record = registry.get(A)
    assert record is not None
    registry.releasing_sessions(A, 2)
    registry.session_released(A)
    assert registry.check_ok(A, info("i1", sessions=1), now=1.0) is Change.NONE
    assert (record.releasing, record.released) == (1, 0)  # still being destroyed
    assert registry.check_ok(A, info("i2", sessions=4), now=2.0) is Change.RESTARTED
    assert (record.releasing, record.released) == (0, 0)
    assert load_score(record) == pytest.approx(4 / 2)


def test_ties_take_turns_in_address_order_from_the_first() -> None:
    registry = up_registry(C, A, B)
    picks = [registry.pick().address for _ in range(7)]  # type: ignore[union-attr]
    assert picks == [A, B, C, A, B, C, A]


def test_pick_filters_by_operation_among_the_least_loaded() -> None:
    registry = up_registry(A, B)
    registry.check_ok(B, info(ops=("exec",)), now=1.0)
    registry.session_bound(A)
    registry.session_bound(A)
    # B is idle but cannot classify; A, loaded, can.
    assert registry.pick("classify").address == A  # type: ignore[union-attr]
    assert registry.pick("exec").address == B  # type: ignore[union-attr]
    assert registry.pick().address == B  # type: ignore[union-attr]
    assert registry.routable("exec") == [registry.get(B)]
    assert registry.routable() == [registry.get(A), registry.get(B)]


def test_load_score_per_slot() -> None:
    # Own counts against reported ones, each the larger; per slot of capacity.
    w = WorkerRecord(
        A, capacity=4, inflight=3, sessions=1, reported_inflight=1, reported_sessions=5
    )
    assert load_score(w) == pytest.approx((3 + 5) / 4)
    w = WorkerRecord(
        A, capacity=4, inflight=1, sessions=6, reported_inflight=2, reported_sessions=5
    )
    assert load_score(w) == pytest.approx((2 + 6) / 4)
    # Reported sessions this scheduler is destroying do not count...
    w.releasing, w.released = 1, 3
    assert load_score(w) == pytest.approx((2 + 6) / 4)
    w.sessions = 0
    assert load_score(w) == pytest.approx((2 + 1) / 4)
    # ...and capacity 0 (never from a registry) counts as one slot.
    w = WorkerRecord(A, capacity=0, sessions=3)
    assert load_score(w) == pytest.approx(3.0)


def test_pick_least_loaded_takes_the_minimum_and_rotates_ties_by_address() -> None:
    a = WorkerRecord(A, ops=frozenset({"classify"}), sessions=1)
    b = WorkerRecord(B, ops=frozenset({"classify", "genop"}), sessions=2)
    c = WorkerRecord(C, ops=frozenset({"classify"}), sessions=1)
    assert pick_least_loaded([b, c, a]) is a  # turn 0: the first address
    assert pick_least_loaded([b, c, a], turn=1) is c
    assert pick_least_loaded([b, c, a], turn=2) is a
    assert pick_least_loaded([b, c, a], op="genop") is b
    assert pick_least_loaded([b, c, a], op="genop", turn=5) is b
    assert pick_least_loaded([b]) is b
