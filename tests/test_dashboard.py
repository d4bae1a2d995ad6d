"""The dashboard: its one-time sign-in, its state, and a headless Chromium watching a cluster."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from tests.chromium import chromium, have_chromium
from tests.clusters import serving_scheduler
from tests.httpget import http_get
from tests.processes import scheduler_argv, start_daemon, start_daemons, worker_argv
from tests.waiting import liveness
from vaccelray.agent_client import AgentClient
from vaccelray.dashboard import ObserveConfig, Observed, observed
from vaccelray.dashboard.app import COOKIE
from vaccelray.errors import RPCError
from vaccelray.scheduler import SchedulerConfig
from vaccelray.transport import connect
from vaccelray.worker.daemon import WorkerConfig, run_worker

pytestmark = pytest.mark.anyio

BOARD = ObserveConfig(dashboard="127.0.0.1:0")
#: Set to a file name to keep a screenshot of the browser test's page (the docs' one).
SCREENSHOT_ENV = "VACCELRAY_DASHBOARD_SCREENSHOT"


@pytest.fixture
async def board() -> AsyncIterator[Observed]:
    config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), backend="noop", pool_size=0, grace=1.0)
    async with observed(lambda calls: run_worker(config, metrics=calls), BOARD) as seen:
        yield seen


async def sign_in(seen: Observed) -> str:
    """The cookie header the one-time link sets."""
    assert seen.login_url is not None
    reply = await http_get(seen.login_url)
    assert reply.status == 303
    assert reply.headers["location"] == "/"
    cookie = reply.headers["set-cookie"]
    attributes = [part.strip() for part in cookie.split(";")]
    assert "HttpOnly" in attributes
    assert "SameSite=Strict" in attributes
    return attributes[0]


async def test_the_one_time_link_signs_in_once(board: Observed) -> None:
    assert board.dashboard_url is not None
    assert board.login_url is not None
    # Nothing before signing in; a wrong code does not sign in.
    assert (await http_get(board.dashboard_url + "/")).status == 401
    assert (await http_get(board.dashboard_url + "/state.json")).status == 401
    assert (await http_get(board.dashboard_url + "/login?once=wrong")).status == 403
    assert (await http_get(board.dashboard_url + "/login")).status == 403
    cookie = await sign_in(board)
    name, _, secret = cookie.partition("=")
    assert name == COOKIE
    assert board.login_url.partition("once=")[2] not in cookie  # a fresh secret, not the code
    page = await http_get(board.dashboard_url + "/", {"Cookie": cookie})
    assert page.status == 200
    assert b'<script src="/app.js"' in page.body
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert (await http_get(board.dashboard_url + "/app.js", {"Cookie": cookie})).status == 200
    # The link is spent; another browser (no or a wrong cookie) is refused.
    assert (await http_get(board.login_url)).status == 403
    wrong = f"{COOKIE}={secret[:-1]}x"
    assert (await http_get(board.dashboard_url + "/", {"Cookie": wrong})).status == 401
    assert (await http_get(board.dashboard_url + "/nope", {"Cookie": cookie})).status == 404


async def test_state_shows_the_worker_its_charts_and_failures(board: Observed) -> None:
    assert board.dashboard_url is not None
    assert board.dashboard is not None
    cookie = await sign_in(board)
    address = board.daemon.addresses[0]  # type: ignore[attr-defined]
    async with connect(address) as client:
        agent = AgentClient(client)
        await agent.create_session()
        with pytest.raises(RPCError):
            await agent.classify(12345, b"img")  # no such session
        board.dashboard.history.sample()
        reply = await http_get(board.dashboard_url + "/state.json", {"Cookie": cookie})
    assert reply.status == 200
    state = json.loads(reply.body)
    assert state["kind"] == "worker"
    [row] = state["workers"]
    assert row["address"] == address
    assert row["health"] == "up"
    assert row["backend"] == "noop"
    assert row["sessions"] == 1
    [failure] = state["failures"]
    assert failure["call"] == "vaccel.VaccelAgent/ImageClassification"
    assert failure["status"] == "NOT_FOUND"
    assert "12345" in failure["message"]
    assert state["throughput"].startswith("<svg")
    assert "<polyline" in state["throughput"]
    assert "Latency" in state["latency"]


async def page_shows(shown: Callable[[], Awaitable[object]], expected: object) -> None:
    """Poll the page until it shows *expected* (the page updates itself; nothing announces it)."""
    with liveness(f"the page showing {expected}"):
        while await shown() != expected:  # noqa: ASYNC110
            await anyio.sleep(0.1)  # the pause between two looks, not a synchronisation


@pytest.mark.skipif(not have_chromium(), reason="needs chromium (tests/install-system-deps.sh)")
async def test_a_browser_sees_the_workers_and_a_killed_one_go_down() -> None:
    started = start_daemons(
        [worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0")] * 2
    )
    procs = {address: proc for proc, address in started}
    try:
        config = SchedulerConfig(addresses=("tcp://127.0.0.1:0",), workers=tuple(procs), grace=1.0)
        async with (
            observed(lambda calls: serving_scheduler(config, metrics=calls), BOARD) as seen,
            chromium() as page,
        ):
            assert seen.login_url is not None
            await page.navigate(seen.login_url)
            rows = "[...document.querySelectorAll('#workers tbody tr')]"
            health = f"Object.fromEntries({rows}.map(r => [r.dataset.address, r.dataset.health]))"

            async def shown() -> dict[str, str]:
                try:
                    return await page.evaluate(health) or {}  # type: ignore[no-any-return]
                except AssertionError:  # the page is still loading
                    return {}

            await page_shows(shown, dict.fromkeys(procs, "up"))
            text = await page.evaluate("document.body.innerText")
            for address in procs:
                assert address in text
            killed, alive = list(procs)
            procs[killed].kill()
            await page_shows(shown, {killed: "down", alive: "up"})
            if path := os.environ.get(SCREENSHOT_ENV):
                await anyio.Path(path).write_bytes(await page.screenshot())
    finally:
        for proc, _ in started:
            proc.stop()


async def test_the_daemon_logs_its_links_and_serves_them(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("cli-token\n")
    token.chmod(0o600)
    proc, _ = start_daemon(
        scheduler_argv(
            "-a", "tcp://127.0.0.1:0", "--no-discover", "--token-file", str(token),
            "--metrics", "127.0.0.1:0", "--dashboard", "127.0.0.1:0",
        )
    )  # fmt: skip
    try:
        metrics = await anyio.to_thread.run_sync(proc.wait_for, r"Metrics on (http://\S+/metrics)")
        login = await anyio.to_thread.run_sync(
            proc.wait_for, r"dashboard: (http://[^/]+)(/login\?once=\S+)$"
        )
        reply = await http_get(metrics.group(1), {"Authorization": "Bearer cli-token"})
        assert reply.status == 200
        assert "vaccelray_scheduler_sessions 0.0" in reply.text
        assert (await http_get(metrics.group(1))).status == 401
        base = login.group(1)
        cookie = (await http_get(base + login.group(2))).headers["set-cookie"].split(";")[0]
        state = json.loads((await http_get(base + "/state.json", {"Cookie": cookie})).body)
        assert state["kind"] == "scheduler"
        assert state["workers"] == []
    finally:
        proc.stop()
