"""A headless Chromium driven over the DevTools protocol (for the dashboard's tests).

The system ``chromium`` (tests/install-system-deps.sh) runs with a private
profile in a temporary directory and its DevTools port on loopback; one page
is driven through its websocket: navigate, evaluate, screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect

from tests.httpget import http_get
from tests.processes import Proc

__all__ = ["Page", "chromium", "have_chromium"]


def have_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one DevTools command; its result (events in between are skipped)."""
        call_id = next(self.ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self) -> bytes:
        result = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])


@asynccontextmanager
async def chromium(width: int = 1000, height: int = 800) -> AsyncIterator[Page]:
    binary = have_chromium()
    assert binary is not None
    with tempfile.TemporaryDirectory() as profile:
        proc = Proc(
            [
                binary,
                "--headless",
                "--no-sandbox",  # the tests may run as root
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ]
        )
        try:
            found = await anyio.to_thread.run_sync(
                proc.wait_for, r"DevTools listening on ws://([^/]+)/"
            )
            listing = await http_get(f"http://{found.group(1)}/json/list")
            [target] = [t for t in json.loads(listing.body) if t["type"] == "page"]
            async with connect(target["webSocketDebuggerUrl"], max_size=64 << 20) as ws:
                yield Page(ws)
        finally:
            proc.stop()
