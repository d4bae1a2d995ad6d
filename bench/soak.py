"""Soak: mixed load through a scheduler over 3 workers for N minutes, with faults injected.

Every daemon is its own process on loopback (``noop`` backend): three workers
and a scheduler in front of them. The load, all through the scheduler:

- agent clients (one connection each) running vAccel session life cycles:
  CreateSession, a few ImageClassification and classify Genop calls,
  DestroySession;
- offloaded tasks submitted with ``vaccelray.Client(scheduler)`` (no token:
  the scheduler accepts tasks on loopback without one).

Faults, one at a time every ``--fault-min``..``--fault-max`` seconds after the
warm-up, in an order fixed by ``--seed``:

- ``kill9``: kill -9 a worker (w1 or w2; w0 is never killed, so one worker's
  memory is watched over the whole run) and restart it on the same port;
- ``stop``: SIGSTOP a worker for a few seconds, then SIGCONT;
- ``hostile``: a burst of hostile connections against the scheduler and w0
  (silent ones, half-sent frames declaring 1 MiB, junk bytes), held a few
  seconds, then closed;
- ``nonreader``: a client that sends ``--flood`` Genop calls with 64 KiB
  answers through the scheduler and reads nothing for a few seconds, then
  reads its answers.

Every call is accounted for: answered with a status (OK, UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...; CONNECTION_LOST when its
connection closed first), or unanswered: no answer within ``--call-timeout``
seconds (NO_ANSWER), or still in flight when the run ended. At the end the
load stops, the daemons get SIGTERM, and the time each takes to exit is
measured (``--grace`` is given to every daemon).

Printed: each daemon's RSS every ``--interval`` seconds (VmRSS of
/proc/PID/status), VmHWM at the end, calls by status and kind, the faults,
each daemon's RSS growth since the end of the warm-up (the first 10% of the
run; for a restarted worker, since the same time after its restart), and
how soon each daemon exited after SIGTERM.

Targets (issue #11): no call unanswered; every daemon's RSS within +10% of
its level after warm-up; every daemon exits soon after its grace period.

    python bench/soak.py [--minutes 30] [--seed 1] [--grace 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vaccelray
from tests.processes import (
    Proc,
    scheduler_argv,
    start_daemon,
    worker_argv,
)
from vaccelray.agent_client import AgentClient
from vaccelray.client.errors import TaskError, TaskTimeoutError, WorkerLostError
from vaccelray.errors import ConnectError, RPCError, StatusCode, TransportError
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.transport.client import Client, Outcome, open_client

AGENT = "vaccel.VaccelAgent"
IMAGE = b"\x89PNG soak" + bytes(2048)
GENOP_CLASSIFY = 2
GENOP_EXEC = 7
FLOOD_ANSWER = 64 << 10
FAULTS = ("kill9", "stop", "hostile", "nonreader")
MiB = 1 << 20


def checksum(data: bytes) -> int:
    """The offloaded task (pickled by value: this file runs as __main__)."""
    import zlib

    return zlib.crc32(data)


def genop(session: int, op: int, read: list[pb.Arg], write: list[pb.Arg]) -> pb.GenopRequest:
    opcode = pb.Arg(buf=struct.pack("=I", op))
    return pb.GenopRequest(session_id=session, read_args=[opcode, *read], write_args=write)


def classify_genop(session: int) -> pb.GenopRequest:
    return genop(
        session, GENOP_CLASSIFY, [pb.Arg(buf=IMAGE)], [pb.Arg(buf=bytes(64)), pb.Arg(buf=bytes(64))]
    )


def flood_genop(session: int) -> bytes:
    """An exec Genop whose one write argument is declared (64 KiB), so its answer is large."""
    read = [pb.Arg(buf=b"libnoop.so\0"), pb.Arg(buf=b"noop\0")]
    request = genop(session, GENOP_EXEC, read, [pb.Arg(size=FLOOD_ANSWER)])
    return request.SerializeToString()


def status_of(exc: BaseException) -> str:
    """The status name a failed call is counted under."""
    if isinstance(exc, RPCError):
        return exc.code.name if isinstance(exc.code, StatusCode) else f"code {exc.code}"
    if isinstance(exc, ConnectError):
        return "CONNECT_FAILED"
    if isinstance(exc, TransportError):
        return "CONNECTION_LOST"
    if isinstance(exc, WorkerLostError):
        return "UNAVAILABLE"
    if isinstance(exc, TaskTimeoutError):
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, TaskError):  # a refusal relayed as "NAME: CODE: message"
        found = re.search(r"\b([A-Z]+(?:_[A-Z]+)+|UNKNOWN|INTERNAL|CANCELLED)\b", str(exc))
        return found.group(1) if found else type(exc).__name__
    return type(exc).__name__


# -- accounting ---------------------------------------------------------------------------


@dataclass
class Stats:
    """Every call: started, and (kind, status) once it has an outcome."""

    t0: float
    by_kind: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    in_flight: dict[int, str] = field(default_factory=dict)
    started: int = 0
    #: OK agent calls of the well-behaved clients since the last sample (not the non-reading
    #: client's own: its answers wait for it to read, and that is the point of it).
    latencies: list[float] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # first message per kind and status
    _ids: int = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def begin(self, kind: str) -> int:
        self._ids += 1
        self.started += 1
        self.in_flight[self._ids] = kind
        return self._ids

    def end(self, call: int, status: str, latency: float = 0.0, error: object = None) -> None:
        kind = self.in_flight.pop(call)
        self.by_kind[kind, status] += 1
        if status == "OK" and kind not in ("task", "flood"):
            self.latencies.append(latency)
        if error is not None and f"{kind} {status}" not in self.examples:
            self.examples[f"{kind} {status}"] = str(error)[:240]

    async def call(self, kind: str, fn: Callable[[], Awaitable[Any]], guard: float) -> Any:
        """Await *fn()* counted as one *kind* call; its result, or None when it failed."""
        call = self.begin(kind)
        start = time.monotonic()
        try:
            result = await asyncio.wait_for(fn(), guard)
        except asyncio.TimeoutError:
            self.end(call, "NO_ANSWER", error=f"no answer within {guard:g} s")
            return None
        except Exception as exc:
            self.end(call, status_of(exc), error=exc)
            return None
        self.end(call, "OK", time.monotonic() - start)
        return result

    def by_status(self) -> collections.Counter[str]:
        totals: collections.Counter[str] = collections.Counter()
        for (_, status), n in self.by_kind.items():
            totals[status] += n
        return totals

    def take_p99(self) -> float | None:
        latencies, self.latencies = sorted(self.latencies), []
        return latencies[int(len(latencies) * 0.99)] if latencies else None


# -- daemons ------------------------------------------------------------------------------


def proc_status(pid: int, field_name: str) -> int | None:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM), None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@dataclass
class Daemon:
    name: str
    argv: list[str]
    proc: Proc
    started_at: float  # seconds into the run, of the current process
    restarts: int = 0

    @property
    def address(self) -> str:
        return self.proc.address


class Cluster:
    """Three noop workers and a scheduler over them, as child processes."""

    def __init__(self, grace: float, log: Callable[[str], None]) -> None:
        self.grace = grace
        self.log = log
        self.workers: list[Daemon] = []
        self.scheduler: Daemon | None = None
        self.retired: list[Proc] = []
        #: Pool processes of killed workers, to check they went away with them.
        self.orphans: list[int] = []

    @property
    def daemons(self) -> list[Daemon]:
        return [*([self.scheduler] if self.scheduler else []), *self.workers]

    def start(self) -> None:
        for i in range(3):
            argv = worker_argv(
                "-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", "warning",
                "--grace", f"{self.grace:g}",
            )  # fmt: skip
            proc, _ = start_daemon(argv)
            self.workers.append(Daemon(f"w{i}", argv, proc, 0.0))
        argv = scheduler_argv(
            "-a", "tcp://127.0.0.1:0", "--no-discover", "--log-level", "warning",
            "--grace", f"{self.grace:g}",
        )  # fmt: skip
        for worker in self.workers:
            argv += ["--worker", worker.address]
        proc, _ = start_daemon(argv)
        self.scheduler = Daemon("sched", argv, proc, 0.0)

    def restart(self, worker: Daemon, now: float) -> None:
        """Start *worker* again on the address it had (its process is gone)."""
        argv = [a if a != "tcp://127.0.0.1:0" else worker.address for a in worker.argv]
        self.retired.append(worker.proc)
        deadline = time.monotonic() + 30
        while True:  # the port may take a moment to be free again
            try:
                proc, _ = start_daemon(argv)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        worker.proc, worker.started_at = proc, now
        worker.restarts += 1

    def stop(self) -> dict[str, dict[str, Any]]:
        """SIGTERM every daemon at once; per daemon: seconds to exit, exit status, pool left."""
        result: dict[str, dict[str, Any]] = {}

        def terminate(daemon: Daemon) -> None:
            process = daemon.proc.process
            pool = children(process.pid)
            start = time.monotonic()
            daemon.proc.signal(signal.SIGTERM)
            try:
                code = process.wait(self.grace + 60)
                killed = False
            except subprocess.TimeoutExpired:
                process.kill()
                code, killed = process.wait(), True
            took = time.monotonic() - start
            until = time.monotonic() + 5  # its pool processes get a moment to follow it
            while (left := [p for p in pool if alive(p)]) and time.monotonic() < until:
                time.sleep(0.1)
            result[daemon.name] = {
                "exit_s": round(took, 2),
                "exit_status": code,
                "sigkilled": killed,
                "pool_processes_left": len(left),
            }
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        threads = [threading.Thread(target=terminate, args=(d,)) for d in self.daemons]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.close()
        return result

    def log_summary(self) -> dict[str, dict[str, int]]:
        """Per daemon name: its log lines (all its processes) with numbers blanked, counted."""
        summary: dict[str, collections.Counter[str]] = {}
        procs = [(d.name, d.proc) for d in self.daemons]
        procs += [(self.name_of(proc), proc) for proc in self.retired]
        for name, proc in procs:
            counts = summary.setdefault(name, collections.Counter())
            for line in proc.lines:
                if "Listening on" not in line:
                    text = re.sub(r"^\S+ \S+ ", "", line)  # the timestamp
                    counts[re.sub(r"\b[0-9a-fA-F]*\d[0-9a-fA-F]*\b", "N", text)[:160]] += 1
        return {name: dict(counts.most_common()) for name, counts in summary.items()}

    def name_of(self, proc: Proc) -> str:
        address = proc.address
        return next((d.name for d in self.workers if d.address == address), "?")

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.proc.stop()
        for proc in self.retired:
            proc.stop()
        for pid in self.orphans:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# -- load -----------------------------------------------------------------------------------


class Load:
    """Agent-client loops and task loops through the scheduler, paced to *rate* calls/s."""

    def __init__(self, address: str, stats: Stats, args: argparse.Namespace) -> None:
        self.address = address
        self.stats = stats
        self.guard = args.call_timeout
        self.clients = args.clients
        self.task_loops = args.task_loops
        loops = args.clients + args.task_loops
        self.period = loops / args.rate if args.rate > 0 else 0.0  # per loop
        self.rng = random.Random(f"load {args.seed}")
        self.stopping = asyncio.Event()
        self.task_client: vaccelray.Client | None = None

    async def pace(self, started: float) -> None:
        left = self.period - (time.monotonic() - started)
        if left > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), left)

    async def agent_loop(self) -> None:
        client: Client | None = None
        rng = random.Random(self.rng.random())
        try:
            while not self.stopping.is_set():
                if client is None or client.is_closed:
                    if client is not None:
                        await client.aclose()
                    try:
                        client = await open_client(self.address)
                    except ConnectError:
                        client = None
                        await asyncio.sleep(0.5)
                        continue
                await self.life_cycle(AgentClient(client), rng)
        finally:
            if client is not None:
                await client.aclose()

    async def life_cycle(self, agent: AgentClient, rng: random.Random) -> None:
        s, guard = self.stats, self.guard
        started = time.monotonic()
        session = await s.call("create", agent.create_session, guard)
        await self.pace(started)
        if session is None:
            return
        for _ in range(rng.randint(1, 5)):
            if self.stopping.is_set() or agent.client.is_closed:
                break
            started = time.monotonic()
            if rng.random() < 0.7:
                await s.call("classify", lambda: agent.classify(session, IMAGE), guard)
            else:
                request = classify_genop(session)
                send = functools.partial(
                    agent.client.call_message, AGENT, "Genop", request, pb.GenopResponse
                )
                await s.call("genop", send, guard)
            await self.pace(started)
        if not agent.client.is_closed:
            await s.call("destroy", lambda: agent.destroy_session(session), guard)

    async def task_loop(self) -> None:
        assert self.task_client is not None
        client, n = self.task_client, 0
        while not self.stopping.is_set():
            started = time.monotonic()
            n += 1
            ref = client.submit(checksum, n.to_bytes(8, "little") * 64)

            async def result(ref: Any = ref) -> Any:
                try:
                    return await ref
                except asyncio.CancelledError:
                    ref.cancel()
                    raise

            await self.stats.call("task", result, self.guard)
            await self.pace(started)

    async def run(self) -> None:
        self.task_client = await asyncio.to_thread(vaccelray.Client, self.address)
        try:
            loops = [self.agent_loop() for _ in range(self.clients)]
            loops += [self.task_loop() for _ in range(self.task_loops)]
            await asyncio.gather(*loops)
        finally:
            await asyncio.to_thread(self.task_client.shutdown)


# -- faults ---------------------------------------------------------------------------------


async def fault_kill9(cluster: Cluster, rng: random.Random, stats: Stats) -> str:
    worker = cluster.workers[rng.choice((1, 2))]
    pid = worker.proc.pid
    pool = children(pid)
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(worker.proc.process.wait)
    t = time.monotonic()
    await asyncio.to_thread(cluster.restart, worker, stats.now())
    back = time.monotonic() - t
    await asyncio.sleep(2)  # a pool process notices its daemon gone at once, or never
    left = [p for p in pool if alive(p)]
    cluster.orphans += left
    return (
        f"kill -9 {worker.name} (pid {pid}); back on {worker.address} after {back:.1f} s; "
        f"{len(left)} of its {len(pool)} pool processes still alive 2 s later"
    )


async def fault_stop(cluster: Cluster, rng: random.Random, stats: Stats) -> str:
    worker = rng.choice(cluster.workers)
    hold = rng.uniform(3, 8)
    worker.proc.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(hold)
    finally:
        worker.proc.signal(signal.SIGCONT)
    return f"SIGSTOP {worker.name} for {hold:.1f} s, then SIGCONT"


def hostile_burst(targets: list[tuple[str, int]], hold: float, seed: int) -> str:
    """Silent connections, half-sent frames and junk against *targets*, held *hold* s."""
    rng = random.Random(seed)
    socks: list[socket.socket] = []
    refused = 0
    for host, port in targets:
        for i in range(200):
            try:
                sock = socket.create_connection((host, port), timeout=5)
                if i % 4 == 1:  # a request frame declaring 1 MiB, 1 KiB of it sent
                    sock.sendall(struct.pack(">IIBB", 1 << 20, 1, 1, 0) + bytes(1024))
                elif i % 20 == 2:  # junk: a frame header that makes no sense, and more
                    sock.sendall(rng.randbytes(64))
                socks.append(sock)
            except OSError:
                refused += 1
    time.sleep(hold)
    dropped = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            dropped += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            dropped += 1
        sock.close()
    return (
        f"{len(socks)} hostile connections (silent, half-sent frames, junk) held {hold:.1f} s; "
        f"{dropped} closed by the daemons meanwhile, {refused} refused"
    )


async def fault_hostile(cluster: Cluster, rng: random.Random, stats: Stats) -> str:
    assert cluster.scheduler is not None
    targets = []
    for daemon in (cluster.scheduler, cluster.workers[0]):
        host, port = daemon.address.removeprefix("tcp://").rsplit(":", 1)
        targets.append((host, int(port)))
    return await asyncio.to_thread(
        hostile_burst, targets, rng.uniform(3, 8), rng.randrange(1 << 30)
    )


async def fault_nonreader(
    cluster: Cluster, rng: random.Random, stats: Stats, count: int, guard: float
) -> str:
    """A client that sends *count* large-answer Genops and reads nothing for a while."""
    assert cluster.scheduler is not None
    hold = rng.uniform(3, 8)
    client = await open_client(cluster.scheduler.address)
    agent = AgentClient(client)
    session = await stats.call("create", agent.create_session, guard)
    if session is None:
        await client.aclose()
        return "non-reading client: no session"
    done = asyncio.Event()
    pending: dict[int, float] = {}
    answered = collections.Counter[str]()

    def finished(call: int, outcome: Outcome) -> None:
        if call not in pending:
            return
        start = pending.pop(call)
        if isinstance(outcome, BaseException):
            status = status_of(outcome)
            stats.end(call, status, error=outcome)
        else:
            status = "OK"
            stats.end(call, "OK", time.monotonic() - start)
        answered[status] += 1
        if not pending:
            done.set()

    transport = client._protocol.transport  # reaching in: this client means to stop reading
    assert transport is not None
    transport.pause_reading()
    payload = flood_genop(session)
    for _ in range(count):
        call = stats.begin("flood")
        pending[call] = time.monotonic()
        try:
            client.start_call(AGENT, "Genop", payload, functools.partial(finished, call))
        except Exception as exc:
            finished(call, exc)
    await asyncio.sleep(hold)
    if not client.is_closed:
        transport.resume_reading()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(done.wait(), guard)
    for call in list(pending):
        pending.pop(call)
        stats.end(call, "NO_ANSWER", error=f"flood: no answer within {guard:g} s of reading")
        answered["NO_ANSWER"] += 1
    if not client.is_closed:
        await stats.call("destroy", lambda: agent.destroy_session(session), guard)
    await client.aclose()
    outcome = ", ".join(f"{n} {status}" for status, n in answered.most_common())
    return (
        f"non-reading client: {count} Genops with {FLOOD_ANSWER >> 10} KiB answers, "
        f"unread for {hold:.1f} s: {outcome}"
    )


async def inject_faults(
    cluster: Cluster, stats: Stats, args: argparse.Namespace, warmup: float, stop: asyncio.Event
) -> list[dict[str, Any]]:
    rng = random.Random(f"faults {args.seed}")
    log: list[dict[str, Any]] = []
    order: list[str] = []
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), warmup)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(args.fault_min, args.fault_max))
        if stop.is_set():
            break
        if not order:  # every kind once per round, in a seeded order
            order = rng.sample(FAULTS, len(FAULTS))
        kind = order.pop()
        at = stats.now()
        try:
            if kind == "kill9":
                what = await fault_kill9(cluster, rng, stats)
            elif kind == "stop":
                what = await fault_stop(cluster, rng, stats)
            elif kind == "hostile":
                what = await fault_hostile(cluster, rng, stats)
            else:
                what = await fault_nonreader(cluster, rng, stats, args.flood, args.call_timeout)
        except Exception as exc:
            what = f"{kind} failed: {type(exc).__name__}: {exc}"
        log.append({"t": round(at, 1), "kind": kind, "what": what})
        cluster.log(f"[{stats.now():5.0f}s] fault begun at {at:.0f} s: {what}")
    return log


# -- sampling -------------------------------------------------------------------------------


def sample(cluster: Cluster, stats: Stats) -> dict[str, Any]:
    rss = {}
    for daemon in cluster.daemons:
        value = proc_status(daemon.proc.pid, "VmRSS")
        rss[daemon.name] = None if value is None else round(value / MiB, 1)
    return {"t": round(stats.now(), 1), "rss_mib": rss, "pids": {}}


async def sampler(
    cluster: Cluster,
    stats: Stats,
    interval: float,
    warmup: float,
    stop: asyncio.Event,
    samples: list[dict[str, Any]],
) -> None:
    last_t, last_calls = 0.0, 0
    times = [0.0, warmup]
    while True:
        next_t = times.pop(0) if times else samples[-1]["t"] + interval
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_t - stats.now()))
        if stop.is_set():
            return
        row = sample(cluster, stats)
        row["pids"] = {d.name: d.proc.pid for d in cluster.daemons}
        calls = sum(stats.by_kind.values())
        rate = (calls - last_calls) / max(row["t"] - last_t, 1e-9)
        p99 = stats.take_p99()
        row.update(calls=calls, p99_ms=None if p99 is None else round(p99 * 1000, 1))
        samples.append(row)
        last_t, last_calls = row["t"], calls
        mib = "  ".join(f"{n} {v if v is not None else '-':>6}" for n, v in row["rss_mib"].items())
        p99_text = "-" if p99 is None else f"{p99 * 1000:.0f} ms"
        cluster.log(
            f"[{row['t']:5.0f}s] RSS MiB  {mib} | calls {calls} (+{rate:.0f}/s), p99 {p99_text}"
        )


def growth(
    samples: list[dict[str, Any]],
    final: dict[str, Any],
    cluster: Cluster,
    warmup: float,
    half: float,
) -> dict[str, dict[str, Any]]:
    """RSS at the end vs the first sample at least *warmup* s into the current process's life.

    Also vs the first such sample from *half* s into the run on: a one-time step
    (a buffer pool grown by the first burst) shows in the first figure only,
    steady growth (a leak) in both.
    """

    def first(name: str, pid: int, since: float) -> dict[str, Any] | None:
        found = (s for s in samples if s["pids"].get(name) == pid and s["t"] >= since - 0.5)
        return next(found, None)

    result = {}
    for daemon in cluster.daemons:
        name, pid = daemon.name, daemon.proc.pid
        base = first(name, pid, daemon.started_at + warmup)
        later = first(name, pid, max(daemon.started_at + warmup, half))
        end = final["rss_mib"][name]
        hwm = proc_status(pid, "VmHWM")
        entry: dict[str, Any] = {
            "restarts": daemon.restarts,
            "since_t": daemon.started_at,
            "end_mib": end,
            "hwm_mib": None if hwm is None else round(hwm / MiB, 1),
        }
        if base is not None and end is not None and base["rss_mib"][name]:
            entry["base_mib"] = base["rss_mib"][name]
            entry["base_t"] = base["t"]
            entry["growth_pct"] = round(100 * (end / base["rss_mib"][name] - 1), 1)
        if later is not None and end is not None and later["rss_mib"][name]:
            entry["second_half_growth_pct"] = round(100 * (end / later["rss_mib"][name] - 1), 1)
        result[name] = entry
    return result


# -- the run --------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    assert cluster.scheduler is not None
    duration = args.minutes * 60
    warmup = duration * 0.1
    interval = min(args.interval, duration / 10)
    stats = Stats(time.monotonic())
    for daemon in cluster.daemons:
        daemon.started_at = 0.0
    load = Load(cluster.scheduler.address, stats, args)
    stop = asyncio.Event()
    samples: list[dict[str, Any]] = []
    load_task = asyncio.create_task(load.run())
    sampler_task = asyncio.create_task(sampler(cluster, stats, interval, warmup, stop, samples))
    faults_task = asyncio.create_task(inject_faults(cluster, stats, args, warmup, stop))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(load_task), duration)
    stop.set()
    faults = await faults_task  # a fault under way is finished (a killed worker restarted)
    await sampler_task
    # Stop the load: no new calls; those in flight get the call timeout to end.
    load.stopping.set()
    ended = stats.now()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(load_task), args.call_timeout + 10)
    left = collections.Counter(stats.in_flight.values())
    if not load_task.done():
        load_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await load_task
    elif load_task.exception() is not None:
        raise load_task.exception()  # type: ignore[misc]
    final = sample(cluster, stats)
    final["pids"] = {d.name: d.proc.pid for d in cluster.daemons}
    grew = growth(samples, final, cluster, warmup, duration / 2)
    return {
        "minutes": args.minutes,
        "seed": args.seed,
        "grace_s": args.grace,
        "warmup_s": round(warmup, 1),
        "load_stopped_at_s": round(ended, 1),
        "calls_started": stats.started,
        "calls_by_status": dict(stats.by_status().most_common()),
        "calls_by_kind": {
            kind: {st: n for (k, st), n in sorted(stats.by_kind.items()) if k == kind}
            for kind in sorted({k for k, _ in stats.by_kind})
        },
        "examples": stats.examples,
        "unanswered": {
            "no_answer_within_call_timeout": stats.by_status()["NO_ANSWER"],
            "in_flight_at_end": sum(left.values()),
            "in_flight_by_kind": dict(left),
        },
        "faults": faults,
        "samples": samples,
        "rss": grew,
    }


def report(result: dict[str, Any], out: TextIO) -> None:
    def p(line: str) -> None:
        print(line, file=out)

    p(f"\nsoak: {result['minutes']:g} min, seed {result['seed']}, grace {result['grace_s']:g} s")
    p(f"calls: {result['calls_started']} started")
    for status, n in result["calls_by_status"].items():
        p(f"  {status:22s} {n:8d}")
    p("by kind:")
    for kind, counts in result["calls_by_kind"].items():
        p(f"  {kind:9s} " + ", ".join(f"{st} {n}" for st, n in counts.items()))
    for what, text in result["examples"].items():
        p(f"  first {what}: {text}")
    u = result["unanswered"]
    total = u["no_answer_within_call_timeout"] + u["in_flight_at_end"]
    p(
        f"unanswered: {u['in_flight_at_end']} still in flight at the end"
        f"{' ' + str(u['in_flight_by_kind']) if u['in_flight_by_kind'] else ''}, "
        f"{u['no_answer_within_call_timeout']} with no answer "
        f"within the call timeout (target 0: {'ok' if total == 0 else 'MISSED'})"
    )
    kinds = collections.Counter(f["kind"] for f in result["faults"])
    p(f"faults: {len(result['faults'])} ({', '.join(f'{k} {n}' for k, n in kinds.items())})")
    p(f"RSS vs after warm-up ({result['warmup_s']:g} s into the process's life), MiB:")
    for name, r in result["rss"].items():
        restarted = f", restarted {r['restarts']}x (last at {r['since_t']:.0f} s)"
        life = restarted if r["restarts"] else ""
        if "growth_pct" in r:
            ok = "ok" if r["growth_pct"] <= 10 else "MISSED"
            half = r.get("second_half_growth_pct")
            half_text = "n/a" if half is None else f"{half:+.1f}%"
            p(
                f"  {name:6s} {r['base_mib']:6.1f} at {r['base_t']:.0f} s -> {r['end_mib']:6.1f} "
                f"({r['growth_pct']:+.1f}%, target <= +10%: {ok}; second half "
                f"{half_text}); VmHWM {r['hwm_mib']}{life}"
            )
        else:
            p(f"  {name:6s} n/a (too young) -> {r['end_mib']}; VmHWM {r['hwm_mib']}{life}")
    p(f"exit after SIGTERM (grace {result['grace_s']:g} s):")
    for name, e in result.get("exit", {}).items():
        killed = ", SIGKILLed" if e["sigkilled"] else ""
        pool = (
            f", {e['pool_processes_left']} pool processes left" if e["pool_processes_left"] else ""
        )
        p(f"  {name:6s} {e['exit_s']:6.2f} s (status {e['exit_status']}{killed}{pool})")
    p(f"pool processes of killed workers still alive at the end: {result['orphans_alive']}")
    p("daemon log lines (numbers shown as N), most frequent first:")
    for name, lines in result["logs"].items():
        p(f"  {name}: {sum(lines.values())} lines")
        for text, n in list(lines.items())[:8]:
            p(f"    {n:6d}x {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--grace", type=float, default=5.0, help="daemons' --grace, seconds")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=4, help="agent clients (connections)")
    parser.add_argument("--task-loops", type=int, default=2, help="offloaded tasks in flight")
    parser.add_argument("--rate", type=float, default=300.0, help="calls/s in all; 0: flat out")
    parser.add_argument("--call-timeout", type=float, default=30.0, help="per call, seconds")
    parser.add_argument("--fault-min", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--fault-max", type=float, default=60.0)
    parser.add_argument("--flood", type=int, default=1000, help="a non-reading client's calls")
    parser.add_argument("--json", action="store_true", help="progress on stderr, JSON on stdout")
    args = parser.parse_args()
    out = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        print(line, file=out, flush=True)

    cluster = Cluster(args.grace, log)
    try:
        cluster.start()
        log(
            "daemons: "
            + ", ".join(f"{d.name} pid {d.proc.pid} {d.address}" for d in cluster.daemons)
        )
        result = asyncio.run(soak(args, cluster))
        result["exit"] = cluster.stop()
        result["orphans_alive"] = sum(alive(p) for p in cluster.orphans)
        result["logs"] = cluster.log_summary()
    finally:
        cluster.close()
    if args.json:
        print(json.dumps(result))
    else:
        report(result, out)


if __name__ == "__main__":
    main()
