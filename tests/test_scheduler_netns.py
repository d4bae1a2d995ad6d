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
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.netns import Topology, require_netns, status_json
from tests.processes import Proc, scheduler_argv, start_daemon, worker_argv

pytestmark = pytest.mark.netns

PROGRESS = re.compile(r"progress ok=(\d+)$")

#: Only so that a hang fails the test instead of blocking it: never a speed requirement.
LIVENESS = 60.0
#: Successful calls the load must make after each fault (sessions moved on).
AFTER_FAULT = 100


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


def wait_line(proc: Proc, pattern: str, start: int) -> None:
    """Until *proc* logs a line matching *pattern* after its line *start*."""
    proc.wait_for(pattern, timeout=LIVENESS, start=start)


def keeps_succeeding(driver: Proc, more: int = AFTER_FAULT) -> int:
    """Until the load driver has made *more* further successful calls; its count then."""
    done = [int(m.group(1)) for line in driver.lines if (m := PROGRESS.search(line))]
    target = max(done, default=0) + more
    driver.wait_for(rf"progress ok={target}$", timeout=LIVENESS)
    return target


def cluster_status(
    address: str, netns: str, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the scheduler's status until *until* holds (each poll is a process start)."""
    deadline = time.monotonic() + LIVENESS
    while True:
        status = status_json(address, netns=netns)
        if until(status):
            return status
        assert time.monotonic() < deadline, status


def idle(status: dict[str, Any]) -> bool:
    """Every worker up and holding no session, the scheduler holding none."""
    return status["sessions"] == 0 and all(
        w["health"] == "up" and w["reported_sessions"] == 0 and w["sessions"] == 0
        for w in status["workers"]
    )


def test_cluster_discovery_load_faults_and_recovery(topology: Topology) -> None:
    topo = topology
    procs: list[Proc] = []
    try:
        # Workers 0 and 1 start together; worker 2 then claims worker 0's zeroconf name
        # (same host name, same port) and must be renamed, not fail.
        w0, a0 = start_worker(topo, 0)
        w1, a1 = start_worker(topo, 1, port=8195)
        procs += [w0, w1]
        w0.wait_for("Announced", timeout=LIVENESS)
        w1.wait_for("Announced", timeout=LIVENESS)
        w2, a2 = start_worker(topo, 2)
        procs.append(w2)
        w2.wait_for("Announced", timeout=LIVENESS)
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
        for address in workers:
            wait_line(sched, rf"Worker {re.escape(address)} is up", 0)
        status = status_json(saddr, netns=sched_host)
        assert status["kind"] == "scheduler"
        seen = {w["address"]: w for w in status["workers"]}
        assert sorted(seen) == sorted(workers)
        assert all(w["health"] == "up" and w["backend"] == "noop" for w in seen.values())
        assert len({w["name"] for w in seen.values()}) == 3

        # Classifications over 50 sessions, 16 at a time, until the test says stop; each
        # fault lands in the middle of the load, and the load must go on succeeding.
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
                "--concurrency",
                "16",
                "--rate",
                "400",
            ],
            netns=sched_host,
        )
        procs.append(driver)
        keeps_succeeding(driver)
        mark = len(sched.lines)
        w0.kill()  # kill -9
        wait_line(sched, rf"Worker {re.escape(a0)} is down", mark)
        keeps_succeeding(driver)
        mark = len(sched.lines)
        topo.cut(1)
        wait_line(sched, rf"Worker {re.escape(a1)} is down", mark)
        keeps_succeeding(driver)
        mark = len(sched.lines)
        w0, _ = start_worker(topo, 0)
        procs.append(w0)
        wait_line(sched, rf"Worker {re.escape(a0)} (is up|restarted)", mark)
        mark = len(sched.lines)
        topo.mend(1)
        wait_line(sched, rf"Worker {re.escape(a1)} is up", mark)
        least_ok = keeps_succeeding(driver)
        driver.signal(signal.SIGUSR1)
        assert driver.process.wait(LIVENESS) == 0, driver.text()
        driver.stop()
        results = json.loads(driver.stdout[-1])
        failed = sum(results["codes"].values())
        # Every call either succeeded or failed with the documented status.
        assert results["ok"] >= least_ok, results
        assert results["ok"] + failed == results["sent"], results
        assert set(results["codes"]) <= {"14"}, results
        assert results["wrong_tag"] == 0, results
        assert results["transport"] == 0, results
        # Only calls in flight on a lost worker fail (at most 16 at a time); sessions moved on.
        assert failed <= 100, results
        for message in results["messages"]:
            assert re.match(
                r"14: worker tcp://\S+ was lost during ImageClassification of session \d+", message
            ), message
        assert results["destroyed"] == 50, results

        # No orphans: the scheduler has no sessions, and neither has any worker (the
        # sessions left on the worker whose cable was cut are destroyed now it is back).
        cluster_status(saddr, sched_host, idle)
        # Routing recovered: on an idle cluster new sessions spread over all three.
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
        assert again.process.wait(LIVENESS) == 0, again.text()
        again.stop()
        second = json.loads(again.stdout[-1])
        assert second["ok"] == 60, second
        created = re.findall(r"Created session \d+ on (\S+)", "\n".join(sched.lines[mark:]))
        assert Counter(created) == {a0: 2, a1: 2, a2: 2}, (
            created,
            status_json(saddr, netns=sched_host),
        )
        cluster_status(saddr, sched_host, idle)
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
    finally:
        # Nothing to wait for: the worker decides before its ready line, and a graceful
        # shutdown waits for an announcement under way (it would log "Announced", then
        # withdraw it, or log that announcing failed).
        code = proc.stop(timeout=LIVENESS)
    assert code == 0, proc.text()
    assert "Shutting down" in proc.text()
    assert "zeroconf" not in proc.text()
    assert "Announced" not in proc.text()
