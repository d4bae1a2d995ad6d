"""Discovery under an announcement flood (issue #13): a real client's p99, quiet and flooded.

Everything runs in network namespaces (``tests/netns.py``, needs root): host 0
runs a real noop worker (announced with zeroconf), host 1 is the attacker
with 20 more addresses on the link, host 2 runs the scheduler
(``--interface``) and the client.

1. ``quiet``: the client makes ``--calls`` Classify calls through the
   scheduler, one at a time on one session; p50 / p99.
2. ``flood``: the attacker announces ``--fakes`` (2,000) fake workers, each at
   an on-link address where nothing listens, from its 20 addresses, round
   after round every 50 ms (``--rounds N``: N rounds only), while the client
   makes as many calls again. p50 / p99, the
   packets sent, the workers the scheduler keeps (``--max-discovered``
   caps them), its open file descriptors and what its log says it ignored.

    sudo python bench/bench_discovery.py [--calls 2000] [--fakes 2000] [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netns import Topology, ip, netns_unavailable, status_json
from tests.processes import REPO, Proc, child_env, scheduler_argv, start_daemon, worker_argv

LIVENESS = 120.0


async def _client(address: str, calls: int) -> dict[str, float]:
    from vaccelray.agent_client import AgentClient
    from vaccelray.transport.client import connect

    latencies = []
    async with connect(address) as client:
        agent = AgentClient(client, timeout=30.0)
        session = await agent.create_session()
        for n in range(calls):
            start = time.perf_counter()
            await agent.classify(session, b"image %d" % n)
            latencies.append(time.perf_counter() - start)
        await agent.destroy_session(session)
    latencies.sort()
    return {
        "calls": calls,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "max_ms": 1000 * latencies[-1],
    }


def client_in(netns: str, address: str, calls: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            sys.executable,
            __file__,
            "client",
            "--address",
            address,
            "--calls",
            str(calls),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"client failed: {out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run(calls: int, fakes: int, rounds: int | None) -> dict[str, Any]:
    procs: list[Proc] = []
    with Topology(3) as topo:
        try:
            base = f"10.{topo.subnet}.0"
            sources = [f"{base}.{100 + i}" for i in range(20)]
            for source in sources:
                ip("-n", topo.hosts[1], "addr", "add", f"{source}/24", "dev", "eth0")
            worker_proc, worker = start_daemon(
                worker_argv(
                    "-a",
                    f"tcp://{topo.addresses[0]}:8194",
                    "--backend",
                    "noop",
                    "--pool-size",
                    "0",
                    "--log-level",
                    "warning",
                ),
                netns=topo.hosts[0],
            )
            procs.append(worker_proc)
            sched, saddr = start_daemon(
                scheduler_argv(
                    "-a",
                    f"tcp://{topo.addresses[2]}:8190",
                    "--interface",
                    topo.addresses[2],
                ),
                netns=topo.hosts[2],
            )
            procs.append(sched)
            sched.wait_for(rf"Worker {re.escape(worker)} is up", timeout=LIVENESS)
            client_in(topo.hosts[2], saddr, min(calls, 200))  # warm-up
            quiet = client_in(topo.hosts[2], saddr, calls)
            quiet_fds = open_fds(sched.pid)
            flood = Proc(
                [
                    sys.executable,
                    "-m",
                    "tests.mdns",
                    "flood",
                    "--to",
                    topo.addresses[2],
                    "--sources",
                    ",".join(sources),
                    "--prefix",
                    base,
                    "--count",
                    str(fakes),
                    *(["--rounds", str(rounds)] if rounds else []),
                ],
                netns=topo.hosts[1],
            )
            procs.append(flood)
            sched.wait_for(r"Discovered worker fake-", timeout=LIVENESS)
            flooded = client_in(topo.hosts[2], saddr, calls)
            flooded_fds = open_fds(sched.pid)
            workers = status_json(saddr, netns=topo.hosts[2])["workers"]
            flood.signal(signal.SIGTERM)
            flood.process.wait(LIVENESS)
            flood.stop()
            sent = json.loads(flood.stdout[-1])["sent"] if flood.stdout else 0
            log = sched.text()
            ignored = re.findall(r"ignored (\d+) responses over the rate", log)
            return {
                "quiet": quiet,
                "flood": flooded,
                "fake_packets_sent": sent,
                "workers_kept": len(workers),
                "workers_up": sum(1 for w in workers if w["health"] == "up"),
                "scheduler_fds": {"quiet": quiet_fds, "flood": flooded_fds},
                "over_rate_ignored_at_least": int(ignored[-1]) if ignored else 0,
                "scheduler_alive": sched.process.poll() is None,
            }
        finally:
            for proc in reversed(procs):
                proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("client", help="(internal) the measuring client")
    one.add_argument("--address", required=True)
    one.add_argument("--calls", type=int, required=True)
    parser.add_argument("--calls", type=int, default=2000, help="calls per phase")
    parser.add_argument("--fakes", type=int, default=2000, help="fake workers announced")
    parser.add_argument("--rounds", type=int, help="rounds of the flood (default: until done)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.command == "client":
        import anyio

        result = anyio.run(_client, args.address, args.calls, backend="asyncio")
        print(json.dumps(result), flush=True)
        return
    reason = netns_unavailable()
    if reason is not None:
        raise SystemExit(f"bench_discovery needs network namespaces: {reason}")
    result = run(args.calls, args.fakes, args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    q, f = result["quiet"], result["flood"]
    print(f"quiet  p50 {q['p50_ms']:.2f} ms  p99 {q['p99_ms']:.2f} ms  ({q['calls']} calls)")
    print(
        f"flood  p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms  "
        f"({result['fake_packets_sent']} fake announcements of {args.fakes} workers sent)"
    )
    print(
        f"scheduler kept {result['workers_kept']} workers ({result['workers_up']} up), "
        f"fds {result['scheduler_fds']['quiet']} -> {result['scheduler_fds']['flood']}, "
        f"alive: {result['scheduler_alive']}"
    )


if __name__ == "__main__":
    main()
