"""Fixtures for the Go interop tests: the built peer, a Go server, a Python worker.

The Go peer is built from Debian's containerd ttrpc packages (see build.py).
Without the toolchain the tests are skipped with the apt-get command that
installs it, except in CI (``CI`` set), where a missing toolchain fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def _load_build_module() -> Any:
    # Loaded by path under a unique name: tests/ is not a package and other
    # folders have a build.py of their own.
    name = "vaccelray_tests_interop_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("build.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()
PeerUnavailable = _build.PeerUnavailable
build_peer = _build.build_peer
START_TIMEOUT = 20.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def go_peer(request: pytest.FixtureRequest) -> Path:
    """Path of the Go peer binary (built once, cached by source hash)."""
    try:
        cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
        return build_peer(cache.mkdir("go-peer") if cache is not None else None)
    except PeerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the interop tests: {exc}")
        pytest.skip(str(exc))


class Process:
    """A child process whose output lines are collected by reader threads."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._threads = [
            threading.Thread(
                target=self._pump, args=("stdout", self.proc.stdout, self.stdout), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=("stderr", self.proc.stderr, self.stderr), daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, name: str, stream: Any, sink: list[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            self._lines.put((name, line))

    def wait_for_line(
        self, pattern: str, *, stream: str, timeout: float = START_TIMEOUT
    ) -> re.Match[str]:
        """The first new line of *stream* matching *pattern* (fails after *timeout*)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self._lines.empty()):
                self.stop()
                pytest.fail(
                    f"{self.args[:3]} printed no line matching {pattern!r} on {stream} "
                    f"(exit {self.proc.returncode}); stdout={self.stdout[-20:]!r} "
                    f"stderr (last lines)={self.stderr[-20:]!r}"
                )
            try:
                name, line = self._lines.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            if name == stream and (match := regex.search(line)):
                return match

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for thread in self._threads:
            thread.join(2)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


def start_go_server(peer: Path, address: str = "tcp://127.0.0.1:0") -> tuple[Process, str]:
    proc = Process([str(peer), "server", "-addr", address])
    match = proc.wait_for_line(r"^LISTENING (\S+)$", stream="stdout")
    return proc, match.group(1)


@pytest.fixture
def go_server_process(go_peer: Path) -> Iterator[tuple[Process, str]]:
    proc, address = start_go_server(go_peer)
    try:
        yield proc, address
    finally:
        proc.stop()


@pytest.fixture
def go_server(go_server_process: tuple[Process, str]) -> str:
    """Address of a fresh Go ttrpc server (vaccel.VaccelAgent + interop.Echo)."""
    return go_server_process[1]


def start_python_worker(*extra: str, log_level: str = "info") -> tuple[Process, str]:
    """``python -m vaccelray worker`` on a free loopback port; (process, address)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # The noop backend, whatever the caller's environment selects.
    for name in ("VACCEL_PLUGINS", "VACCEL_BACKENDS"):
        env.pop(name, None)
    proc = Process(
        [
            sys.executable,
            "-m",
            "vaccelray",
            "worker",
            "-a",
            "tcp://127.0.0.1:0",
            "--backend",
            "noop",
            "--log-level",
            log_level,
            *extra,
        ],
        env=env,
    )
    match = proc.wait_for_line(r"Listening on (\S+)", stream="stderr")
    return proc, match.group(1)


def run_go_client(
    peer: Path, address: str, check: str = "all", timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Run ``peer client`` and parse its JSON lines."""
    proc = subprocess.run(
        [str(peer), "client", "-addr", address, "-check", check],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"Go client failed ({proc.returncode}): {proc.stderr}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def interop(go_peer: Path) -> types.SimpleNamespace:
    """The helpers above, for test modules (tests/ is not a package to import from)."""
    return types.SimpleNamespace(
        peer=go_peer,
        Process=Process,
        start_python_worker=start_python_worker,
        start_go_server=lambda address="tcp://127.0.0.1:0": start_go_server(go_peer, address),
        run_go_client=lambda address, check="all", timeout=60.0: run_go_client(
            go_peer, address, check, timeout
        ),
    )


@pytest.fixture(scope="session")
def echo_pb(go_peer: Path, tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """Message classes of the peer's interop.proto, built from protoc's descriptor set.

    No generated Python module is checked in: the .proto the Go peer is built
    from is the single source of the test service's messages.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = Path(_build.PEER_DIR) / "interop.proto"
    out = tmp_path_factory.mktemp("interop-desc") / "interop.desc"
    subprocess.run(
        ["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", proto.name],
        check=True,
        capture_output=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    classes = message_factory.GetMessages(list(files.file), pool=descriptor_pool.DescriptorPool())
    return types.SimpleNamespace(**{name.rsplit(".", 1)[1]: cls for name, cls in classes.items()})
