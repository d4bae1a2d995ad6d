"""A request id follows a call across hops: client -> scheduler -> worker.

It comes from the client's metadata (``vaccelray-request-id``) or is made
by the first hop; it shows in JSON log lines, in debug lines and in the
message of an unexpected failure, and never changes the agent-style text.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from tests.processes import REPO, Proc, child_env, scheduler_argv, worker_argv
from tests.waiting import LIVENESS
from vaccelray import logs
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol.request_id import REQUEST_ID_KEY
from vaccelray.transport.client import connect
from vaccelray.transport.server import CallContext, Method, Service, serve

READY_JSON = r'"message":\s*"Listening on ([^"\s]+)"'


def start_json(argv: list[str]) -> Proc:
    proc = Proc(argv)
    try:
        proc.address = proc.wait_for(READY_JSON, timeout=LIVENESS).group(1)
    except AssertionError:
        proc.stop()
        raise
    return proc


def json_lines(proc: Proc) -> list[dict[str, str]]:
    return [json.loads(line) for line in proc.lines if line.startswith("{")]


@pytest.fixture
def worker_json() -> Iterator[Proc]:
    proc = start_json(
        worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-format", "json")
    )
    yield proc
    proc.stop()


async def classify_once(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    async with connect(address) as client:
        agent = AgentClient(client, metadata=metadata)
        session = await agent.create_session()
        await agent.classify(session, b"image")
        await agent.destroy_session(session)


@pytest.mark.anyio
async def test_the_clients_request_id_reaches_the_workers_json_lines(worker_json: Proc) -> None:
    await classify_once(worker_json.address, ((REQUEST_ID_KEY, "trace-1"),))
    worker_json.wait_for(r'"Destroyed session 1"')
    by_message = {b["message"]: b for b in json_lines(worker_json)}
    line = by_message["session:1 Image classification"]
    assert line["request_id"] == "trace-1"
    assert line["level"] == "info"
    assert line["logger"] == "vaccelray.agent"
    noop = by_message["[noop] Calling Image classification for session 1: len_img 5"]
    assert noop["request_id"] == "trace-1"  # the backend's line, from the same call
    assert by_message["Created session 1"]["request_id"] == "trace-1"
    assert "request_id" not in by_message[f"Listening on {worker_json.address}"]


@pytest.mark.anyio
async def test_a_request_id_set_by_the_caller_is_sent(worker_json: Proc) -> None:
    token = logs.request_id_var.set("from-context")
    try:
        await classify_once(worker_json.address)
    finally:
        logs.request_id_var.reset(token)
    worker_json.wait_for(r'"Destroyed session 1"')
    ids = {b["request_id"] for b in json_lines(worker_json) if "session" in b["message"]}
    assert ids == {"from-context"}


@pytest.mark.anyio
async def test_each_call_without_one_gets_its_own(worker_json: Proc) -> None:
    await classify_once(worker_json.address, ((REQUEST_ID_KEY, "bad id with spaces"),))
    worker_json.wait_for(r'"Destroyed session 1"')
    lines = [b for b in json_lines(worker_json) if "session" in b["message"]]
    ids = [b["request_id"] for b in lines]
    # create, classify (the agent's line and the backend's), destroy: three calls
    assert len(ids) == 4
    assert ids[1] == ids[2]
    assert len(set(ids)) == 3
    assert "bad id with spaces" not in ids


def test_the_id_crosses_the_scheduler_with_debug_lines(worker_json: Proc) -> None:
    scheduler = start_json(
        scheduler_argv(
            "-a",
            "tcp://127.0.0.1:0",
            "--no-discover",
            "--worker",
            worker_json.address,
            "--log-level",
            "debug",
            "--log-format",
            "json",
        )
    )
    try:
        scheduler.wait_for(r"Worker \S+ is up")
        anyio.run(classify_once, scheduler.address, ((REQUEST_ID_KEY, "hop-7"),))
        worker_json.wait_for(r'"session:\d+ Image classification"')
        scheduler.wait_for(r'"request_id":\s*"hop-7"')
    finally:
        scheduler.stop()
    on_worker = [b for b in json_lines(worker_json) if b.get("request_id") == "hop-7"]
    assert [b["message"] for b in on_worker if "Image" in b["message"]] == [
        "session:1 Image classification",
        "[noop] Calling Image classification for session 1: len_img 5",
    ]
    on_scheduler = [b for b in json_lines(scheduler) if b.get("request_id") == "hop-7"]
    assert any(
        b["level"] == "debug" and b["message"].startswith("Calling ") for b in on_scheduler
    ), on_scheduler


def test_the_clients_debug_lines_name_the_request(worker_json: Proc, tmp_path: Path) -> None:
    """``submit classify --log-level debug``: the id of each call, found again on the worker."""
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"any bytes: the noop backend does not look")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "vaccelray", "submit", "classify"),
            *("-a", worker_json.address, "--log-level", "debug", str(image)),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=LIVENESS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    sent = re.findall(r"DEBUG Calling \S+ on \S+ \[request (\S+)\]", done.stderr)
    assert sent, done.stderr
    worker_json.wait_for(r'"Classify \(top 3\)"')
    classify = [b for b in json_lines(worker_json) if b["message"] == "Classify (top 3)"]
    assert classify[0]["request_id"] in sent


def crash(payload: bytes, ctx: CallContext) -> bytes:
    raise ZeroDivisionError("division by zero")


async def crash_later(payload: bytes, ctx: CallContext) -> bytes:
    raise KeyError("gone")


def crash_future(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    future.set_exception(LookupError("lost"))
    return future


CRASHING = Service(
    "test.Crash",
    {
        "Now": Method(crash, inline=True),
        "Later": Method(crash_later),
        "Future": Method(crash_future, future=True),
    },
)


@pytest.fixture
async def crashing() -> AsyncIterator[str]:
    async with serve([CRASHING], ["tcp://127.0.0.1:0"]) as server:
        yield server.addresses[0]


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["Now", "Later", "Future"])
async def test_an_unexpected_failure_names_the_request(
    crashing: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with connect(crashing) as client:
        with pytest.raises(RPCError) as info:
            await client.call("test.Crash", method, b"", metadata=[(REQUEST_ID_KEY, "oops-3")])
    assert info.value.code == StatusCode.INTERNAL
    assert info.value.message.endswith(" (request oops-3)")
