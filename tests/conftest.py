from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.interop.build import PeerUnavailable, build_peer
from tests.processes import Proc, start_daemon, worker_argv

pytest_plugins = ["tests.leaks"]

# Hypothesis's per-example deadline measures the machine, not the property:
# under a full suite on 2 cores a decoder example can pass 200 ms.
settings.register_profile("vaccelray", deadline=None)
settings.load_profile("vaccelray")

# Daemons started without a token make the user's default one in $XDG_RUNTIME_DIR
# (vaccelray.auth): the tests' daemons and clients share one of their own, not the user's.
_RUNTIME = tempfile.TemporaryDirectory(prefix="vaccelray-test-runtime-")
os.environ["XDG_RUNTIME_DIR"] = _RUNTIME.name

# A client of this process sends its calls by the worker, so that what a test sees of the
# worker's task path (its pool, its logs, its cancels) does not depend on whether a
# thread's leased pool process has started yet: tests/test_direct.py leases them. The
# processes the tests start (examples, CLI commands) lease as users' programs do.
os.environ["VACCELRAY_DIRECT"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    # mutmut's stats phase (MUTANT_UNDER_TEST=stats) records which tests reach which
    # functions, in this process. Processes the tests start inherit the variable and would
    # record too, loading mutmut's config from their cwd: outside the checkout (a test's
    # tmp_path) that raises, and the run stops. Their hits were lost anyway; this process
    # keeps recording (mutmut also keeps the phase in-process for tests that scrub the
    # environment). Every other phase sets the variable afresh.
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        del os.environ["MUTANT_UNDER_TEST"]


@pytest.fixture
def anyio_backend() -> str:
    # The transport is built on asyncio protocols (and zeroconf needs asyncio).
    return "asyncio"


def start_worker(*args: str, env: dict[str, str] | None = None) -> Proc:
    """``python -m vaccelray worker ARGS`` as a real process once it serves (see ``.address``)."""
    return start_daemon(worker_argv(*args), env=env)[0]


@pytest.fixture
def worker_process() -> Iterator[Proc]:
    """A noop worker process on a free loopback port."""
    proc = start_worker("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", "info")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def go_peer(request: pytest.FixtureRequest) -> Path:
    """Path of the Go ttrpc peer (tests/interop/peer), built once and cached by source hash."""
    try:
        cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
        return build_peer(cache.mkdir("go-peer") if cache is not None else None)
    except PeerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the interop tests: {exc}")
        pytest.skip(str(exc))
