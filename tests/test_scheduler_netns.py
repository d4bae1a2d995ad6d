"""A small cluster in network namespaces: discovery, load, faults, recovery.

Three worker hosts and a scheduler host on one bridge (see ``tests/netns.py``);
every process is a real ``python -m vaccelray ...`` inside its namespace, and
zeroconf runs only there. Skipped without root or ``ip``; fails under ``CI``.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.netns import Topology, require_netns, status_json
from tests.processes import Proc, scheduler_argv, start_daemon, worker_argv

pytestmark = pytest.mark.netns

#: Routing must drop a dead or hung worker, and take back a returning one, within this.
REACT = 3.0


@pytest.fixture
def topology() -> Iterator[Topology]:
    require_netns()
    with Topology(4) as topo:
        yield topo


def start_worker(topo: Topology, index: int, port: int = 8194) -> tuple[Proc, str]:
    argv = worker_argv(
        "-a",
        f"tcp://{topo.addresses[index]}:{port}",
        "--backend",
        "noop",
        "--pool-size",
        "0",
        "--log-level",
        "info",
    )
    return start_daemon(argv, netns=topo.hosts[index])


def wait_line(proc: Proc, pattern: str, timeout: float, start: int = 0) -> float:
    """Seconds until *proc* logs a line matching *pattern* (fails after *timeout*)."""
    t0 = time.monotonic()
    proc.wait_for(pattern, timeout=timeout, start=start)
    return time.monotonic() - t0


def test_cluster_discovery_load_faults_and_recovery(topology: Topology) -> None:
    topo = topology
    procs: list[Proc] = []
    try:
        # Workers 0 and 1 start together; worker 2 then claims worker 0's zeroconf name
        # (same host name, same port) and must be renamed, not fail.
        w0, a0 = start_worker(topo, 0)
        w1, a1 = start_worker(topo, 1, port=8195)
        procs += [w0, w1]
        w0.wait_for("Announced", timeout=10)
        w1.wait_for("Announced", timeout=10)
        w2, a2 = start_worker(topo, 2)
        procs.append(w2)
        w2.wait_for("Announced", timeout=10)
        assert re.search(
            r"zeroconf name '.*-8194' is taken; announced as '.*-8194-2'", w2.text()
        ), w2.text()
        workers = [a0, a1, a2]

        sched_host = topo.hosts[3]
        sched, saddr = start_daemon(
            scheduler_argv(
                "-a",
                f"tcp://{topo.addresses[3]}:8190",
                "--interface",
                topo.addresses[3],
            ),
            netns=sched_host,
        )
        procs.append(sched)
        t0 = time.monotonic()
        for address in workers:
            sched.wait_for(
                rf"Worker {re.escape(address)} is up",
                timeout=max(0.1, 2.0 - (time.monotonic() - t0)),
            )
        assert time.monotonic() - t0 <= 2.0
        status = status_json(saddr, netns=sched_host)
        assert status["kind"] == "scheduler"
        seen = {w["address"]: w for w in status["workers"]}
        assert sorted(seen) == sorted(workers)
        assert all(w["health"] == "up" and w["backend"] == "noop" for w in seen.values())
        assert len({w["name"] for w in seen.values()}) == 3

        # 2,000 classifications over 50 sessions, paced over about 6.5 s.
        driver = Proc(
            [
                sys.executable,
                "-m",
                "tests.netns",
                "drive",
                "--address",
                saddr,
                "--sessions",
                "50",
                "--calls",
                "2000",
                "--concurrency",
                "16",
                "--rate",
                "400",
            ],
            netns=sched_host,
        )
        procs.append(driver)
        time.sleep(1.5)
        mark = len(sched.lines)
        w0.kill()  # kill -9
        assert wait_line(sched, rf"Worker {re.escape(a0)} is down", REACT, mark) <= REACT
        time.sleep(0.5)
        mark = len(sched.lines)
        topo.cut(1)
        assert wait_line(sched, rf"Worker {re.escape(a1)} is down", REACT, mark) <= REACT
        time.sleep(1.0)
        mark = len(sched.lines)
        w0, _ = start_worker(topo, 0)
        procs.append(w0)
        assert wait_line(sched, rf"Worker {re.escape(a0)} (is up|restarted)", REACT, mark) <= REACT
        mark = len(sched.lines)
        topo.mend(1)
        assert wait_line(sched, rf"Worker {re.escape(a1)} is up", REACT, mark) <= REACT

        assert driver.process.wait(60) == 0, driver.text()
        driver.stop()
        results = json.loads(driver.stdout[-1])
        failed = sum(results["codes"].values())
        # Every call either succeeded or failed with the documented status.
        assert results["sent"] == 2000
        assert results["ok"] + failed == 2000, results
        assert set(results["codes"]) <= {"14"}, results
        assert results["wrong_tag"] == 0, results
        assert results["transport"] == 0, results
        # Only calls in flight on a lost worker fail; the sessions moved on.
        assert failed <= 100, results
        for message in results["messages"]:
            assert re.match(
                r"14: worker tcp://\S+ was lost during ImageClassification of session \d+", message
            ), message
        assert results["destroyed"] == 50, results

        # Routing recovered: all three up, and new sessions spread over all of them.
        status = status_json(saddr, netns=sched_host)
        assert all(w["health"] == "up" for w in status["workers"]), status
        mark = len(sched.lines)
        again = Proc(
            [
                sys.executable,
                "-m",
                "tests.netns",
                "drive",
                "--address",
                saddr,
                "--sessions",
                "6",
                "--calls",
                "60",
                "--rate",
                "1000",
            ],
            netns=sched_host,
        )
        procs.append(again)
        assert again.process.wait(30) == 0, again.text()
        again.stop()
        second = json.loads(again.stdout[-1])
        assert second["ok"] == 60, second
        created = re.findall(r"Created session \d+ on (\S+)", "\n".join(sched.lines[mark:]))
        assert Counter(created) == {a0: 2, a1: 2, a2: 2}, created

        # No orphans: the scheduler has no sessions, and neither has any worker (the
        # sessions left on the worker whose cable was cut were destroyed when it came back).
        deadline = time.monotonic() + 5
        while True:
            status = status_json(saddr, netns=sched_host)
            leftovers = {w["address"]: w["reported_sessions"] for w in status["workers"]}
            if status["sessions"] == 0 and not any(leftovers.values()):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
    finally:
        for proc in reversed(procs):
            proc.stop()
    # Graceful shutdown withdrew the announcements.
    assert "Withdrew zeroconf announcement" in w2.text()
    assert sched.process.returncode == 0, sched.text()


def test_worker_without_tcp_listener_is_not_announced(topology: Topology) -> None:
    proc, address = start_daemon(
        worker_argv("-a", "unix:@vaccelray-netns-test", "--announce", "--backend", "noop"),
        netns=topology.hosts[0],
    )
    try:
        assert address == "unix:@vaccelray-netns-test"
        time.sleep(0.3)
    finally:
        proc.signal(signal.SIGTERM)
        proc.stop()
    assert "Announced" not in proc.text()
