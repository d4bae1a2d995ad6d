"""Python worker vs containerd's Go ttrpc server, driven by the same Go client.

Both servers answer vAccel ImageClassification with a noop backend: the Go
interop peer (tests/interop/peer, containerd ttrpc 1.1.1) and
``python -m vaccelray worker --backend noop``. The Go peer's ``bench``
subcommand creates one session, then classifies in a loop from N goroutines
over ONE connection, and reports calls/s, p50 and p99.

    python bench/bench_worker.py [--duration 3] [--rounds 1] [--json FILE] [--check]

Targets (python/go calls/s): >= 1.0 at 1 in flight, >= 0.8 at 8 in flight,
>= 1.0 with a 1 MiB image at 1 in flight. ``--check`` exits 1 when one is missed.
Needs the Go toolchain and Debian's ttrpc packages (see tests/interop/build.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _load_build() -> Any:
    spec = importlib.util.spec_from_file_location(
        "vaccelray_bench_interop_build", REPO / "tests" / "interop" / "build.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    image_size: int
    target: float  # minimum python/go ratio of calls/s


SCENARIOS = (
    Scenario("64 B, 1 in flight", 1, 64, 1.0),
    Scenario("64 B, 8 in flight", 8, 64, 0.8),
    Scenario("1 MiB, 1 in flight", 1, 1 << 20, 1.0),
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_connectable(proc: subprocess.Popen[bytes], port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with status {proc.returncode} before serving")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the worker did not accept connections on port {port} within {timeout} s")


def start_go_server(peer: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(peer), "server", "-addr", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise RuntimeError(f"the Go server printed {line!r} instead of its address")
    return proc, line.split(" ", 1)[1]


def start_python_worker(max_message_size: int) -> tuple[subprocess.Popen[bytes], str]:
    # --log-level warning keeps per-call logging out of the measurement; the
    # ready line is an info line, so the port is chosen here and polled.
    port = _free_port()
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("VACCEL_PLUGINS", "VACCEL_BACKENDS"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "vaccelray", "worker",
            "-a", f"tcp://127.0.0.1:{port}",
            "--backend", "noop",
            "--log-level", "warning",
            "--max-message-size", str(max_message_size),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_connectable(proc, port)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, f"tcp://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def run_bench(peer: Path, address: str, scenario: Scenario, duration: float) -> dict[str, Any]:
    proc = subprocess.run(
        [
            str(peer), "bench", "-addr", address,
            "-concurrency", str(scenario.concurrency),
            "-duration", f"{duration}s",
            "-image-size", str(scenario.image_size),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"Go bench against {address} failed: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    if result["errors"]:
        raise RuntimeError(f"Go bench against {address}: {result['errors']} errors: {result}")
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median calls/s (its own p50/p99 come with it)."""
    ordered = sorted(runs, key=lambda r: r["calls_per_s"])
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per server; the median is kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    build = _load_build()
    try:
        peer = build.build_peer()
    except build.PeerUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2

    max_size = max(4 << 20, max(s.image_size for s in SCENARIOS) + (64 << 10))
    go_proc, go_addr = start_go_server(peer)
    py_proc, py_addr = start_python_worker(max_size)
    rows: list[dict[str, Any]] = []
    try:
        for scenario in SCENARIOS:
            go_runs, py_runs = [], []
            for _ in range(args.rounds):
                # Alternate so neither side always runs on a warmer machine.
                go_runs.append(run_bench(peer, go_addr, scenario, args.duration))
                py_runs.append(run_bench(peer, py_addr, scenario, args.duration))
            go, py = median_run(go_runs), median_run(py_runs)
            ratio = py["calls_per_s"] / go["calls_per_s"] if go["calls_per_s"] else 0.0
            rows.append({
                "scenario": scenario.name,
                "concurrency": scenario.concurrency,
                "image_size": scenario.image_size,
                "go": go,
                "python": py,
                "ratio": ratio,
                "target": scenario.target,
                "met": ratio >= scenario.target,
                "go_all": [r["calls_per_s"] for r in go_runs],
                "python_all": [r["calls_per_s"] for r in py_runs],
            })  # fmt: skip
    finally:
        stop(py_proc)
        stop(go_proc)

    header = (
        f"{'scenario':<20} {'go calls/s':>11} {'go p50':>8} {'go p99':>8} "
        f"{'py calls/s':>11} {'py p50':>8} {'py p99':>8} {'py/go':>6} {'target':>7}"
    )
    print(f"Python worker vs Go ttrpc, same Go client, {args.duration:g} s per run, "
          f"median of {args.rounds}; latencies in µs")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        go, py = row["go"], row["python"]
        mark = "ok" if row["met"] else "MISSED"
        target = f">={row['target']:.1f}"
        print(
            f"{row['scenario']:<20} {go['calls_per_s']:>11,.0f} {go['p50_us']:>8.0f} "
            f"{go['p99_us']:>8.0f} {py['calls_per_s']:>11,.0f} {py['p50_us']:>8.0f} "
            f"{py['p99_us']:>8.0f} {row['ratio']:>6.2f} {target:>7} {mark}"
        )
    if args.rounds > 1:
        spread = {r["scenario"]: (r["go_all"], r["python_all"]) for r in rows}
        for name, (g, p) in spread.items():
            print(f"  {name}: go {statistics.mean(g):,.0f} ± {_sd(g):,.0f}, "
                  f"python {statistics.mean(p):,.0f} ± {_sd(p):,.0f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if args.check and not all(r["met"] for r in rows) else 0


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    sys.exit(main())
