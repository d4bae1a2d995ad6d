"""Scheduler throughput: through the scheduler vs straight to a worker, and scale-out.

Every worker and the scheduler is its own process (``python -m ...``) on
loopback; the load generator runs here with N calls in flight, each loop on
its own vAccel session. The worker backend is ``sleepy``: a blocking
``time.sleep`` per classification (see ``vaccelray/worker/sleepy.py``).

1. One worker, 5 ms per call, 8 in flight: direct vs through the scheduler
   (target: scheduler >= 0.6x direct). Also with the ``noop`` backend, where
   the scheduler's own overhead is all there is to measure.
2. Scale-out: workers that run one call at a time (``--slots 1``, one
   accelerator queue each), 5 ms per call, 8 in flight through the scheduler:
   3 workers vs 1 (target: >= 2.5x).

    python bench/bench_scheduler.py [--duration 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import (  # noqa: E402
    Proc,
    scheduler_argv,
    sleepy_argv,
    start_daemon,
    start_daemons,
    worker_argv,
)
from vaccelray.agent_client import AgentClient  # noqa: E402
from vaccelray.transport.client import connect  # noqa: E402


async def drive(address: str, in_flight: int, duration: float) -> float:
    """Classifications per second with *in_flight* loops, one session each."""
    async with connect(address) as client:
        agent = AgentClient(client)
        sessions = [await agent.create_session() for _ in range(in_flight)]
        image = b"\0" * 256
        for session in sessions:  # warm up every path
            await agent.classify(session, image)
        done = 0
        stop_at = time.monotonic() + duration

        async def loop(session: int) -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                await agent.classify(session, image)
                done += 1

        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(loop, session)
        elapsed = time.monotonic() - t0
        for session in sessions:
            await agent.destroy_session(session)
    return done / elapsed


def measure(address: str, in_flight: int, duration: float) -> float:
    return anyio.run(drive, address, in_flight, duration, backend="asyncio")


def with_scheduler(workers: list[str]) -> tuple[Proc, str]:
    args = ["-a", "tcp://127.0.0.1:0", "--no-discover", "--log-level", "info"]
    for worker in workers:
        args += ["--worker", worker]
    proc, address = start_daemon(scheduler_argv(*args))
    return proc, address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n, d = args.in_flight, args.duration
    figures: dict[str, float] = {}
    procs: list[Proc] = []
    try:
        # 1. direct vs scheduler, one worker.
        for label, argv in (
            ("sleepy5ms", sleepy_argv("--delay", "0.005", "--log-level", "info")),
            (
                "noop",
                worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", "info"),
            ),
        ):
            [(worker, address)] = start_daemons([argv])
            sched, saddr = with_scheduler([address])
            procs += [worker, sched]
            figures[f"{label}_direct"] = measure(address, n, d)
            figures[f"{label}_scheduler"] = measure(saddr, n, d)
            sched.stop()
            worker.stop()
        # 2. scale-out: one call at a time per worker.
        one_at_a_time = sleepy_argv("--delay", "0.005", "--slots", "1", "--log-level", "info")
        workers = start_daemons([one_at_a_time] * 3)
        procs += [p for p, _ in workers]
        addresses = [a for _, a in workers]
        for count in (1, 3):
            sched, saddr = with_scheduler(addresses[:count])
            procs.append(sched)
            figures[f"scaleout_{count}_workers"] = measure(saddr, n, d)
            sched.stop()
    finally:
        for proc in procs:
            proc.stop()

    ratios = {
        "scheduler_vs_direct_sleepy5ms": figures["sleepy5ms_scheduler"]
        / figures["sleepy5ms_direct"],
        "scheduler_vs_direct_noop": figures["noop_scheduler"] / figures["noop_direct"],
        "scaleout_3_vs_1": figures["scaleout_3_workers"] / figures["scaleout_1_workers"],
    }
    targets = {"scheduler_vs_direct_sleepy5ms": 0.6, "scaleout_3_vs_1": 2.5}
    if args.json:
        print(json.dumps({"in_flight": n, "duration": d, "calls_per_s": figures, "ratios": ratios}))
        return
    print(f"classify calls/s, {n} in flight, {d:g} s each")
    for name, value in figures.items():
        print(f"  {name:28s} {value:9.0f}")
    for name, value in ratios.items():
        target = targets.get(name)
        verdict = (
            ""
            if target is None
            else (f"  (target >= {target}: " + ("ok)" if value >= target else "MISSED)"))
        )
        print(f"  {name:28s} {value:9.2f}x{verdict}")


if __name__ == "__main__":
    main()
