"""The write batch: answers made during one read leave at its end (vaccelray.transport.writes)."""

from __future__ import annotations

import threading

import pytest

from vaccelray.transport.writes import WriteBatch, defer


def test_no_batch_open_defers_nothing() -> None:
    wrote: list[str] = []
    assert defer(lambda: wrote.append("a")) is False
    assert wrote == []


def test_deferred_writes_happen_when_the_batch_closes_in_order() -> None:
    wrote: list[str] = []
    with WriteBatch():
        assert defer(lambda: wrote.append("a")) is True
        assert defer(lambda: wrote.append("b")) is True
        assert wrote == []
    assert wrote == ["a", "b"]
    assert defer(lambda: wrote.append("c")) is False  # closed: nothing open any more


def test_a_nested_batch_is_part_of_the_outer_one() -> None:
    wrote: list[str] = []
    with WriteBatch():
        with WriteBatch():
            defer(lambda: wrote.append("inner"))
        assert wrote == []
        defer(lambda: wrote.append("outer"))
    assert wrote == ["inner", "outer"]


def test_a_write_deferring_another_gets_it_written_too() -> None:
    wrote: list[str] = []

    def first() -> None:
        wrote.append("first")
        defer(lambda: wrote.append("second"))

    with WriteBatch():
        defer(first)
    assert wrote == ["first", "second"]


def test_a_failing_write_does_not_stop_the_others_nor_leave_a_batch_open() -> None:
    wrote: list[str] = []

    def broken() -> None:
        raise OSError("gone")

    def read() -> None:
        with WriteBatch():
            defer(broken)
            defer(lambda: wrote.append("after"))

    with pytest.raises(OSError, match="gone"):
        read()
    assert wrote == ["after"]
    assert defer(lambda: None) is False


def test_a_batch_is_per_thread() -> None:
    seen: list[bool] = []
    with WriteBatch():
        thread = threading.Thread(target=lambda: seen.append(defer(lambda: None)))
        thread.start()
        thread.join()
    assert seen == [False]
