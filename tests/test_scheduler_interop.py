"""containerd's Go ttrpc client (the interop peer) through the scheduler, unchanged.

The peer's scripted vAccel checks run against ``vaccelray scheduler`` in front
of two noop workers (all real processes, on loopback, no zeroconf): session
life cycle under every service name, genop, unknown session/method/service,
deadlines and concurrency must look exactly as they do against one agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.go_client import by_check, run_go_client
from tests.interop.model_checks import assert_noop_models
from tests.processes import Proc, scheduler_argv, start_daemon, start_daemons, worker_argv

NOOP_TAG = "This is a dummy classification tag!"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def scheduler() -> Iterator[tuple[Proc, list[str], str]]:
    workers = start_daemons(
        [worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0")] * 2
    )
    addresses = [a for _, a in workers]
    args = ["-a", "tcp://127.0.0.1:0", "--no-discover"]
    for address in addresses:
        args += ["--worker", address]
    proc, address = start_daemon(scheduler_argv(*args))
    try:
        for worker in addresses:
            proc.wait_for(f"Worker {worker} is up", timeout=5)
        yield proc, addresses, address
    finally:
        proc.stop()
        for worker_proc, _ in workers:
            worker_proc.stop()


def test_go_vaccel_client_through_the_scheduler(
    go_peer: Path, scheduler: tuple[Proc, list[str], str]
) -> None:
    proc, workers, address = scheduler
    checks = "sessions,genop,unknown,deadlines,concurrent,models"
    results = by_check(run_go_client(go_peer, address, checks))
    assert_noop_models(results)  # model ids rewritten to each worker's, loads recorded

    sessions = results["session"]
    assert len(sessions) == 4
    for r in sessions:
        assert r["create_code"] == 0, r
        assert r["update_code"] == 0, r
        assert r["classify_code"] == 0, r
        assert r["tags"] == NOOP_TAG, r
        assert r["destroy_code"] == 0, r
        assert r["after_destroy_code"] == 5, r
        assert r["after_destroy_message"] == f"Unknown session {r['session_id']}"
        assert r["destroy_again_code"] == 5, r
    assert len({r["session_id"] for r in sessions}) == 4

    [genop] = results["genop_classify"]
    assert genop["code"] == 0, genop
    assert genop["write_args"] == [NOOP_TAG, "This is a dummy imgname!"]
    assert genop["write_sizes"] == [64, 64]
    [bad_op] = results["genop_bad_op"]
    assert bad_op["code"] == 3, bad_op

    unknown = {r["check"]: r for r in results["unknown_session"] + results["unknown_method"]}
    assert unknown["unknown_session"]["code"] == 5
    assert unknown["unknown_session"]["message"] == "Unknown session 987654"
    assert unknown["unknown_method"]["code"] == 12
    [service] = results["unknown_service"]
    assert service["code"] == 12

    [generous] = results["deadline_generous"]
    assert generous["code"] == 0
    assert generous["tags"] == NOOP_TAG
    [local] = results["deadline_local"]
    assert local["after_code"] == 0
    assert local["after_tags"] == NOOP_TAG

    [concurrent] = results["concurrent"]
    assert concurrent["codes"] == {"0": 64}, concurrent
    assert concurrent["wrong_tags"] == 0

    # Sessions went to both workers (least loaded first, ties taking turns).
    # Event lines are written in batches, so wait for them rather than read once.
    for worker in workers:
        proc.wait_for(rf"Created session \d+ on {re.escape(worker)} ")
