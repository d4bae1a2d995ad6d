"""Hostile-load figures of issue #11 for one worker (noop backend, plaintext, loopback).

Each part starts its own worker (``--backend noop --log-level warning``) with
the open files limit raised to 65536 (``RLIMIT_NOFILE``, for this process and
so for the daemon it starts), and reads the daemon's memory from
/proc/PID/status (VmRSS, VmHWM). Only the daemon's memory counts: the
clients may use what they like.

a. ``idle``: 10,000 silent plaintext connections (``--tls``: connections that
   did a TLS handshake, then nothing), opened in batches (each
   batch waits until the worker has accepted it, so the listen backlog never
   overflows), held by this process; the worker runs with ``--idle-timeout 0``
   so none is closed however slow the run. Worker RSS before and after, per
   connection, and a fresh
   client's classify p99 meanwhile. Targets: <= 200 MiB in all, <= 16 KiB per
   connection, p99 <= 50 ms.
b. ``peak``: requests of up to the max message size (4 MiB), one kind per
   fresh worker (VmHWM only rises): Genop with a 4 MiB read argument, with a
   4 MiB write argument (echoed back), with a write argument declaring 4 MiB
   and carrying nothing (a tiny request, a 4 MiB answer), ImageClassification
   and Classify with a 4 MiB image, RegisterResource with a 4 MiB blob. Each
   is sent a few times after a small one of its kind. Target: VmHWM rises by
   <= 4x the max message size.
c. ``flood``: a client (its own process) sends 100,000 pipelined Genops,
   each asking for a 256 KiB answer, and never reads. Worker RSS increase
   (the peak of samples every 50 ms, and VmHWM) and another client's
   classify p99 meanwhile. Targets: <= +64 MiB, p99 <= 50 ms.

    python bench/bench_hostile.py [--quick] [--json] [--only idle,peak,flood]

``--quick`` runs every code path at a small scale (1,000 connections,
10,000 flood calls, one big request of each kind); its figures are not the
issue's. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from soak import AGENT, GENOP_EXEC, IMAGE, MiB, genop, proc_status, status_of  # noqa: I001

from tests.processes import Proc, start_daemon, worker_argv
from vaccelray.agent_client import AgentClient
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.envelope import encode_request
from vaccelray.protocol.frames import HEADER_SIZE
from vaccelray.protocol.classify import ClassifyRequest
from vaccelray.protocol.services import CLASSIFY, GENOP, IMAGE_CLASSIFICATION, REGISTER_RESOURCE
from vaccelray.protocol.services import UNREGISTER_RESOURCE
from vaccelray.tls import client_context
from vaccelray.transport.client import Client, Outcome, open_client
from vaccelray.transport.server import default_max_connections

KiB = 1 << 10
NOFILE = 65536
#: Bytes of a big request's envelope, protobuf fields and answer framing left out of
#: the max message size: the payloads below are this much smaller than the limit.
ROOM = 4 * KiB
LIB = pb.Arg(buf=b"libnoop.so\0")
SYMBOL = pb.Arg(buf=b"noop\0")


def log(line: str) -> None:
    print(line, file=sys.stderr if ARGS_JSON else sys.stdout, flush=True)


ARGS_JSON = False


def raise_nofile(want: int = NOFILE) -> int:
    """Raise this process's open files limit (soft and, when allowed, hard) to *want*."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):  # not allowed to raise the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_worker(*extra: str) -> Proc:
    argv = worker_argv(
        "-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", "warning", *extra
    )  # fmt: skip
    proc, _ = start_daemon(argv)
    return proc


def host_port(address: str) -> tuple[str, int]:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / MiB, 1)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll *predicate* until true; the deadline is for liveness only."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(0.02)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def with_agent(address: str, fn: Callable[[AgentClient, int], Awaitable[Any]]) -> Any:
    """*fn(agent, session)* on a fresh connection with a session of its own."""
    client = await open_client(address)
    try:
        agent = AgentClient(client)
        session = await agent.create_session()
        result = await fn(agent, session)
        await agent.destroy_session(session)
        return result
    finally:
        await client.aclose()


