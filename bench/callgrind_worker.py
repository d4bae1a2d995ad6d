"""Instructions a worker spends per call, counted by callgrind: a figure other load cannot move.

Starts ``vaccelray worker --backend noop`` under ``valgrind --tool=callgrind``
with counting off, warms it up, then counts only while a client (this
process, not counted) makes ``--calls`` ImageClassification calls of a
64-byte image over one connection, ``--inflight`` at a time — the calls
``bench/bench_worker.py`` makes. Every thread of the worker counts (the
log writer's included); the writer is given time to write the lines of the
counted calls before counting stops.

    python bench/bench_worker.py ...            # calls/s against Go (noisy here)
    python bench/callgrind_worker.py --log-level warning --inflight 8
    python bench/callgrind_worker.py --log-level info --inflight 8 --log-file /tmp/x.log
    python bench/callgrind_worker.py --metrics --inflight 8

Prints instructions per call. ``--keep FILE`` keeps callgrind's output for
``callgrind_annotate``. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vaccelray.protocol import NEED_DATA, ClientConnection  # noqa: E402
from vaccelray.protocol._pb import vaccel_pb2 as pb  # noqa: E402

SERVICE = "vaccel.VaccelAgent"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _connect(port: int, proc: subprocess.Popen[Any], timeout: float = 300.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with status {proc.returncode}")
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the worker did not listen in time")


class Driver:
    """One connection; *inflight* calls outstanding at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = ClientConnection()

    def call(self, method: str, payload: bytes) -> bytes:
        self.sock.sendall(self.conn.send_request(SERVICE, method, payload)[1])
        (answer,) = self._answers(1)
        return answer

    def run(self, payload: bytes, calls: int, inflight: int) -> None:
        sent = 0
        while sent < min(inflight, calls):
            self.sock.sendall(self.conn.send_request(SERVICE, "ImageClassification", payload)[1])
            sent += 1
        done = 0
        while done < calls:
            answers = self._answers(1)
            done += len(answers)
            more = min(len(answers), calls - sent)
            if more:
                frames = [
                    self.conn.send_request(SERVICE, "ImageClassification", payload)[1]
                    for _ in range(more)
                ]
                self.sock.sendall(b"".join(frames))
                sent += more

    def _answers(self, at_least: int) -> list[bytes]:
        answers: list[bytes] = []
        while len(answers) < at_least:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the worker closed the connection")
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not NEED_DATA:
                if event.code:  # type: ignore[union-attr]
                    raise RuntimeError(f"call failed: {event}")
                answers.append(event.payload)  # type: ignore[union-attr]
        return answers


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def total_instructions(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="warning", help="the worker's --log-level")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--log-file", type=Path, help="the worker's stderr [default: discarded]")
    parser.add_argument("--metrics", action="store_true", help="start it with --metrics")
    parser.add_argument("--inflight", type=int, default=1, help="calls outstanding at a time")
    parser.add_argument("--calls", type=int, default=3000, help="calls counted")
    parser.add_argument("--warmup", type=int, default=500, help="calls made before counting")
    parser.add_argument("--keep", type=Path, help="keep callgrind's output here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as scratch:
        out = args.keep or Path(scratch) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable, "-m", "vaccelray", "worker",
            "-a", f"tcp://127.0.0.1:{port}", "--backend", "noop", "--pool-size", "0",
            "--no-announce",
            "--log-level", args.log_level, "--log-format", args.log_format,
        ]  # fmt: skip
        if args.metrics:
            command += ["--metrics", "127.0.0.1:0"]
        stderr = args.log_file.open("ab") if args.log_file else subprocess.DEVNULL
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stderr=stderr)
        try:
            with _connect(port, proc) as sock:
                driver = Driver(sock)
                session = pb.CreateSessionResponse.FromString(
                    driver.call("CreateSession", pb.CreateSessionRequest().SerializeToString())
                ).session_id
                payload = pb.ImageClassificationRequest(
                    session_id=session, image=os.urandom(64)
                ).SerializeToString()
                driver.run(payload, args.warmup, args.inflight)
                time.sleep(1.0)  # the warm-up's lines written
                control(proc.pid, "--instr=on")
                driver.run(payload, args.calls, args.inflight)
                time.sleep(1.0)  # the writer thread's batch of these calls' lines
                control(proc.pid, "--dump")
                control(proc.pid, "--instr=off")
        finally:
            proc.terminate()
            proc.wait(120)
            if args.log_file:
                stderr.close()  # type: ignore[union-attr]
        dumps = sorted(out.parent.glob(out.name + "*"))
        dumped = [d for d in dumps if d != out] or dumps
        instructions = sum(total_instructions(d) for d in dumped[:1])
    print(
        f"log level {args.log_level} ({args.log_format}), metrics "
        f"{'on' if args.metrics else 'off'}, {args.inflight} in flight: "
        f"{instructions / args.calls:,.0f} instructions a call ({args.calls} calls)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
