"""The libvaccel test doubles: their build (:mod:`.build`), and a worker process on one."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cdouble import build
from tests.processes import Proc, start_daemon, worker_argv


def libvaccel_worker(generation: str, tmp: Any, **env: str) -> Proc:
    """A worker process on the *generation* double (each worker loads its own).

    Every call the double gets is logged to ``tmp / "calls.log"``; *env* is
    added to the worker's environment (the doubles read VDOUBLE_* settings).
    """
    cc = build.find_cc()
    if cc is None:
        pytest.skip("no C compiler (cc): cannot build the libvaccel test doubles")
    double = build.build_double(generation, tmp / f"double-{generation}", cc)
    argv = worker_argv(
        "-a", "tcp://127.0.0.1:0", "--backend", str(double.plugin),
        "--libvaccel", str(double.libvaccel), "--pool-size", "0",
    )  # fmt: skip
    return start_daemon(argv, env={"VDOUBLE_LOG": str(tmp / "calls.log"), **env})[0]
