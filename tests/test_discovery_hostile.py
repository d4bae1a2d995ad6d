"""Discovery under attack: mDNS records are hints, and no hint stops or misleads the scheduler.

Three layers: the pure checks (names, addresses, sources, backoff), health
checks against peers that are not workers (a scheduler, an implausible
Info, a chatty port) on loopback, and crafted mDNS packets (``tests/mdns.py``)
sent at a real scheduler from other network namespaces. Every refusal has a
positive control next to it: the same thing done properly is taken.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import msgspec
import pytest

from tests.netns import Topology, ip, require_netns, status_json
from tests.processes import REPO, Proc, child_env, scheduler_argv, start_daemon, worker_argv
from tests.waiting import eventually, finishes
from vaccelray.auth import token_metadata
from vaccelray.errors import RPCError, StatusCode
from vaccelray.membership import MembershipError
from vaccelray.protocol.announcement import SERVICE_TYPE
from vaccelray.protocol.info import (
    INFO_METHOD,
    WORKER_SERVICE,
    ClusterStatus,
    InfoRequest,
    WorkerInfo,
    WorkersRequest,
)
from vaccelray.protocol.info import decode as info_decode
from vaccelray.protocol.info import encode as info_encode
from vaccelray.protocol.services import INFO, WORKERS
from vaccelray.scheduler import SchedulerConfig, discovery, run_scheduler
from vaccelray.scheduler.discovery import (
    AddressPolicy,
    SourceGate,
    instance_name,
    local_networks,
    own_listeners,
    txt_hints,
)
from vaccelray.scheduler.health import MAX_BACKOFF, HealthChecker
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.scheduler.registry import Registry
from vaccelray.status import fetch_status
from vaccelray.testing import serve_member
from vaccelray.transport.client import connect
from vaccelray.transport.server import CallContext, Method, Service, serve
from vaccelray.worker.announce import AnnouncePlan, announce
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.noop import NoopBackend

T = "._vaccelray._tcp.local."
NET = ipaddress.IPv4Interface("10.9.0.4/24")
POLICY = AddressPolicy((NET,), own=(("10.9.0.4", 8190),))

# -- names -------------------------------------------------------------------------------


def test_instance_names_are_one_printable_label_of_our_type() -> None:
    assert instance_name("worker-1" + T) == "worker-1"
    assert instance_name("GPU box #1" + T) == "GPU box #1"  # spaces are printable
    assert instance_name("my.worker" + T) == "my.worker"  # DNS-SD instances may hold dots
    assert instance_name("x" * 63 + T) == "x" * 63
    assert instance_name("é" * 31 + "x" + T) == "é" * 31 + "x"  # 63 bytes
    for bad in (
        "x" * 64 + T,
        "é" * 32 + T,  # 32 characters, 64 bytes
        "a\nb" + T,
        "a\0b" + T,
        "a\x7fb" + T,
        T,
        "_vaccelray._tcp.local.",
        "w._other._tcp.local.",
        "w._vaccelray._tcp.local",  # no trailing dot
        "w._vaccelray._udp.local.",
    ):
        assert instance_name(bad) is None, bad


def test_txt_hints_keep_known_keys_and_cut_long_values() -> None:
    hints = txt_hints(
        {b"backend": b"x" * 1000, b"version": b"1.0", b"junk": b"y", b"capacity": None}
    )
    assert hints == {"backend": "x" * 128, "version": "1.0", "capacity": ""}
    assert txt_hints({b"backend": b"\x1b[2Jnoop\x7f\n"}) == {"backend": "?[2Jnoop??"}


# -- addresses ---------------------------------------------------------------------------


def test_an_on_link_address_is_taken() -> None:
    assert POLICY.refusal("10.9.0.2", 8194) is None
    assert POLICY.refusal("10.9.0.254", 8194) is None
    assert POLICY.refusal("10.9.0.4", 8194) is None  # our host, another port: a local worker
    assert POLICY.refusal("10.9.0.2", 1) is None
    assert POLICY.refusal("10.9.0.2", 65535) is None


@pytest.mark.parametrize(
    ("address", "port", "why"),
    [
        ("10.9.1.2", 8194, "10.9.1.2 is outside the subnets browsed (10.9.0.0/24)"),
        ("127.0.0.1", 8194, "127.0.0.1 is a loopback address"),
        ("0.0.0.0", 8194, "0.0.0.0 is an unspecified address"),
        ("224.0.0.251", 8194, "224.0.0.251 is a multicast address"),
        ("255.255.255.255", 8194, "255.255.255.255 is a reserved address"),
        ("10.9.0.255", 8194, "10.9.0.255 is the network or broadcast address of 10.9.0.0/24"),
        ("10.9.0.0", 8194, "10.9.0.0 is the network or broadcast address of 10.9.0.0/24"),
        ("10.9.0.4", 8190, "10.9.0.4:8190 is this scheduler's own listener"),
        ("::1", 8194, "'::1' is not an IPv4 address"),
        ("10.9.0.2", 0, "port 0 is not a TCP port"),
        ("10.9.0.2", 65536, "port 65536 is not a TCP port"),
    ],
)
def test_addresses_that_are_refused(address: str, port: int, why: str) -> None:
    assert POLICY.refusal(address, port) == why


def test_a_wildcard_listener_of_ours_is_refused_at_each_of_our_addresses_only() -> None:
    policy = AddressPolicy((NET, ipaddress.IPv4Interface("10.8.0.1/16")), own=(("0.0.0.0", 8190),))
    assert policy.refusal("10.9.0.4", 8190) == "10.9.0.4:8190 is this scheduler's own listener"
    assert policy.refusal("10.8.0.1", 8190) == "10.8.0.1:8190 is this scheduler's own listener"
    assert policy.refusal("10.9.0.5", 8190) is None  # another host, same port
    assert policy.refusal("10.10.0.5", 8190) == (
        "10.10.0.5 is outside the subnets browsed (10.9.0.0/24, 10.8.0.0/16)"
    )
    assert policy.refusal("10.9.0.4", 8191) is None


def test_a_point_to_point_subnet_has_no_broadcast_address() -> None:
    policy = AddressPolicy((ipaddress.IPv4Interface("10.7.0.0/31"),))
    assert policy.refusal("10.7.0.1", 8194) is None
    assert policy.refusal("10.7.0.0", 8194) is None


def test_the_allow_list_narrows_the_subnets() -> None:
    policy = AddressPolicy((NET,), allowed=(ipaddress.IPv4Network("10.9.0.0/28"),))
    assert policy.refusal("10.9.0.2", 8194) is None
    assert policy.refusal("10.9.0.20", 8194) == "10.9.0.20 is outside --allow-network"
    # It never widens them.
    wide = AddressPolicy((NET,), allowed=(ipaddress.IPv4Network("10.0.0.0/8"),))
    assert wide.refusal("10.10.0.2", 8194) is not None


def test_choose_takes_the_first_acceptable_address_and_says_why_not_the_others() -> None:
    assert POLICY.choose(["127.0.0.1", "10.9.1.2", "10.9.0.2", "10.9.0.3"], 8194) == (
        "10.9.0.2",
        [
            "127.0.0.1 is a loopback address",
            "10.9.1.2 is outside the subnets browsed (10.9.0.0/24)",
        ],
    )
    assert POLICY.choose([], 8194) == (None, [])
    assert POLICY.choose(["127.0.0.1"], 8194) == (None, ["127.0.0.1 is a loopback address"])


def test_own_listeners_are_the_tcp_ones() -> None:
    assert own_listeners(["tcp://10.9.0.4:8190", "unix:///tmp/s.sock", "tcp://0.0.0.0:81"]) == (
        ("10.9.0.4", 8190),
        ("0.0.0.0", 81),
    )


def test_local_networks_are_the_interface_asked_for_or_all_but_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ifaddr

    def adapter(*ips: tuple[Any, int]) -> SimpleNamespace:
        return SimpleNamespace(ips=[SimpleNamespace(ip=a, network_prefix=p) for a, p in ips])

    adapters = [
        adapter(("127.0.0.1", 8), (("::1", 0, 0), 128)),
        adapter((("fe80::1", 0, 2), 64), ("10.9.0.4", 24)),
        adapter(("192.168.5.1", 16)),
    ]
    monkeypatch.setattr(ifaddr, "get_adapters", lambda: adapters)
    assert local_networks() == (
        ipaddress.IPv4Interface("10.9.0.4/24"),
        ipaddress.IPv4Interface("192.168.5.1/16"),
    )
    assert local_networks("192.168.5.1") == (ipaddress.IPv4Interface("192.168.5.1/16"),)
    assert local_networks("10.1.1.1") == ()


# -- sources -----------------------------------------------------------------------------


def test_only_on_link_sources_are_read() -> None:
    assert POLICY.source_ok("10.9.0.77")
    assert not POLICY.source_ok("10.9.1.77")
    assert not POLICY.source_ok("fe80::1")
    gate = SourceGate(POLICY)
    assert not gate.admit("10.9.1.77", 0.0)
    assert not gate.admit("10.9.1.78", 0.0)
    assert gate.off_link == 2
    assert gate.admit("10.9.0.77", 0.0)
    assert (gate.off_link, gate.over_rate) == (2, 0)


def test_each_source_has_a_rate_and_a_burst() -> None:
    gate = SourceGate(POLICY, rate=2.0, burst=3.0)
    assert [gate.admit("10.9.0.2", 0.0) for _ in range(4)] == [True, True, True, False]
    assert gate.admit("10.9.0.3", 0.0)  # another source has its own
    assert gate.over_rate == 1
    assert not gate.admit("10.9.0.2", 0.25)  # half a token back
    assert gate.admit("10.9.0.2", 0.5)  # one more
    assert not gate.admit("10.9.0.2", 0.5)
    assert [gate.admit("10.9.0.2", 100.0) for _ in range(4)] == [True, True, True, False]


def test_a_flood_of_ignored_responses_is_logged_at_its_first_and_every_thousandth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vaccelray.scheduler")
    gate = SourceGate(POLICY, rate=1.0, burst=1.0)
    for n in range(2001):
        gate.admit(f"10.9.1.{n % 200}", 0.0)
        gate.admit("10.9.0.2", 0.0)
    assert (gate.off_link, gate.over_rate) == (2001, 2000)
    assert [r.getMessage() for r in caplog.records] == [
        "zeroconf: ignored 1 responses from off-link sources (latest 10.9.1.0)",
        "zeroconf: ignored 1 responses over the rate of their source (latest 10.9.0.2)",
        "zeroconf: ignored 1001 responses from off-link sources (latest 10.9.1.0)",
        "zeroconf: ignored 1001 responses over the rate of their source (latest 10.9.0.2)",
        "zeroconf: ignored 2001 responses from off-link sources (latest 10.9.1.0)",
    ]


def test_the_source_table_is_bounded_forgetting_the_least_recent() -> None:
    gate = SourceGate(POLICY, rate=1.0, burst=1.0, max_sources=2)
    assert gate.admit("10.9.0.2", 0.0)
    assert gate.admit("10.9.0.3", 0.0)
    assert not gate.admit("10.9.0.2", 0.0)  # spent (and now the most recent)
    assert gate.admit("10.9.0.5", 0.0)  # forgets 10.9.0.3, the least recent
    assert gate.admit("10.9.0.3", 0.0)  # a fresh burst: it was forgotten
    assert len(gate._buckets) == 2


# -- the wait list of names --------------------------------------------------------------


@pytest.mark.anyio
async def test_names_wait_once_each_and_the_oldest_goes_past_the_bound() -> None:
    waiting = discovery._Waiting(bound=2)
    waiting.put("a" + T, "a")
    waiting.put("b" + T, "b")
    waiting.put("a" + T, "a")  # again: once, now the newest
    waiting.put("c" + T, "c")  # past the bound: b (the oldest) goes
    assert waiting.dropped == 1
    waiting.put("e" + T, "e")  # and a (again the oldest) after it
    assert waiting.dropped == 2
    waiting.put("a" + T, "a")  # and then c
    assert waiting.dropped == 3
    assert await waiting.get() == ("e" + T, "e")
    assert await waiting.get() == ("a" + T, "a")
    got: list[tuple[str, str]] = []

    async def take() -> None:
        got.append(await waiting.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        waiting.put("d" + T, "d")
    assert got == [("d" + T, "d")]


# -- backoff -----------------------------------------------------------------------------


def test_a_discovered_worker_that_never_answered_is_checked_less_and_less_often() -> None:
    registry = Registry()
    health = HealthChecker(WorkerPool(registry), interval=0.5)
    record = registry.discovered("w", "tcp://10.9.0.2:8194").record
    assert record is not None
    delays = []
    for n in range(8):
        delays.append(health.delay(record))
        registry.check_failed(record.address, "refused", now=float(n))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    record.failures = 10**6  # no overflow however long it stays away
    assert health.delay(record) == MAX_BACKOFF
    # One that answered once is checked at the interval again (it may come back soon).
    registry.check_ok(record.address, WorkerInfo(version="", instance="i", backend="b"), 9.0)
    registry.check_failed(record.address, "refused", now=10.0)
    assert health.delay(record) == 0.5
    # So is a static worker, and an address no longer known.
    static = registry.add_static("tcp://10.9.0.3:8194")
    registry.check_failed(static.address, "refused", now=1.0)
    assert health.delay(static) == 0.5
    assert health.delay(None) == 0.5


# -- health checks against things that are not workers (loopback, no zeroconf) -----------


@asynccontextmanager
async def fake_info(answer: Any) -> AsyncIterator[str]:
    """A peer answering Worker/Info with *answer* (bytes, or an exception to raise)."""

    def handle(payload: bytes, ctx: CallContext) -> bytes:
        if isinstance(answer, BaseException):
            raise answer
        return bytes(answer)

    service = Service(WORKER_SERVICE, {INFO_METHOD: Method(handle, inline=True)})
    async with serve_member([service], ["tcp://127.0.0.1:0"], grace=0.1) as server:
        yield server.addresses[0]


def scheduler_config(*workers: str) -> SchedulerConfig:
    return SchedulerConfig(
        addresses=("tcp://127.0.0.1:0",),
        workers=workers,
        grace=1.0,
        health_interval=3600,  # two checks only: before serving, and the watcher's first
        health_timeout=60,
    )


async def checked_twice(sched: Any, *addresses: str) -> None:
    """Until the two checks of each static worker are done (none runs after them)."""
    registry = sched.pool.registry

    def done() -> bool:
        records = [registry.get(a) for a in addresses]
        return all(r is not None and (r.failures >= 2 or r.routable) for r in records)

    await eventually(done, f"two checks of {addresses}")


SANE = {"version": "1.0", "instance": "abc", "backend": "noop", "capacity": 4}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "bad",
    [
        {"capacity": 10**18},
        {"capacity": 0},
        {"inflight": -(2**63)},
        {"sessions": -1},
        {"connections": 2**40},
        {"uptime": -5.0},
        {"version": "v" * (1 << 20)},
        {"backend": "b" * 129},
        {"ops": ["x"] * 65},
        {"ops": ["y" * 200]},
        {"addresses": ["a"] * 65},
        {"backend": "\x1b[2J\x1b[31mnoop"},  # terminal escapes
        {"version": "1.0\n"},
        {"ops": ["classify\x7f"]},
    ],
)
async def test_an_implausible_info_answer_fails_the_check(bad: dict[str, Any]) -> None:
    async with (
        fake_info(msgspec.msgpack.encode({**SANE, **bad})) as liar,
        fake_info(msgspec.msgpack.encode(SANE)) as honest,
        run_scheduler(scheduler_config(liar, honest)) as sched,
    ):
        registry = sched.pool.registry
        await checked_twice(sched, liar, honest)
        assert registry.get(honest).health.value == "up"  # type: ignore[union-attr]
        row = registry.get(liar)
        assert row is not None
        assert row.health.value == "down"
        assert row.last_error == "refused: its Info answer is garbled or implausible"


@pytest.mark.anyio
async def test_a_scheduler_is_never_taken_for_a_worker() -> None:
    worker_config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), announce=False, pool_size=0)
    async with (
        run_worker(worker_config, backend=NoopBackend()) as worker,
        run_scheduler(scheduler_config()) as other,
        run_scheduler(scheduler_config(other.addresses[0], worker.addresses[0])) as sched,
    ):
        registry = sched.pool.registry
        own = sched.addresses[0]
        registry.add_static(own)  # as a forged record pointing at itself would
        await sched.health.check(own)
        await checked_twice(sched, other.addresses[0], worker.addresses[0])
        assert registry.get(worker.addresses[0]).routable  # type: ignore[union-attr]
        rows = {row.address: row for row in sched.view.status().workers}
        assert rows[other.addresses[0]].last_error == "refused: it is a scheduler, not a worker"
        assert rows[own].last_error == "refused: it is this scheduler (calls would come back here)"
        assert [w.address for w in registry.routable()] == [worker.addresses[0]]


@pytest.mark.anyio
async def test_what_a_failed_check_records_holds_no_peer_bytes() -> None:
    secret = "SECRET-BANNER-4711"

    async def chatty(stream: Any) -> None:
        async with stream:
            await stream.send(f"SSH-2.0-{secret}\r\n".encode() * 4)
            await stream.receive()

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        fake_info(RPCError(StatusCode.INTERNAL, secret)) as failing,
        fake_info(msgspec.msgpack.encode(SANE)[:-3] + secret.encode()) as garbled,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, chatty)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        banner = f"tcp://127.0.0.1:{port}"
        async with run_scheduler(scheduler_config(banner, failing, garbled)) as sched:
            await checked_twice(sched, banner, failing, garbled)
            rows = {row.address: row.last_error for row in sched.view.status().workers}
        tg.cancel_scope.cancel()
    assert rows[failing] == "health check answered INTERNAL"
    assert rows[garbled] == "refused: its Info answer is garbled or implausible"
    assert rows[banner] in (
        "health check cannot connect",  # its TLS handshake fails
        "health check connection failed",
        "no answer to the health check within 60 s",
    )
    assert not any(secret in text for text in rows.values()), rows


# -- crafted packets at a real scheduler in network namespaces --------------------------

#: Only so that a hang fails the test instead of blocking it: never a speed requirement.
LIVENESS = 60.0


class Lan:
    """A worker (0, not announced), a sender (1, also off-link) and a scheduler (2)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.worker_ip, self.sender_ip, self.sched_ip = topo.addresses
        self.off_link = f"10.{topo.subnet}.1.3"
        # The sender has a second address on another subnet, routed through it.
        ip("-n", topo.hosts[1], "addr", "add", f"{self.off_link}/24", "dev", "eth0")
        ip("-n", topo.hosts[2], "route", "add", f"10.{topo.subnet}.1.0/24", "via", self.sender_ip)
        self.procs: list[Proc] = []

    def start(self, argv: list[str], host: int) -> tuple[Proc, str]:
        proc, address = start_daemon(argv, netns=self.topo.hosts[host])
        self.procs.append(proc)
        return proc, address

    def worker(self, *extra: str) -> str:
        _, address = self.start(
            worker_argv(
                "-a",
                f"tcp://{self.worker_ip}:8194",
                "--backend",
                "noop",
                "--pool-size",
                "0",
                *extra,
            ),
            0,
        )
        return address

    def scheduler(self) -> tuple[Proc, str]:
        return self.start(
            scheduler_argv(
                "-a",
                f"tcp://{self.sched_ip}:8190",
                "--interface",
                self.sched_ip,
                "--log-level",
                "info",
            ),
            2,
        )

    def sources(self, count: int) -> list[str]:
        """*count* more on-link addresses of the sender."""
        added = [f"10.{self.topo.subnet}.0.{100 + i}" for i in range(count)]
        for address in added:
            ip("-n", self.topo.hosts[1], "addr", "add", f"{address}/24", "dev", "eth0")
        return added

    def flood(self, *args: str) -> None:
        """``python -m tests.mdns flood ARGS`` on the sender, to the scheduler, until done."""
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.topo.hosts[1],
                sys.executable,
                "-m",
                "tests.mdns",
                "flood",
                "--to",
                self.sched_ip,
                "--prefix",
                f"10.{self.topo.subnet}.0",
                *args,
            ],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=REPO,
            timeout=LIVENESS,
            check=False,
        )
        assert out.returncode == 0, out.stderr

    def send(self, *args: str, source: str | None = None) -> None:
        """One crafted response from the sender host to the scheduler."""
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.topo.hosts[1],
                sys.executable,
                "-m",
                "tests.mdns",
                "send",
                "--to",
                self.sched_ip,
                "--source",
                source or self.sender_ip,
                *args,
            ],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=REPO,
            timeout=LIVENESS,
            check=False,
        )
        assert out.returncode == 0, out.stderr

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def lan() -> Iterator[Lan]:
    require_netns()
    with Topology(3) as topo:
        network = Lan(topo)
        try:
            yield network
        finally:
            network.close()


