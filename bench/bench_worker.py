"""Python worker vs containerd's Go ttrpc server, driven by the same Go client.

Both servers answer vAccel ImageClassification with a noop backend: the Go
interop peer (tests/interop/peer, containerd ttrpc 1.1.1) and
``python -m vaccelray worker --backend noop``. The Go peer's ``bench``
subcommand creates one session, then classifies in a loop from N goroutines
over ONE connection, and reports calls/s, p50 and p99.

Two Python workers run beside the Go server: one at ``--log-level warning``
(no per-call lines) and one at the default level, as a user runs it, with
its stderr going to a file on local disk (``--log-file``, else a temporary
file) — its agent-style lines cost what they cost there. Each round runs
the three servers one after the other, in a rotating order, so none always
gets the warmer machine; the median of the rounds is kept (for info/warn, the
median of each round's own ratio).

    python bench/bench_worker.py [--duration 3] [--rounds 1] [--json FILE] [--check]

Targets (python at warning / go calls/s): >= 1.0 at 1 in flight, >= 0.8 at
8 in flight, >= 1.0 with a 1 MiB image at 1 in flight; the default level
keeps >= 0.95 of the warning level's calls/s. ``--check`` exits 1 when one
is missed. Needs the Go toolchain and Debian's ttrpc packages (see
tests/interop/build.py).
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
import tempfile
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


#: The default level keeps at least this share of the warning level's calls/s.
LOGGING_TARGET = 0.95


def start_python_worker(
    max_message_size: int, log_level: str, stderr: Any = None
) -> tuple[subprocess.Popen[bytes], str]:
    # The port is chosen here and polled: at warning level the ready line is
    # the only info line, and at the default level stderr goes to a file.
    port = _free_port()
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("VACCEL_PLUGINS", "VACCEL_BACKENDS"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "vaccelray", "worker",
            "-a", f"tcp://127.0.0.1:{port}",
            "--backend", "noop", "--no-announce",
            "--log-level", log_level,
            "--max-message-size", str(max_message_size),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=stderr,
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


#: Seconds of calls the Go client makes before it starts counting.
WARMUP = 0.3


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process *pid* has used, all threads (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_bench(
    peer: Path, address: str, scenario: Scenario, duration: float, pid: int | None = None
) -> dict[str, Any]:
    """The Go client's figures; with the server's *pid*, also its CPU µs a call (``cpu_us``).

    The client counts the calls of *duration* only, after its warm-up: the
    server's CPU time over the whole run is shared by the calls of the
    warm-up too, estimated at the measured rate.
    """
    before = cpu_seconds(pid) if pid is not None else 0.0
    proc = subprocess.run(
        [
            str(peer), "bench", "-addr", address,
            "-concurrency", str(scenario.concurrency),
            "-duration", f"{duration}s",
            "-warmup", f"{WARMUP}s",
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
    if pid is not None:
        calls = max(result["calls"], 1) * (duration + WARMUP) / duration
        result["cpu_us"] = (cpu_seconds(pid) - before) / calls * 1e6
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
    parser.add_argument(
        "--log-file",
        type=Path,
        help="where the default-level worker's stderr goes (on local disk)  "
        "[default: a temporary file, removed after]",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        help="run only these (repeatable)  [default: all]",
    )
    args = parser.parse_args(argv)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]

    build = _load_build()
    try:
        peer = build.build_peer()
    except build.PeerUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2

    max_size = max(4 << 20, max(s.image_size for s in SCENARIOS) + (64 << 10))
    with tempfile.TemporaryDirectory() as scratch:
        log_path = args.log_file or Path(scratch) / "worker.log"
        with log_path.open("ab") as log_file:
            rows = _measure(peer, scenarios, args, max_size, log_file)
        logged = sum(1 for _ in log_path.open("rb"))
    _print(rows, args, logged)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    met = all(r["met"] and r["logging_met"] for r in rows)
    return 1 if args.check and not met else 0


def _measure(
    peer: Path, scenarios: list[Scenario], args: argparse.Namespace, max_size: int, log_file: Any
) -> list[dict[str, Any]]:
    go_proc, go_addr = start_go_server(peer)
    procs = [go_proc]
    rows: list[dict[str, Any]] = []
    try:
        quiet_proc, quiet_addr = start_python_worker(max_size, "warning")
        procs.append(quiet_proc)
        info_proc, info_addr = start_python_worker(max_size, "info", stderr=log_file)
        procs.append(info_proc)
        servers = [
            ("go", go_addr, None),
            ("warning", quiet_addr, quiet_proc.pid),
            ("info", info_addr, info_proc.pid),
        ]
        for scenario in scenarios:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in servers}
            for i in range(args.rounds):
                # Rotate so no server always runs on a warmer (or busier) machine.
                for name, address, pid in servers[i % 3 :] + servers[: i % 3]:
                    runs[name].append(run_bench(peer, address, scenario, args.duration, pid))
            go, py, info = (median_run(runs[name]) for name in ("go", "warning", "info"))
            ratio = py["calls_per_s"] / go["calls_per_s"] if go["calls_per_s"] else 0.0
            # Each round runs the two Python workers back to back: the median of the rounds'
            # own ratios, not the ratio of two medians, which other load moves far more.
            kept = statistics.median(
                i["calls_per_s"] / w["calls_per_s"] if w["calls_per_s"] else 0.0
                for w, i in zip(runs["warning"], runs["info"], strict=True)
            )
            # CPU a call: the median of each side's rounds (less moved by other load).
            warn_cpu, info_cpu = (
                statistics.median(r["cpu_us"] for r in runs[name]) for name in ("warning", "info")
            )
            rows.append({
                "scenario": scenario.name,
                "concurrency": scenario.concurrency,
                "image_size": scenario.image_size,
                "go": go,
                "python": py,
                "python_info": info,
                "ratio": ratio,
                "info_ratio": info["calls_per_s"] / go["calls_per_s"] if go["calls_per_s"] else 0.0,
                "logging_kept": kept,
                "warning_cpu_us": warn_cpu,
                "info_cpu_us": info_cpu,
                "logging_kept_cpu": warn_cpu / info_cpu if info_cpu else 0.0,
                "target": scenario.target,
                "met": ratio >= scenario.target,
                "logging_met": kept >= LOGGING_TARGET,
                "go_all": [r["calls_per_s"] for r in runs["go"]],
                "python_all": [r["calls_per_s"] for r in runs["warning"]],
                "python_info_all": [r["calls_per_s"] for r in runs["info"]],
            })  # fmt: skip
    finally:
        for proc in reversed(procs):
            stop(proc)
    return rows


def _print(rows: list[dict[str, Any]], args: argparse.Namespace, logged: int) -> None:
    header = (
        f"{'scenario':<20} {'go calls/s':>11} {'go p50':>7} "
        f"{'warn calls/s':>12} {'p50':>5} {'info calls/s':>12} {'p50':>5} "
        f"{'warn/go':>7} {'info/go':>7} {'info/warn':>9}"
    )
    print(f"Python worker (--log-level warning, and info with stderr to a file) vs Go ttrpc, "
          f"same Go client, {args.duration:g} s per run, median of {args.rounds}; "
          f"latencies in µs; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        go, py, info = row["go"], row["python"], row["python_info"]
        marks = []
        if not row["met"]:
            marks.append(f"warn/go MISSED >={row['target']:.2f}")
        if not row["logging_met"]:
            marks.append(f"info/warn MISSED >={LOGGING_TARGET}")
        print(
            f"{row['scenario']:<20} {go['calls_per_s']:>11,.0f} {go['p50_us']:>7.0f} "
            f"{py['calls_per_s']:>12,.0f} {py['p50_us']:>5.0f} "
            f"{info['calls_per_s']:>12,.0f} {info['p50_us']:>5.0f} "
            f"{row['ratio']:>7.2f} {row['info_ratio']:>7.2f} {row['logging_kept']:>9.2f} "
            f"{'; '.join(marks) or 'ok'}"
        )
    print(f"(the info-level worker wrote {logged:,} log lines)")
    print("worker CPU µs a call (median of the rounds; utime + stime of every thread):")
    for row in rows:
        print(
            f"  {row['scenario']}: warning {row['warning_cpu_us']:.1f}, "
            f"info {row['info_cpu_us']:.1f}: info keeps {row['logging_kept_cpu']:.3f} "
            "of the warning level's calls per CPU second"
        )
    if args.rounds > 1:
        for r in rows:
            g, p, i = r["go_all"], r["python_all"], r["python_info_all"]
            print(f"  {r['scenario']}: go {statistics.mean(g):,.0f} ± {_sd(g):,.0f}, "
                  f"warning {statistics.mean(p):,.0f} ± {_sd(p):,.0f}, "
                  f"info {statistics.mean(i):,.0f} ± {_sd(i):,.0f}")  # fmt: skip


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    sys.exit(main())
