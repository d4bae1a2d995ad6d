"""Helpers for the scheduler tests: child processes and network namespaces.

Processes come from ``tests.processes`` (``Proc`` runs a command, optionally
inside a namespace with ``ip netns exec``). ``Topology`` builds a small LAN: one bridge
namespace and one namespace per host, each host joined to the bridge by a
veth pair and given a 10.x address; it deletes everything on exit. Anything
that speaks zeroconf in the tests runs inside such namespaces only.

``require_netns()`` skips a test without root or ``ip`` (and fails instead
when ``CI`` is set: CI must run them).

Run as ``python -m tests.netns drive ...`` it is the load driver the
namespace test starts next to the scheduler (see ``_drive``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from types import TracebackType
from typing import Any

import pytest

from tests.processes import REPO, child_env


def status_json(address: str, *, netns: str | None = None) -> dict[str, Any]:
    """``vaccelray status --json``, presenting the user's default token (a scheduler's
    daemons in the tests use it, and its status needs it from other addresses too)."""
    from vaccelray.auth import default_token_path

    prefix = ["ip", "netns", "exec", netns] if netns else []
    token = default_token_path()
    token_args = ["--token-file", str(token)] if token.exists() else []
    out = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "vaccelray",
            "status",
            "--json",
            "--address",
            address,
            *token_args,
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=60,  # liveness only
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# -- namespaces ----------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is missing"
    name = f"vrprobe{secrets.token_hex(3)}"
    probe = subprocess.run(
        ["ip", "netns", "add", name], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def require_netns() -> None:
    reason = netns_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the network namespace tests: {reason}")
    pytest.skip(reason)


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Topology:
    """Hosts on one bridge: ``hosts[i]`` is a namespace with ``addresses[i]`` on eth0."""

    def __init__(self, count: int, *, subnet: int | None = None) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = subnet if subnet is not None else 100 + secrets.randbelow(100)
        self.bridge = f"vr{self.tag}br"
        self.hosts = [f"vr{self.tag}h{i}" for i in range(count)]
        self.addresses = [f"10.{self.subnet}.0.{i + 2}" for i in range(count)]
        self._created: list[str] = []

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        ip("netns", "add", self.bridge)
        self._created.append(self.bridge)
        ip("-n", self.bridge, "link", "set", "lo", "up")
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(zip(self.hosts, self.addresses, strict=True)):
            ip("netns", "add", host)
            self._created.append(host)
            ip("-n", host, "link", "set", "lo", "up")
            ip(
                "link",
                "add",
                "eth0",
                "netns",
                host,
                "type",
                "veth",
                "peer",
                "name",
                f"port{i}",
                "netns",
                self.bridge,
            )
            ip("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", host, "link", "set", "eth0", "up")
            ip("-n", host, "route", "add", "224.0.0.0/4", "dev", "eth0")
            ip("-n", self.bridge, "link", "set", f"port{i}", "master", "br0")
            ip("-n", self.bridge, "link", "set", f"port{i}", "up")

    def cut(self, index: int) -> None:
        """Cut host *index*'s cable (at the bridge: the host does not notice)."""
        ip("-n", self.bridge, "link", "set", f"port{index}", "down")

    def mend(self, index: int) -> None:
        ip("-n", self.bridge, "link", "set", f"port{index}", "up")

    def close(self) -> None:
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._created.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- load driver (runs inside a namespace, next to the scheduler) ---------------------


async def _drive(
    address: str, sessions: int, calls: int | None, concurrency: int, rate: float, progress: int
) -> dict[str, Any]:
    """Classify over *sessions* sessions, *calls* times or until SIGUSR1; the results.

    Every *progress* successful calls it prints ``progress ok=N`` on stderr, so
    that a test can wait until calls went on succeeding after a fault it made.
    """
    import anyio
    import anyio.abc

    from vaccelray.agent_client import AgentClient
    from vaccelray.errors import RPCError, TransportError
    from vaccelray.transport.client import connect

    results: dict[str, Any] = {"ok": 0, "wrong_tag": 0, "codes": {}, "messages": [], "transport": 0}
    stop = anyio.Event()

    async def stop_on_signal(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
            task_status.started()
            async for _ in signals:
                stop.set()
                return

    async with connect(address) as client, anyio.create_task_group() as watcher:
        await watcher.start(stop_on_signal)
        # A deadline only so that a call left hanging fails (DEADLINE_EXCEEDED, which the
        # test rejects); a lost worker must end its calls with UNAVAILABLE long before.
        agent = AgentClient(client, timeout=30.0)
        ids = [await agent.create_session() for _ in range(sessions)]
        results["session_ids"] = ids
        sent = 0
        start = time.monotonic()
        limiter = anyio.CapacityLimiter(concurrency)

        async def one(n: int) -> None:
            async with limiter:
                try:
                    tag = await agent.classify(ids[n % sessions], b"image %d" % n)
                except RPCError as exc:
                    key = str(int(exc.code))
                    results["codes"][key] = results["codes"].get(key, 0) + 1
                    if len(results["messages"]) < 20:
                        results["messages"].append(f"{int(exc.code)}: {exc.message}")
                except TransportError:
                    results["transport"] += 1
                else:
                    if tag == "This is a dummy classification tag!":
                        results["ok"] += 1
                        if results["ok"] % progress == 0:
                            print(f"progress ok={results['ok']}", file=sys.stderr, flush=True)
                    else:
                        results["wrong_tag"] += 1

        async with anyio.create_task_group() as tg:
            while (not stop.is_set()) if calls is None else (sent < calls):
                # Pacing the load at *rate* calls a second (a property of the load, not a
                # synchronisation: the test waits on progress lines, never on time).
                delay = start + sent / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, sent)
                sent += 1
        results["sent"] = sent
        results["elapsed"] = time.monotonic() - start
        destroyed = 0
        for session_id in ids:
            try:
                await agent.destroy_session(session_id)
                destroyed += 1
            except RPCError as exc:
                results["messages"].append(f"destroy {session_id}: {exc}")
        results["destroyed"] = destroyed
        watcher.cancel_scope.cancel()
    return results


def main(argv: list[str]) -> None:
    import argparse

    import anyio

    parser = argparse.ArgumentParser(prog="python -m tests.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    drive = sub.add_parser("drive", help="classification load through a scheduler; JSON on stdout")
    drive.add_argument("--address", required=True)
    drive.add_argument("--sessions", type=int, default=50)
    drive.add_argument("--calls", type=int, default=None, help="default: until SIGUSR1")
    drive.add_argument("--concurrency", type=int, default=16)
    drive.add_argument("--rate", type=float, default=300.0, help="calls started per second")
    drive.add_argument("--progress", type=int, default=50, help="successes per progress line")
    args = parser.parse_args(argv)
    results = anyio.run(
        _drive,
        args.address,
        args.sessions,
        args.calls,
        args.concurrency,
        args.rate,
        args.progress,
        backend="asyncio",
    )
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