def wait(proc: Proc, pattern: str, start: int = 0) -> int:
    """Until *proc* logs *pattern* (after line *start*); the index of the line after it."""
    proc.wait_for(pattern, timeout=LIVENESS, start=start)
    regex = re.compile(pattern)
    return next(i for i in range(start, len(proc.lines)) if regex.search(proc.lines[i])) + 1


def names(address: str, lan: Lan) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in status_json(address, netns=lan.topo.hosts[2])["workers"]}


@pytest.mark.netns
def test_an_off_link_record_is_ignored_and_the_same_on_link_is_taken(lan: Lan) -> None:
    worker = lan.worker("--no-announce")
    sched, saddr = lan.scheduler()
    record = ["--name", "w1", "--address", lan.worker_ip, "--port", "8194"]
    lan.send(*record, source=lan.off_link)
    mark = wait(sched, rf"ignored 1 responses from off-link sources \(latest {lan.off_link}\)")
    assert "Discovered" not in sched.text()
    lan.send(*record)  # the same record (another message id), from on the link
    wait(sched, rf"Worker {re.escape(worker)} is up", mark)
    assert names(saddr, lan)["w1"]["health"] == "up"


@pytest.mark.netns
def test_malformed_names_never_stop_the_scheduler(lan: Lan) -> None:
    worker = lan.worker("--no-announce")
    sched, saddr = lan.scheduler()
    for target in (
        "w._other._tcp.local",  # a PTR to another service type
        "a\\nb._vaccelray._tcp.local",
        "a\\0b._vaccelray._tcp.local",
        "a" * 40 + "." + "b" * 40 + "._vaccelray._tcp.local",  # two labels, 81 bytes
    ):
        lan.send("--raw-ptr", target)
    mark = 0
    for shown in (
        r"'w\._other\._tcp\.local\.'",
        r"'a\\nb\._vaccelray",
        r"'a\\x00b\._vaccelray",
        r"'a{40}\.b{40}\._vaccelray",
    ):
        mark = wait(sched, "ignored a malformed name " + shown, mark)
    # A good worker announced after them is still found: the scheduler lives on.
    lan.send("--name", "good", "--address", lan.worker_ip, "--port", "8194")
    wait(sched, rf"Worker {re.escape(worker)} is up", mark)
    assert sched.process.poll() is None
    assert list(names(saddr, lan)) == ["good"]


