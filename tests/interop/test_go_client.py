"""containerd's Go ttrpc client against the Python worker (a real subprocess).

The worker is started as ``python -m vaccelray worker`` with the noop
backend; the Go peer's ``client`` subcommand runs scripted checks against it
and prints one JSON object per check, which the tests below assert on.
"""

from __future__ import annotations

import re
import signal
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.model_checks import assert_noop_models
from tests.waiting import LIVENESS

NOOP_TAG = "This is a dummy classification tag!"
NOOP_IMGNAME = "This is a dummy imgname!"
AGENT_SERVICES = (
    "vaccel.VaccelAgent",
    "vaccel.AgentService",
    "vaccel.sync.agent.AgentService",
    "vaccel.asynchronous.agent.AgentService",
)
MAX_MESSAGE = 4 << 20


Results = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def worker(interop: types.SimpleNamespace) -> Iterator[tuple[Any, str]]:
    proc, address = interop.start_python_worker(log_level="info")
    try:
        yield proc, address
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def results(interop: types.SimpleNamespace, worker: tuple[Any, str]) -> Results:
    """Every check of the Go client, run once against the worker, by check name."""
    by_check: Results = {}
    for record in interop.run_go_client(worker[1], "all"):
        by_check.setdefault(record["check"], []).append(record)
    return by_check


def one(results: Results, check: str) -> dict[str, Any]:
    records = results.get(check, [])
    assert len(records) == 1, f"expected one {check!r} record, got {records!r}"
    return records[0]


def test_ready_line_names_a_real_port(worker: tuple[Any, str]) -> None:
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", worker[1])
    assert not worker[1].endswith(":0")


def test_session_lifecycle_under_every_service_name(results: Results) -> None:
    records = {r["service"]: r for r in results["session"]}
    assert sorted(records) == sorted(AGENT_SERVICES)
    ids = set()
    for service, r in records.items():
        assert r["create_code"] == 0, (service, r)
        assert r["session_id"] > 0, (service, r)
        ids.add(r["session_id"])
        assert r["update_code"] == 0, (service, r)
        assert r["classify_code"] == 0, (service, r)
        assert r["tags"] == NOOP_TAG, (service, r)
        assert r["destroy_code"] == 0, (service, r)
        # The destroyed session is gone: NOT_FOUND, as the agent words it.
        assert r["after_destroy_code"] == 5, (service, r)
        assert r["after_destroy_message"] == f"Unknown session {r['session_id']}"
        assert r["destroy_again_code"] == 5, (service, r)
    assert len(ids) == len(AGENT_SERVICES), "session ids must be distinct"


def test_every_model_method_answers_like_the_noop_plugin(results: Results) -> None:
    assert_noop_models(results)


def test_unknown_session_is_not_found(results: Results) -> None:
    r = one(results, "unknown_session")
    assert r["code"] == 5
    assert r["message"] == "Unknown session 987654"


def test_unknown_method_is_unimplemented(results: Results) -> None:
    r = one(results, "unknown_method")
    assert r["code"] == 12
    assert "NoSuchMethod" in r["message"]


def test_unknown_service_is_unimplemented(results: Results) -> None:
    r = one(results, "unknown_service")
    assert r["code"] == 12
    assert "vaccel.NoSuchService" in r["message"]


def test_request_of_exactly_the_limit_is_served(results: Results) -> None:
    r = one(results, "at_limit")
    assert r["body_size"] == MAX_MESSAGE
    assert r["code"] == 0, r
    assert r["tags"] == NOOP_TAG


@pytest.mark.parametrize("check", ["oversized", "oversized_big"])
def test_oversized_request_is_resource_exhausted_and_connection_survives(
    results: Results, check: str
) -> None:
    r = one(results, check)
    assert r["body_size"] > MAX_MESSAGE
    assert r["code"] == 8, r
    assert str(r["body_size"]) in r["message"]
    # The next call on the same connection is answered normally.
    assert r["after_code"] == 0, r
    assert r["after_tags"] == NOOP_TAG


def test_call_with_deadline_and_metadata_is_served(results: Results) -> None:
    r = one(results, "deadline_generous")
    assert r["code"] == 0, r
    assert r["tags"] == NOOP_TAG


