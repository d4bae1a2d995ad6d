"""``vaccelray status --watch``: in place on a terminal, printed again when piped."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys

import pytest

from tests.processes import REPO, Proc, child_env, interruptible_argv
from tests.waiting import LIVENESS
from vaccelray.errors import ConnectError
from vaccelray.protocol.info import WorkerInfo
from vaccelray.status import frame

CLEAR = "\x1b[H\x1b[J"


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vaccelray", "status", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=LIVENESS,
        check=False,
    )


def test_piped_watch_prints_each_refresh(worker_process: Proc) -> None:
    done = status("-a", worker_process.address, "--watch", "--count", "2", "--interval", "0.1")
    assert done.returncode == 0, done.stderr
    frames = done.stdout.split("\n\n")
    assert frames[-1] == ""
    assert len(frames) == 3  # two refreshes, each ended by a blank line
    for text in frames[:2]:
        stamp, first, *_ = text.splitlines()
        assert re.fullmatch(r"# \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp)
        assert first.startswith(f"worker {worker_process.address} (vaccelray ")
    assert CLEAR not in done.stdout


def test_piped_json_watch_is_one_object_per_line(worker_process: Proc) -> None:
    done = status("-a", worker_process.address, "-w", "--json", "--count", "3", "--interval", "0.1")
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["kind"] for o in objects] == ["worker"] * 3
    assert {o["addresses"][0] for o in objects} == {worker_process.address}


def test_a_watch_outlives_an_address_that_does_not_answer() -> None:
    dead = "tcp://127.0.0.1:1"
    done = status("-a", dead, "--watch", "--json", "--count", "2", "--interval", "0.1")
    assert done.returncode == 0
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(objects) == 2
    assert all(o["address"] == dead and "127.0.0.1:1" in o["error"] for o in objects)


def test_a_terminal_is_redrawn_in_place(worker_process: Proc) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vaccelray",
                "status",
                "-a",
                worker_process.address,
                "--watch",
                "--count",
                "2",
                "--interval",
                "0.1",
            ],
            stdout=slave,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            cwd=REPO,
        )
        os.close(slave)
        slave = -1
        screen = b""
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            screen += data
        assert proc.wait(LIVENESS) == 0
        assert proc.stderr is not None
        proc.stderr.close()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = screen.decode()
    assert text.count(CLEAR) == 2
    assert f"{worker_process.address} every 0.1 s  " in text
    assert text.count(f"worker {worker_process.address} (vaccelray ") == 2


def test_ctrl_c_ends_a_watch_cleanly(worker_process: Proc) -> None:
    proc = Proc(interruptible_argv("status", "-a", worker_process.address, "--watch"))
    try:
        proc.wait_for(r"^worker ", stream="stdout")
        proc.signal(signal.SIGINT)
        assert proc.process.wait(LIVENESS) == 0
    finally:
        proc.stop()
    assert not [line for line in proc.lines if "Traceback" in line]


INFO = WorkerInfo(
    version="1",
    instance="i",
    backend="noop",
    ops=("classify",),
    capacity=2,
    inflight=0,
    sessions=1,
    connections=1,
    uptime=3.0,
    addresses=("tcp://h:1",),
)


@pytest.mark.parametrize("tty", [True, False])
def test_an_error_frame(tty: bool) -> None:
    text = frame(ConnectError("cannot connect"), address="a", interval=2, as_json=False, tty=tty)
    assert text.endswith("vaccelray: cannot connect" + ("" if tty else "\n"))
    assert text.startswith(CLEAR if tty else "# ")
    assert text.startswith(f"{CLEAR}a every 2 s  ") == tty


def test_a_json_frame_is_the_status_itself() -> None:
    text = frame(INFO, address="a", interval=2, as_json=True, tty=True)
    assert json.loads(text)["kind"] == "worker"
    assert CLEAR not in text