@pytest.mark.netns
def test_a_squatted_name_or_spoofed_goodbye_never_evicts_a_healthy_worker(lan: Lan) -> None:
    worker_proc, worker = lan.start(
        worker_argv(
            "-a",
            f"tcp://{lan.worker_ip}:8194",
            "--backend",
            "noop",
            "--pool-size",
            "0",
        ),
        0,
    )
    name = worker_proc.wait_for(r"Announced (\S+) on", timeout=LIVENESS).group(1)
    sched, saddr = lan.scheduler()
    mark = wait(sched, rf"Worker {re.escape(worker)} is up")
    # Another host claims the name (with a live port: the sender's own scheduler-less host).
    lan.send("--name", name, "--address", lan.sender_ip, "--port", "8194")
    mark = wait(sched, rf"ignored: name {re.escape(name)} is held by healthy worker", mark)
    lan.send("--name", name, "--address", lan.worker_ip, "--port", "8194", "--goodbye")
    mark = wait(sched, rf"{re.escape(name)} said goodbye; checking {re.escape(worker)}", mark)
    mark = wait(sched, rf"Worker {re.escape(worker)} still answers after a goodbye", mark)
    status = names(saddr, lan)
    assert list(status) == [name]
    assert status[name]["address"] == worker
    assert status[name]["health"] == "up"
    assert f"Worker {worker} left" not in sched.text()
    # Positive control: the worker's own goodbye (a graceful stop) does remove it.
    assert worker_proc.stop() == 0
    wait(sched, rf"Worker {re.escape(worker)} left", mark)
    assert names(saddr, lan) == {}