def test_connection_survives_calls_the_go_client_gave_up_on(
    results: Results,
) -> None:
    r = one(results, "deadline_local")
    # The Go client's 50 µs contexts expire before a 1 MiB classification
    # comes back; the late answers must not disturb the connection.
    assert r["expired"] >= 1, r
    assert r["after_code"] == 0, r
    assert r["after_tags"] == NOOP_TAG


def test_genop_image_classification(results: Results) -> None:
    r = one(results, "genop_classify")
    assert r["code"] == 0, r
    assert r["write_args"] == [NOOP_TAG, NOOP_IMGNAME]
    assert r["write_sizes"] == [64, 64], "write arguments keep the client's sizes"


def test_genop_with_malformed_operation_is_invalid_argument(
    results: Results,
) -> None:
    r = one(results, "genop_bad_op")
    assert r["code"] == 3, r


def test_many_calls_in_flight_on_one_connection(results: Results) -> None:
    r = one(results, "concurrent")
    assert r["codes"] == {"0": r["calls"]}, r
    assert r["wrong_tags"] == 0


def test_raw_ok_response_frame(results: Results) -> None:
    r = one(results, "raw_ok")
    assert (r["type"], r["stream"], r["flags"], r["code"]) == (2, 1, 0, 0), r
    assert r["payload_len"] > 0  # CreateSessionResponse with a non-zero id


def test_raw_undecodable_request_is_invalid_argument(
    results: Results,
) -> None:
    r = one(results, "raw_bad_body")
    assert (r["type"], r["stream"], r["code"]) == (2, 3, 3), r
    assert r["status_present"] is True
    assert (r["after_stream"], r["after_code"]) == (5, 0), r


def test_raw_pipelined_requests_each_answered(results: Results) -> None:
    r = one(results, "raw_pipelined")
    assert r["codes_by_stream"] == {"7": 0, "9": 12}, r


def test_raw_request_split_across_writes(results: Results) -> None:
    r = one(results, "raw_split")
    assert (r["stream"], r["code"]) == (11, 0), r


def test_raw_timeout_nano_is_accepted(results: Results) -> None:
    r = one(results, "raw_timeout_nano")
    assert (r["stream"], r["code"]) == (13, 0), r


def test_worker_logs_agent_events(results: Results, worker: tuple[Any, str]) -> None:
    proc = worker[0]
    first = results["session"][0]["session_id"]
    wanted = [
        f"Created session {first}",
        f"session:{first} Image classification",
        f"Destroyed session {first}",
    ]
    for w in wanted:
        proc.wait_for(rf"{re.escape(w)}$", timeout=LIVENESS)  # fails naming the line


def test_worker_serves_a_second_client_then_exits_cleanly_on_sigterm(
    interop: types.SimpleNamespace,
) -> None:
    proc, address = interop.start_python_worker(log_level="info")
    try:
        for attempt in range(2):
            records = interop.run_go_client(address, "sessions")
            assert [r["classify_code"] for r in records] == [0, 0, 0, 0], (attempt, records)
        # One SIGTERM only: a graceful exit with status 0.
        proc.process.send_signal(signal.SIGTERM)
        status = proc.process.wait(timeout=LIVENESS)
    finally:
        proc.stop()
    assert status == 0, proc.text()


def test_unix_socket_and_tcp_listeners(interop: types.SimpleNamespace, tmp_path: Path) -> None:
    sock = tmp_path / "worker.sock"
    proc, first = interop.start_python_worker("-a", f"unix://{sock}", log_level="info")
    try:
        second = proc.wait_for(rf"Listening on (?!{re.escape(first)}$)(\S+)").group(1)
        addresses = {first, second}
        assert f"unix://{sock}" in addresses
        for address in addresses:
            records = interop.run_go_client(address, "sessions,unknown")
            sessions = [r for r in records if r["check"] == "session"]
            assert [r["tags"] for r in sessions] == [NOOP_TAG] * 4, address
            codes = {r["check"]: r["code"] for r in records if r["check"] != "session"}
            assert codes == {"unknown_session": 5, "unknown_method": 12, "unknown_service": 12}
    finally:
        proc.stop()
