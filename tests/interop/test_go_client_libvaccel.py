"""containerd's Go ttrpc client against workers on each libvaccel generation (C doubles).

The worker runs ``--backend <plugin double> --libvaccel <library double>``;
the Go peer's ``models`` check plays a vAccel application using TensorFlow,
TFLite and PyTorch, directly and through ``vaccelray scheduler``. Each op the
generation has answers as vAccel's noop plugin would; the others are
UNIMPLEMENTED naming the op and the backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cdouble import libvaccel_worker
from tests.interop.go_client import by_check, run_go_client
from tests.interop.model_checks import LIBVACCEL_FRAMEWORKS, assert_libvaccel_models
from tests.processes import scheduler_argv, start_daemon


def models(peer: Path, address: str) -> dict[str, list[dict[str, Any]]]:
    return by_check(run_go_client(peer, address, "models"))


@pytest.mark.parametrize("generation", list(LIBVACCEL_FRAMEWORKS))
def test_go_client_model_methods_on_a_libvaccel_worker(
    go_peer: Path, generation: str, tmp_path: Path
) -> None:
    worker = libvaccel_worker(generation, tmp_path)
    try:
        assert_libvaccel_models(models(go_peer, worker.address), generation)
    finally:
        worker.stop()
    assert "BADARG" not in (tmp_path / "calls.log").read_text()


@pytest.mark.parametrize("generation", ["0.5", "current"])
def test_go_client_model_methods_through_the_scheduler_on_libvaccel(
    go_peer: Path, generation: str, tmp_path: Path
) -> None:
    worker = libvaccel_worker(generation, tmp_path)
    try:
        sched, address = start_daemon(
            scheduler_argv("-a", "tcp://127.0.0.1:0", "--no-discover", "--worker", worker.address)
        )
        try:
            sched.wait_for(f"Worker {worker.address} is up", timeout=30)
            assert_libvaccel_models(models(go_peer, address), generation)
        finally:
            sched.stop()
    finally:
        worker.stop()
    assert "BADARG" not in (tmp_path / "calls.log").read_text()