@pytest.mark.netns
def test_self_loopback_and_broadcast_announcements_are_refused(lan: Lan) -> None:
    worker = lan.worker("--no-announce")
    sched, saddr = lan.scheduler()
    # A default (loopback-only) worker on the scheduler's own host.
    _, local = lan.start(
        worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0"), 2
    )
    local_port = local.rsplit(":", 1)[1]
    subnet = lan.topo.subnet
    mark = 0
    for label, address, port, why in (
        ("self", lan.sched_ip, "8190", "is this scheduler's own listener"),
        ("loop", "127.0.0.1", local_port, "is a loopback address"),
        ("zero", "0.0.0.0", "8194", "is an unspecified address"),
        ("bcast", f"10.{subnet}.0.255", "8194", "is the network or broadcast address"),
        ("routed", f"10.{subnet}.1.3", "8194", "is outside the subnets browsed"),
    ):
        lan.send("--name", label, "--address", address, "--port", port)
        mark = wait(sched, rf"'{label}' ignored: {re.escape(address)}\S* {why}", mark)
    # Positive control: a proper worker on the subnet is taken.
    lan.send("--name", "good", "--address", lan.worker_ip, "--port", "8194")
    wait(sched, rf"Worker {re.escape(worker)} is up", mark)
    assert list(names(saddr, lan)) == ["good"]


