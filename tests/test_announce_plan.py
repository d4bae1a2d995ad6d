"""What a worker announces, from its listeners: the addresses in the record, the port,
and the interfaces mDNS runs on (``vaccelray.worker.announce.plan_announcement``)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from tests.waiting import eventually
from vaccelray.protocol.info import WorkerInfo
from vaccelray.worker import announce
from vaccelray.worker.announce import AnnouncePlan, announce_until, plan_announcement


def test_only_a_tcp_listener_is_announced_the_first_one() -> None:
    assert plan_announcement(["unix:///run/w.sock"]) is None
    assert plan_announcement([]) is None
    plan = plan_announcement(["unix:///run/w.sock", "tcp://10.1.1.1:81", "tcp://10.2.2.2:82"])
    assert plan == AnnouncePlan(("10.1.1.1",), 81, ("10.1.1.1",))
    assert not plan.loopback_only


def test_a_specific_address_is_announced_on_its_interface_or_the_one_named() -> None:
    assert plan_announcement(["tcp://10.0.0.2:8194"], "10.0.0.9") == AnnouncePlan(
        ("10.0.0.2",), 8194, ("10.0.0.9",)
    )
    loopback = plan_announcement(["tcp://127.0.0.1:8194"])
    assert loopback == AnnouncePlan(("127.0.0.1",), 8194, ("127.0.0.1",))
    assert loopback.loopback_only
    # A host name is announced by its address.
    assert plan_announcement(["tcp://localhost:7"]) == AnnouncePlan(
        ("127.0.0.1",), 7, ("127.0.0.1",)
    )


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "[::]"])
def test_a_wildcard_announces_the_hosts_addresses_on_every_interface(
    wildcard: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(announce, "_host_ipv4_addresses", lambda: ["10.0.0.7", "10.1.0.7"])
    assert plan_announcement([f"tcp://{wildcard}:8194"]) == AnnouncePlan(
        ("10.0.0.7", "10.1.0.7"), 8194, ()
    )
    # ...or only the interface named, or loopback when the host has no other address.
    assert plan_announcement([f"tcp://{wildcard}:8194"], "10.1.0.7") == AnnouncePlan(
        ("10.1.0.7",), 8194, ("10.1.0.7",)
    )
    monkeypatch.setattr(announce, "_host_ipv4_addresses", lambda: [])
    alone = plan_announcement([f"tcp://{wildcard}:8194"])
    assert alone == AnnouncePlan(("127.0.0.1",), 8194, ("127.0.0.1",))
    assert alone.loopback_only


def test_the_hosts_addresses_are_its_ipv4_ones_but_loopback() -> None:
    found = announce._host_ipv4_addresses()
    assert all(":" not in a and not a.startswith("127.") for a in found)
    assert all(len(a.split(".")) == 4 for a in found)


@pytest.mark.anyio
async def test_the_announcement_lasts_until_stop_and_its_failure_is_never_fatal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plan = AnnouncePlan(("10.0.0.2",), 8194, ("10.0.0.2",))
    info = WorkerInfo(version="1", instance="abc", backend="noop")
    events: list[str] = []

    @asynccontextmanager
    async def announcing(*args: object, **kwargs: object) -> AsyncIterator[None]:
        assert args == (info, plan)
        assert kwargs == {"instance_name": "w1"}
        events.append("announced")
        yield
        events.append("withdrawn")

    monkeypatch.setattr(announce, "announce", announcing)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(announce_until, info, plan, stop, instance_name="w1"))
        await eventually(lambda: events == ["announced"], "the worker announced")
        stop.set()
    assert events == ["announced", "withdrawn"]

    @asynccontextmanager
    async def failing(*args: object, **kwargs: object) -> AsyncIterator[None]:
        raise OSError("no multicast here")
        yield  # (a generator)

    monkeypatch.setattr(announce, "announce", failing)
    await announce_until(info, plan, anyio.Event())  # returns: the worker keeps serving
    assert [r.getMessage() for r in caplog.records if r.name == "vaccelray.announce"] == [
        "zeroconf announcement failed (the worker keeps serving): no multicast here"
    ]