async def classify_latencies(address: str, count: int) -> dict[str, Any]:
    """*count* classify calls one after the other on a fresh connection: p50, p99, max in ms."""

    async def run(agent: AgentClient, session: int) -> list[float]:
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            await agent.classify(session, IMAGE)
            latencies.append(time.perf_counter() - start)
        return latencies

    latencies = await with_agent(address, run)
    return {
        "calls": count,
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


class Sampler:
    """VmRSS of *pid* every *interval* s in a thread, until stopped; the peak seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = proc_status(pid, "VmRSS") or 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = proc_status(self.pid, "VmRSS")
            if rss is not None:
                self.peak = max(self.peak, rss)
                self.samples += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# -- a. idle connections --------------------------------------------------------------------


def open_idle(
    address: str, pid: int, count: int, batch: int, tls: bool = False
) -> list[socket.socket]:
    """*count* silent connections, each batch accepted by the worker before the next.

    With *tls*, each has done its TLS handshake (and sends nothing after it).
    """
    target = host_port(address)
    context = client_context() if tls else None
    socks: list[socket.socket] = []
    base = fd_count(pid)
    try:
        while len(socks) < count:
            for _ in range(min(batch, count - len(socks))):
                sock = socket.create_connection(target, timeout=30)
                if context is not None:
                    sock = context.wrap_socket(sock)  # the handshake, then silence
                socks.append(sock)
            accepted = functools.partial(lambda want: fd_count(pid) >= want, base + len(socks))
            wait_until(f"the worker to accept {len(socks)} connections", accepted)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def still_open(socks: list[socket.socket]) -> int:
    """How many of *socks* the worker has not closed (nothing to read, no EOF)."""
    n = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            n += sock.recv(1) != b""  # data: not idle, but open
        except (BlockingIOError, ssl.SSLWantReadError):
            n += 1
        except OSError:
            pass
    return n


def part_idle(args: argparse.Namespace) -> dict[str, Any]:
    count = args.connections
    extra = ["--idle-timeout", "0"]  # held for the whole measurement, however slow
    cap = default_max_connections()
    if cap < count + 100:
        extra += ["--max-connections", str(count + 100)]
    proc = start_worker(*extra)
    try:
        pid, address = proc.pid, proc.address
        asyncio.run(classify_latencies(address, 200))  # warm-up
        before = proc_status(pid, "VmRSS") or 0
        start = time.monotonic()
        socks = open_idle(address, pid, count, args.batch, args.tls)
        opened_s = time.monotonic() - start
        try:
            # A round trip on a fresh connection: connections accepted before it are made.
            asyncio.run(classify_latencies(address, 1))
            after_open = proc_status(pid, "VmRSS") or 0
            latency = asyncio.run(classify_latencies(address, args.latency_calls))
            after = max(after_open, proc_status(pid, "VmRSS") or 0)
            kept = still_open(socks)
        finally:
            for sock in socks:
                sock.close()
        hwm = proc_status(pid, "VmHWM")
    finally:
        proc.stop()
    per_connection = (after - before) / count
    result = {
        "connections": count,
        "tls": args.tls,
        "daemon_options": extra,
        "opened_in_s": round(opened_s, 1),
        "still_open_at_end": kept,
        "rss_before_mib": mib(before),
        "rss_after_mib": mib(after),
        "vmhwm_mib": mib(hwm),
        "per_connection_kib": round(per_connection / KiB, 2),
        "classify": latency,
        "checks": {
            "rss_total": {"value": mib(after), "target": "<= 200 MiB", "pass": after <= 200 * MiB},
            "per_connection": {
                "value": round(per_connection / KiB, 2),
                "target": "<= 16 KiB",
                "pass": per_connection <= 16 * KiB,
            },
            "classify_p99": {
                "value": latency["p99_ms"],
                "target": "<= 50 ms",
                "pass": latency["p99_ms"] <= 50,
            },
            "all_held": {"value": kept, "target": f"== {count}", "pass": kept == count},
        },
    }
    log(
        f"a. {count} idle {'TLS' if args.tls else 'plaintext'} connections (opened in "
        f"{opened_s:.1f} s, {kept} still open at the end): "
        f"worker RSS {mib(before)} -> {mib(after)} MiB "
        f"[target <= 200 MiB: {verdict(after <= 200 * MiB)}], "
        f"{per_connection / KiB:.2f} KiB per connection "
        f"[target <= 16 KiB: {verdict(per_connection <= 16 * KiB)}]; "
        f"fresh client's classify p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms "
        f"[target <= 50 ms: {verdict(latency['p99_ms'] <= 50)}]"
    )
    return result


# -- b. peak RSS per request ----------------------------------------------------------------


def exec_genop(session: int, read: list[pb.Arg], write: list[pb.Arg]) -> pb.GenopRequest:
    return genop(session, GENOP_EXEC, [LIB, SYMBOL, *read], write)


async def big_call(client: Client, agent: AgentClient, session: int, kind: str, size: int) -> int:
    """One request of *kind* whose payload is *size* bytes; the answer's size."""
    if kind == "genop-read":
        request = exec_genop(session, [pb.Arg(buf=os.urandom(size))], [pb.Arg(size=16)])
        reply = await agent.call(GENOP, request)
        return reply.ByteSize()
    if kind == "genop-echo":
        request = exec_genop(session, [], [pb.Arg(buf=os.urandom(size))])
        reply = await agent.call(GENOP, request)
        return reply.ByteSize()
    if kind == "genop-declared":
        reply = await agent.call(GENOP, exec_genop(session, [], [pb.Arg(size=size)]))
        return reply.ByteSize()
    if kind == "image-classification":
        request = pb.ImageClassificationRequest(session_id=session, image=os.urandom(size))
        reply = await agent.call(IMAGE_CLASSIFICATION, request)
        return reply.ByteSize()
    if kind == "classify":
        answer = await client.call_rpc(CLASSIFY, ClassifyRequest(image=os.urandom(size)))
        return len(answer.tag)
    if kind == "register-resource":
        blob = pb.Blob(name="blob", data=os.urandom(size))
        request = pb.RegisterResourceRequest(session_id=session, resource_type=0, blobs=[blob])
        reply = await agent.call(REGISTER_RESOURCE, request)
        unregister = pb.UnregisterResourceRequest(session_id=session, resource_id=reply.resource_id)
        await agent.call(UNREGISTER_RESOURCE, unregister)
        return reply.ByteSize()
    raise ValueError(kind)


PEAK_KINDS = (
    "genop-read",
    "genop-echo",
    "genop-declared",
    "image-classification",
    "classify",
    "register-resource",
)


async def peak_of(proc: Proc, kind: str, size: int, repeat: int) -> dict[str, Any]:
    """VmHWM of a fresh worker before and after *repeat* requests of *kind*, *size* bytes."""
    pid, limit = proc.pid, DEFAULT_MAX_MESSAGE_SIZE
    client = await open_client(proc.address)
    try:
        agent = AgentClient(client)
        session = await agent.create_session()
        await big_call(client, agent, session, kind, 1024)  # the code path, warm
        hwm0 = proc_status(pid, "VmHWM") or 0
        rss0 = proc_status(pid, "VmRSS") or 0
        status, answer = "OK", 0
        for _ in range(repeat):
            try:
                answer = await big_call(client, agent, session, kind, size)
            except Exception as exc:
                status = f"{status_of(exc)}: {exc}"[:200]
        await agent.destroy_session(session)
    finally:
        await client.aclose()
    hwm1 = proc_status(pid, "VmHWM") or 0
    rss1 = proc_status(pid, "VmRSS") or 0
    return {
        "kind": kind,
        "payload_bytes": size,
        "answer_bytes": answer,
        "status": status,
        "vmhwm_before_mib": mib(hwm0),
        "vmhwm_after_mib": mib(hwm1),
        "vmhwm_increase_mib": mib(hwm1 - hwm0),
        "rss_before_mib": mib(rss0),
        "rss_after_mib": mib(rss1),
        "pass": hwm1 - hwm0 <= 4 * limit and status == "OK",
    }


def part_peak(args: argparse.Namespace) -> dict[str, Any]:
    limit = DEFAULT_MAX_MESSAGE_SIZE
    size = limit - ROOM
    rows = []
    for kind in PEAK_KINDS:
        proc = start_worker()
        try:
            row = asyncio.run(peak_of(proc, kind, size, args.repeat))
        finally:
            proc.stop()
        rows.append(row)
        log(
            f"b. {kind:21s} payload {size / MiB:.2f} MiB, answer {row['answer_bytes'] / MiB:.2f} "
            f"MiB, {row['status']}: VmHWM {row['vmhwm_before_mib']} -> "
            f"{row['vmhwm_after_mib']} MiB (+{row['vmhwm_increase_mib']} MiB) "
            f"[target <= +{4 * limit / MiB:g} MiB: {verdict(row['pass'])}]; "
            f"RSS after {row['rss_after_mib']} MiB"
        )
    return {
        "max_message_size": limit,
        "repeat": args.repeat,
        "kinds": rows,
        "checks": {
            row["kind"]: {
                "value": row["vmhwm_increase_mib"],
                "target": f"<= +{4 * limit / MiB:g} MiB",
                "pass": row["pass"],
            }
            for row in rows
        },
    }


# -- c. a client that never reads ---------------------------------------------------------


async def flood_client(address: str, count: int, answer: int) -> None:
    """(Its own process.) Send *count* Genops asking *answer* bytes each, never read.

    Prints ``SENT`` once every call is written (or buffered) and waits for a
    line on stdin before it closes its connection.
    """
    client = await open_client(address)
    agent = AgentClient(client)
    session = await agent.create_session()
    transport = client._protocol.transport  # reaching in: this client means to stop reading
    assert transport is not None
    transport.pause_reading()
    payload = exec_genop(session, [], [pb.Arg(size=answer)]).SerializeToString()
    outcomes: collections.Counter[str] = collections.Counter()

    def done(outcome: Outcome) -> None:
        outcomes["OK" if isinstance(outcome, bytes) else status_of(outcome)] += 1

    for _ in range(count):
        client.start_call(AGENT, "Genop", payload, done)
    print("SENT", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    # What the worker left unread in this client (the kernel's socket buffers hold more).
    frame = HEADER_SIZE + len(encode_request(AGENT, "Genop", payload))
    left_client = count - transport.get_write_buffer_size() // frame
    transport.abort()
    await client.aclose()
    print(json.dumps({"left_client": left_client, "outcomes": dict(outcomes)}), flush=True)


def part_flood(args: argparse.Namespace) -> dict[str, Any]:
    count, answer = args.flood, 256 * KiB
    proc = start_worker()
    try:
        pid, address = proc.pid, proc.address

        async def warm() -> None:
            await classify_latencies(address, 200)

            async def one(agent: AgentClient, session: int) -> None:
                await agent.call(GENOP, exec_genop(session, [], [pb.Arg(size=answer)]))

            await with_agent(address, one)

        asyncio.run(warm())
        before = proc_status(pid, "VmRSS") or 0
        hwm0 = proc_status(pid, "VmHWM") or 0
        sampler = Sampler(pid)
        flooder = subprocess.Popen(
            [sys.executable, __file__, "--flood-client", address, str(count), str(answer)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flooder.stdin is not None
        assert flooder.stdout is not None
        try:
            line = flooder.stdout.readline().strip()
            if line != "SENT":
                raise RuntimeError(f"the flooding client printed {line!r}, not SENT")
            start = time.monotonic()
            latency = asyncio.run(classify_latencies(address, args.latency_calls))
            left = args.hold - (time.monotonic() - start)
            if left > 0:  # a measurement period, not a synchronisation
                time.sleep(left)
            during = proc_status(pid, "VmRSS") or 0
            peak = sampler.stop()
            hwm1 = proc_status(pid, "VmHWM") or 0
            flooder.stdin.write("close\n")
            flooder.stdin.flush()
            flood_end = json.loads(flooder.stdout.readline() or "{}")
            flooder.wait(60)
        finally:
            if flooder.poll() is None:
                flooder.kill()
                flooder.wait()
            flooder.stdin.close()
            flooder.stdout.close()
        # The worker sees the close: after a round trip its RSS is what the flood left.
        asyncio.run(classify_latencies(address, 1))
        after_close = proc_status(pid, "VmRSS") or 0
    finally:
        proc.stop()
    outcomes = flood_end.get("outcomes")
    sent = flood_end.get("left_client", 0)
    increase = peak - before
    ok_rss = increase <= 64 * MiB
    ok_p99 = latency["p99_ms"] <= 50
    log(
        f"c. {count} pipelined Genops asking {answer // KiB} KiB answers, never read: worker RSS "
        f"{mib(before)} MiB -> peak {mib(peak)} MiB (+{mib(increase)} MiB) "
        f"[target <= +64 MiB: {verdict(ok_rss)}], VmHWM +{mib(hwm1 - hwm0)} MiB, "
        f"{mib(after_close)} MiB after the client closed; another client's classify "
        f"p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms [target <= 50 ms: "
        f"{verdict(ok_p99)}]; {sent} calls left the client (the rest waited in it), "
        f"the flooding client got {outcomes or 'no answers'} before closing"
    )
    return {
        "calls": count,
        "answer_bytes": answer,
        "hold_s": args.hold,
        "rss_before_mib": mib(before),
        "rss_peak_mib": mib(peak),
        "rss_at_end_of_hold_mib": mib(during),
        "rss_after_close_mib": mib(after_close),
        "vmhwm_increase_mib": mib(hwm1 - hwm0),
        "rss_samples": sampler.samples,
        "flood_answers_before_close": outcomes,
        "calls_out_of_the_client": sent,
        "classify": latency,
        "checks": {
            "rss_increase": {"value": mib(increase), "target": "<= +64 MiB", "pass": ok_rss},
            "classify_p99": {"value": latency["p99_ms"], "target": "<= 50 ms", "pass": ok_p99},
        },
    }


# -- main ---------------------------------------------------------------------------------

PARTS = {"idle": part_idle, "peak": part_peak, "flood": part_flood}


def main() -> int:
    global ARGS_JSON
    if len(sys.argv) == 5 and sys.argv[1] == "--flood-client":
        asyncio.run(flood_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run")
    parser.add_argument("--json", action="store_true", help="progress on stderr, JSON on stdout")
    parser.add_argument("--only", default=",".join(PARTS), help="parts to run: idle,peak,flood")
    parser.add_argument("--connections", type=int, help="idle connections (default 10000)")
    parser.add_argument("--batch", type=int, default=256, help="connections opened per batch")
    parser.add_argument(
        "--tls", action="store_true", help="idle connections that did a TLS handshake"
    )
    parser.add_argument("--flood", type=int, help="calls of the non-reading client (100000)")
    parser.add_argument("--hold", type=float, help="seconds the flood is measured (20)")
    parser.add_argument("--repeat", type=int, help="big requests of each kind (3)")
    parser.add_argument("--latency-calls", type=int, help="classify calls timed (1000)")
    args = parser.parse_args()
    ARGS_JSON = args.json
    quick = args.quick
    for name, full, small in (
        ("connections", 10_000, 1000),
        ("flood", 100_000, 10_000),
        ("hold", 20.0, 3.0),
        ("repeat", 3, 1),
        ("latency_calls", 1000, 100),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    nofile = raise_nofile()
    log(
        f"bench_hostile{' --quick' if quick else ''}: open files limit {nofile}"
        f"{'' if nofile >= NOFILE else f' (not {NOFILE}: the hard limit)'}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    result: dict[str, Any] = {"quick": quick, "nofile": nofile, "loadavg": os.getloadavg()}
    for part in parts:
        result[part] = PARTS[part](args)
    failed = [
        f"{part}.{name}"
        for part in parts
        for name, check in result[part]["checks"].items()
        if not check["pass"]
    ]
    result["failed"] = failed
    log("all targets met" if not failed else f"missed: {', '.join(failed)}")
    if args.json:
        print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