@pytest.mark.anyio
async def test_the_cluster_status_needs_the_cluster_token() -> None:
    config = dataclasses.replace(scheduler_config(), token="the-cluster-token")
    async with run_scheduler(config) as sched:
        address = sched.addresses[0]
        for wrong in ("another-token", None):  # None: the user's default one (not this)
            with pytest.raises(MembershipError):  # proofs differ: nothing is asked
                await fetch_status(address, token=wrong)
        async with connect(address) as plain:  # and the token itself is never taken
            with pytest.raises(RPCError) as refused:
                await plain.call_rpc(
                    WORKERS, WorkersRequest(), metadata=token_metadata("the-cluster-token")
                )
            assert refused.value.code == StatusCode.UNAUTHENTICATED
        # Positive control: with the token it answers (and its Info stays open).
        status = await fetch_status(address, token="the-cluster-token")
        assert isinstance(status, ClusterStatus)
        async with connect(address) as client:
            info = await client.call_rpc(INFO, InfoRequest())
        assert (info.backend, info.instance) == ("scheduler", sched.view.instance)


@pytest.mark.anyio
async def test_workers_that_come_and_go_leave_nothing_behind_in_the_pool() -> None:
    """Fake addresses churn through the cap; the pool keeps nothing per address they had."""
    registry = Registry(max_discovered=2)
    pool = WorkerPool(registry, connect_timeout=5.0)
    health = HealthChecker(pool, timeout=5.0)
    try:
        async with fake_info(msgspec.msgpack.encode(SANE)) as honest:
            registry.discovered("real", honest)
            await health.check(honest)  # a real worker, checked and kept
            pool.credential(honest)
            for n in range(50):
                address = f"tcp://127.0.0.1:{n + 1}"  # nothing listens there
                admission = registry.discovered(f"fake-{n}", address)
                for gone in admission.removed:
                    pool.forget(gone)
                pool.credential(address)
                await health.check(address)
            assert len(registry) == 2
            kept = {(honest, True), (honest, False), ("tcp://127.0.0.1:50", True)}
            assert set(pool._locks) <= kept
            assert set(pool._credentials) <= {honest, "tcp://127.0.0.1:50"}
            # Positive control: the worker that stays keeps its connections (the checks',
            # and the calls' opened when it came up) and its credential.
            assert {(honest, True), (honest, False)} <= set(pool._locks)
            assert honest in pool._credentials
    finally:
        await pool.aclose()


