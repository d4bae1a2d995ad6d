"""Fixtures for the Go interop tests: a Go server, a Python worker, the Go client.

The Go peer (fixture ``go_peer`` in tests/conftest.py) is built from Debian's
containerd ttrpc packages (see build.py).
Without the toolchain the tests are skipped with the apt-get command that
installs it, except in CI (``CI`` set), where a missing toolchain fails.
"""

from __future__ import annotations

import subprocess
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.build import PEER_DIR
from tests.interop.go_client import run_go_client
from tests.processes import Proc, start_daemon, worker_argv


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def start_go_server(peer: Path, address: str = "tcp://127.0.0.1:0") -> tuple[Proc, str]:
    proc = Proc([str(peer), "server", "-addr", address])
    try:
        match = proc.wait_for(r"^LISTENING (\S+)$", stream="stdout")
    except AssertionError:
        proc.stop()
        raise
    return proc, match.group(1)


@pytest.fixture
def go_server_process(go_peer: Path) -> Iterator[tuple[Proc, str]]:
    proc, address = start_go_server(go_peer)
    try:
        yield proc, address
    finally:
        proc.stop()


@pytest.fixture
def go_server(go_server_process: tuple[Proc, str]) -> str:
    """Address of a fresh Go ttrpc server (vaccel.VaccelAgent + interop.Echo)."""
    return go_server_process[1]


def start_python_worker(*extra: str, log_level: str = "info") -> tuple[Proc, str]:
    """``python -m vaccelray worker`` (noop backend) on a free loopback port; (process, address)."""
    return start_daemon(
        worker_argv(
            "-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", log_level, *extra
        )
    )


@pytest.fixture(scope="session")
def interop(go_peer: Path) -> types.SimpleNamespace:
    """The helpers above, for test modules (tests/ is not a package to import from)."""
    return types.SimpleNamespace(
        peer=go_peer,
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

    proto = PEER_DIR / "interop.proto"
    out = tmp_path_factory.mktemp("interop-desc") / "interop.desc"
    subprocess.run(
        ["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", proto.name],
        check=True,
        capture_output=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    classes = message_factory.GetMessages(list(files.file), pool=descriptor_pool.DescriptorPool())
    return types.SimpleNamespace(**{name.rsplit(".", 1)[1]: cls for name, cls in classes.items()})
