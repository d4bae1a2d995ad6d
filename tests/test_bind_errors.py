"""Listening where one cannot: no file is lost, and the daemon says why in one line.

A unix socket path may hold a regular file (a typo in ``-a``): it is never
removed. A stale socket file (no server accepts on it) is replaced; a live one
is "in use". Every bind error of a daemon, worker or scheduler, is one stderr
line naming the address, with a nonzero exit and no traceback.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.processes import Proc, scheduler_argv, start_daemon, worker_argv
from vaccelray.agent_client import AgentClient
from vaccelray.cli import EXIT_FAILED
from vaccelray.scheduler.daemon import SchedulerConfig, run_scheduler
from vaccelray.transport import connect
from vaccelray.transport.endpoints import ListenError, UnixEndpoint, bind
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.noop import NoopBackend

#: A line of the daemons' log format (see ``vaccelray.cli._setup_logging``).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")

DAEMONS: dict[str, Callable[[str], list[str]]] = {
    "worker": lambda address: worker_argv(
        "-a", address, "--backend", "noop", "--pool-size", "0", "--no-announce"
    ),
    "scheduler": lambda address: scheduler_argv("-a", address, "--no-discover"),
}


def fails_to_start(argv: list[str]) -> str:
    """Run a daemon expected not to start; its one error line (checked: no traceback)."""
    proc = Proc(argv)
    try:
        first = proc.wait_for(r"^vaccelray: |Listening on ", timeout=60)
        assert not first.group(0).startswith("Listening"), f"it started:\n{proc.text()}"
        code = proc.process.wait(60)
    finally:
        proc.stop()
    assert code == EXIT_FAILED, proc.text()
    assert "Traceback" not in proc.text()
    assert "ExceptionGroup" not in proc.text()
    errors = [line for line in proc.lines if not LOG_LINE.match(line)]
    assert len(errors) == 1, proc.text()
    return errors[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback TCP port a socket of this test listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- the daemons, as real processes --------------------------------------------------


@pytest.mark.parametrize("daemon", DAEMONS)
def test_a_regular_file_at_the_socket_path_is_kept(daemon: str, tmp_path: Path) -> None:
    precious = tmp_path / "precious.db"
    content = os.urandom(4096)
    precious.write_bytes(content)
    address = f"unix://{precious}"
    line = fails_to_start(DAEMONS[daemon](address))
    assert precious.read_bytes() == content
    assert line == (
        f"vaccelray: cannot listen on {address}: it exists and is not a socket; "
        "remove it or choose another path"
    )


@pytest.mark.parametrize("daemon", DAEMONS)
def test_a_port_in_use_is_one_line_naming_the_address(daemon: str, busy_port: int) -> None:
    address = f"tcp://127.0.0.1:{busy_port}"
    line = fails_to_start(DAEMONS[daemon](address))
    assert line == f"vaccelray: cannot listen on {address}: Address already in use"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_a_missing_socket_directory_is_one_line_naming_it(daemon: str, tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/gone/d.sock"
    line = fails_to_start(DAEMONS[daemon](address))
    assert line == f"vaccelray: cannot listen on {address}: no directory {tmp_path}/gone"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_a_live_unix_socket_is_in_use_not_taken(daemon: str, tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        line = fails_to_start(DAEMONS[daemon](f"unix://{path}"))
        assert line.startswith(f"vaccelray: cannot listen on unix://{path}: Address already in use")
        # the socket is still the one this test listens on
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            accepted, _ = live.accept()
            accepted.close()


@pytest.mark.anyio
async def test_a_stale_socket_file_is_replaced_and_the_worker_serves(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # closed without unlinking: what a killed server leaves
    assert path.is_socket()
    proc, address = start_daemon(DAEMONS["worker"](f"unix://{path}"))
    try:
        assert address == f"unix://{path}"
        async with connect(address) as client:
            assert await AgentClient(client).create_session() == 1
    finally:
        proc.stop()


# -- the library: bind() and the daemons' context managers ---------------------------


def _regular_file(path: Path) -> None:
    path.write_bytes(b"data")


def _directory(path: Path) -> None:
    path.mkdir()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink_to_a_socket(path: Path) -> None:
    target = path.with_name("target.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(target))
    path.symlink_to(target)


@pytest.mark.parametrize("make", [_regular_file, _directory, _fifo, _symlink_to_a_socket])
def test_bind_removes_nothing_that_is_not_a_socket(
    make: Callable[[Path], None], tmp_path: Path
) -> None:
    path = tmp_path / "here"
    make(path)
    before = os.lstat(path)
    with pytest.raises(ListenError, match="exists and is not a socket") as info:
        bind(UnixEndpoint(str(path)))
    assert str(info.value).startswith(f"cannot listen on unix://{path}: ")
    assert isinstance(info.value, OSError)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_bind_does_not_wait_on_a_live_socket_with_a_full_backlog(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as live, socket.socket(socket.AF_UNIX) as queued:
        live.bind(path)
        live.listen(0)
        queued.connect(path)  # never accepted: the backlog is full now
        with pytest.raises(ListenError, match="Address already in use"):
            bind(UnixEndpoint(path))
        assert os.path.exists(path)


@pytest.mark.anyio
async def test_run_scheduler_raises_a_bind_error_bare(busy_port: int) -> None:
    config = SchedulerConfig(addresses=(f"tcp://127.0.0.1:{busy_port}",))
    with pytest.raises(ListenError, match=f"tcp://127.0.0.1:{busy_port}: Address already in use"):
        async with run_scheduler(config):
            pass


@pytest.mark.anyio
async def test_run_worker_raises_a_bind_error_bare(busy_port: int) -> None:
    config = WorkerConfig(addresses=(f"tcp://127.0.0.1:{busy_port}",), pool_size=0)
    with pytest.raises(ListenError, match=f"tcp://127.0.0.1:{busy_port}: Address already in use"):
        async with run_worker(config, backend=NoopBackend()):
            pass