@pytest.mark.anyio
async def test_the_cap_on_discovered_workers_is_the_one_configured() -> None:
    config = dataclasses.replace(scheduler_config(), max_discovered=3)
    async with run_scheduler(config) as sched:
        registry = sched.pool.registry
        for n in range(3):
            assert registry.discovered(f"w{n}", f"tcp://10.9.0.{n + 2}:8194").record is not None
            registry.check_ok(f"tcp://10.9.0.{n + 2}:8194", WorkerInfo(**SANE), 1.0)
        assert registry.discovered("w3", "tcp://10.9.0.9:8194").refused == (
            "3 discovered workers already"
        )


@pytest.mark.netns
def test_a_flood_of_bare_names_never_holds_up_a_complete_announcement(lan: Lan) -> None:
    worker = lan.worker("--no-announce")
    sched, saddr = lan.scheduler()
    # 1,200 names with nothing behind them (each would need asking, 3 s per try, 8 at a
    # time: over 7 minutes of queue), from 12 on-link sources within their bursts.
    sources = lan.sources(12)
    lan.flood("--bare", "--count", "1200", "--rounds", "1", "--sources", ",".join(sources))
    mark = wait(sched, r"zeroconf: 'fake-\d+' did not resolve")  # the queue is busy
    lan.send("--name", "good", "--address", lan.worker_ip, "--port", "8194")
    wait(sched, rf"Worker {re.escape(worker)} is up", mark)
    assert names(saddr, lan)["good"]["health"] == "up"


# -- the browser itself, in this process, inside a namespace -----------------------------


def in_netns(netns: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Run ``fn`` on an asyncio loop in a thread that has entered *netns* (setns(2)):
    every socket it opens, zeroconf's included, is the namespace's."""
    libc = ctypes.CDLL(None, use_errno=True)

    def run() -> None:
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), f"setns {netns}")
        finally:
            os.close(fd)
        anyio.run(fn, backend="asyncio")

    finishes(run, f"the browser in {netns}", timeout=4 * LIVENESS)


#: Linux's SO_TIMESTAMPNS (asm-generic/socket.h; Python's socket module lacks it): each
#: datagram comes with the time it arrived, a struct timespec.
SO_TIMESTAMPNS = 35


@pytest.mark.netns
def test_a_withdrawn_worker_says_goodbye_last_and_past_the_duplicate_window() -> None:
    """A reply zeroconf queued before the withdrawal may leave after the first goodbye;
    listeners drop the repeats of that goodbye as duplicates. A later goodbye is the
    last word on the name, or it would stay in their caches (CI saw the worker kept)."""
    from zeroconf import DNSIncoming, DNSOutgoing, DNSPointer, DNSQuestion, const

    require_netns()
    full = f"w1.{SERVICE_TYPE}"
    seen: list[tuple[float, int]] = []  # (arrival, TTL) of each PTR naming the worker
    with Topology(1) as topo:
        [here] = topo.addresses

        async def scenario() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(("", 5353))
                group = socket.inet_aton("224.0.0.251") + socket.inet_aton(here)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
                # The kernel stamps each packet as it arrives: a loaded test reading late
                # cannot make two goodbyes look closer than they were sent.
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                sock.setblocking(False)

                def drain() -> None:
                    while True:
                        try:
                            data, ancillary, _, _ = sock.recvmsg(9000, socket.CMSG_SPACE(16))
                        except BlockingIOError:
                            return
                        [(_, _, stamp)] = ancillary
                        seconds, nanoseconds = struct.unpack("qq", stamp)
                        for record in DNSIncoming(data).answers():
                            if isinstance(record, DNSPointer) and record.alias == full:
                                seen.append((seconds + nanoseconds / 1e9, record.ttl))

                async def collect() -> None:
                    while True:
                        await anyio.wait_readable(sock)
                        drain()

                query = DNSOutgoing(const._FLAGS_QR_QUERY)
                query.add_question(DNSQuestion(SERVICE_TYPE, const._TYPE_PTR, const._CLASS_IN))
                info = WorkerInfo(**SANE)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect)
                    async with announce(
                        info, AnnouncePlan((here,), 8194, (here,)), instance_name="w1"
                    ):
                        await eventually(lambda: bool(seen), "the worker's announcement")
                        # Asked just before the withdrawal: zeroconf queues a reply.
                        sock.sendto(query.packets()[0], ("224.0.0.251", 5353))
                    tg.cancel_scope.cancel()
                drain()

        in_netns(topo.hosts[0], scenario)
    goodbyes = [t for t, ttl in seen if ttl == 0]
    assert goodbyes, seen
    assert seen[-1][1] == 0, seen  # nothing announces the name after its last goodbye
    # ...and that goodbye is no repeat a listener drops (it arrives past the window).
    window = const._DUPLICATE_PACKET_SUPPRESSION_INTERVAL / 1000
    assert goodbyes[-1] - goodbyes[0] >= window, seen


@pytest.mark.netns
def test_the_browser_takes_hints_only(caplog: pytest.LogCaptureFixture) -> None:
    require_netns()
    caplog.set_level(logging.INFO, logger="vaccelray.scheduler")
    with Topology(2) as topo:
        here, sender = topo.addresses
        off_link = f"10.{topo.subnet}.1.3"
        ip("-n", topo.hosts[1], "addr", "add", f"{off_link}/24", "dev", "eth0")
        ip("-n", topo.hosts[0], "route", "add", f"10.{topo.subnet}.1.0/24", "via", sender)

        def send(*args: str, source: str = sender) -> None:
            out = subprocess.run(
                [
                    *("ip", "netns", "exec", topo.hosts[1], sys.executable, "-m", "tests.mdns"),
                    *("send", "--to", here, "--source", source, *args),
                ],
                capture_output=True,
                text=True,
                env=child_env(),
                cwd=REPO,
                timeout=LIVENESS,
                check=False,
            )
            assert out.returncode == 0, out.stderr

        def logged(text: str) -> Callable[[], bool]:
            return lambda: any(text in r.getMessage() for r in caplog.records)

        async def scenario() -> None:
            registry = Registry()
            pool = WorkerPool(registry, connect_timeout=LIVENESS)
            health = HealthChecker(pool, interval=0.2, timeout=LIVENESS)
            service = Service(
                WORKER_SERVICE,
                {INFO_METHOD: Method(lambda p, c: msgspec.msgpack.encode(SANE), inline=True)},
            )
            own = f"tcp://{here}:8190"
            async with (
                serve([service], [f"tcp://{here}:0"], grace=0.1) as worker,
                anyio.create_task_group() as tg,
            ):
                port = worker.addresses[0].rsplit(":", 1)[1]
                good = ["--name", "good", "--address", here, "--port", port]
                await tg.start(health.run)
                await tg.start(
                    functools.partial(discovery.browse, pool, health, interface=here, own=[own])
                )

                async def send_and_see(*args: str, text: str, source: str = sender) -> None:
                    await anyio.to_thread.run_sync(functools.partial(send, *args, source=source))
                    await eventually(logged(text), text)

                await send_and_see(*good, source=off_link, text="off-link sources")
                for target, shown in (
                    ("w._other._tcp.local", "malformed name 'w._other"),
                    ("a\\nb._vaccelray._tcp.local", "malformed name 'a\\nb."),
                ):
                    await send_and_see("--raw-ptr", target, text=shown)
                await send_and_see(
                    "--name",
                    "self",
                    "--address",
                    here,
                    "--port",
                    "8190",
                    text=f"'self' ignored: {here}:8190 is this scheduler's own listener",
                )
                await send_and_see(
                    "--name",
                    "loop",
                    "--address",
                    "127.0.0.1",
                    "--port",
                    port,
                    text="'loop' ignored: 127.0.0.1 is a loopback address",
                )
                # Positive control: the same record on the link, at a real worker, is taken.
                await send_and_see(*good, text=f"Worker {worker.addresses[0]} is up")
                assert [w.name for w in registry] == ["good"]
                await send_and_see(
                    "--name",
                    "good",
                    "--address",
                    sender,
                    "--port",
                    port,
                    text=f"is held by healthy worker {worker.addresses[0]}",
                )
                await send_and_see(*good, "--goodbye", text="good said goodbye")
                await eventually(logged("still answers after a goodbye"), "re-checked")
                assert [w.address for w in registry.routable()] == [worker.addresses[0]]
                tg.cancel_scope.cancel()
            await pool.aclose()

        in_netns(topo.hosts[0], scenario)


def test_an_empty_info_payload_is_the_message_with_its_defaults() -> None:
    assert info_decode(b"", InfoRequest) == InfoRequest()
    assert info_decode(b"", WorkersRequest) == WorkersRequest()
    assert info_decode(info_encode(WorkerInfo(**SANE)), WorkerInfo) == WorkerInfo(**SANE)


@pytest.mark.anyio
async def test_a_goodbye_is_checked_once_and_the_worker_leaves_when_it_stops_answering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.scheduler")
    registry = Registry()
    pool = WorkerPool(registry, connect_timeout=LIVENESS)
    health = HealthChecker(pool, timeout=LIVENESS)
    gone: list[str] = []
    pool.add_listener(lambda address, change: gone.append(address))
    try:
        async with fake_info(msgspec.msgpack.encode(SANE)) as worker:
            registry.discovered("w", worker)
            await health.check(worker)
            assert registry.vanished("w") == worker
            await health.check(worker)
            await health.check(worker)  # the goodbye was answered: said once
            lines = [r.getMessage() for r in caplog.records]
            assert (
                lines.count(
                    f"Worker {worker} still answers after a goodbye: it stays while it does"
                )
                == 1
            )
            assert registry.get(worker).routable  # type: ignore[union-attr]
        await health.check(worker)  # it stopped answering: it leaves, and the pool forgets it
        assert worker not in registry
        assert f"Worker {worker} left (it said goodbye, or its name moved)" in [
            r.getMessage() for r in caplog.records
        ]
        assert worker in gone
    finally:
        await pool.aclose()


@pytest.mark.anyio
async def test_a_plain_agent_is_up_and_a_refusal_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vaccelray.scheduler")
    registry = Registry()
    pool = WorkerPool(registry, connect_timeout=LIVENESS)
    health = HealthChecker(pool, timeout=LIVENESS, instance="me")
    scheduler = {**SANE, "backend": "scheduler"}
    try:
        async with (
            fake_info(RPCError(StatusCode.UNIMPLEMENTED, "no Info here")) as agent,
            fake_info(msgspec.msgpack.encode(scheduler)) as other,
        ):
            registry.add_static(agent)
            registry.add_static(other)
            await health.check(agent)
            assert registry.get(agent).backend == "vaccel-agent"  # type: ignore[union-attr]
            assert registry.get(agent).routable  # type: ignore[union-attr]
            for _ in range(3):
                await health.check(other)
            refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert refused == [f"Worker {other} refused: it is a scheduler, not a worker"]
    finally:
        await pool.aclose()
