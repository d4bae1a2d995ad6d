"""Scheduler throughput: through the scheduler vs straight to a worker, and scale-out.

Every worker and the scheduler is its own process (``python -m ...``) on
loopback, both at ``--log-level warning`` (per-call logging is measured by
bench_worker.py); the load runs here, N calls in flight, same run for the
direct and the scheduled figure of each pair.

1. One ``noop`` worker, where the scheduler's own cost is all there is:
   - the Python classify load (each in-flight loop on its own session),
     target >= 0.6x direct;
   - the Go client's session mix (tests/interop/peer ``bench -mix``:
     create, classify three times, destroy), target >= 0.5x direct
     (skipped when the Go toolchain is missing);
   - CPU time per forwarded call, scheduler against worker (utime + stime
     from /proc over the scheduled classify load), target <= 1.
2. A worker whose backend sleeps 5 ms per call (``sleepy``): target >= 0.9x.
3. Scale-out: workers that run one call at a time (``--slots 1``), 5 ms per
   call, 8 in flight through the scheduler: 3 workers vs 1 (target >= 2.5x).

With ``--instructions N``, only the scheduler's instructions per forwarded
call, a figure the machine's load does not move: the scheduler runs under
``valgrind --tool=callgrind`` (noop worker, *in-flight* classify loops)
and its counters cover exactly N calls (``callgrind_control`` zeroes them
before and dumps them after). Compare two trees in the same run with
``--ab-tree TREE`` (the other tree's scheduler, the same worker and load).

With ``--relay-floor``, also two floors, measured beside the scheduler in
the same run (their rates against direct, Go session mix included, and their
CPU per call against the worker's):

- the floor of any asyncio relay: a process that only copies bytes between
  the client's connection and one of its own to the worker (plaintext, no
  frame parsed);
- the parsing floor: the least a relay that routes by session must do, in
  Python (``PARSING_RELAY``: frames parsed, envelopes decoded, session ids
  swapped in the bytes, answers passed back as they are), and nothing the
  scheduler does besides (deadlines, limits, metrics, credentials, failover).

What the scheduler does above them is its own cost. ``--cost-curve 0,5,10``
runs the copying relay spending that many CPU µs per frame: the rate a hop of
a given cost allows, to read a CPU figure as a rate.

4. ``--membership-ab TREE``: the cost of TLS and the membership proof on the
   task path. Task round trips (a no-op task, *in-flight* at a time, through
   the scheduler to one worker, all over TCP with a token file) with this
   tree against TREE, a tree without them (``git archive BASE | tar -x -C
   TREE``), in interleaved pairs (fresh daemons and client each run, the
   first of each pair alternating); the median of the pairs' ratios, target
   >= 0.9.

``--plaintext`` puts every daemon on a unix socket, so that no hop is TLS
(the issue's condition for the targets above); by default they listen on
loopback TCP, where the scheduler's link to the worker is TLS with the
membership proof, as in a cluster. Applies to parts 1-3, ``--relay-floor``
and ``--instructions``.

    python bench/bench_scheduler.py [--duration 3] [--in-flight 8] [--relay-floor]
        [--cost-curve 0,5,10,20] [--plaintext] [--json]
    python bench/bench_scheduler.py --membership-ab /tmp/base [--pairs 5]
    python bench/bench_scheduler.py --instructions 3000 [--ab-tree /tmp/base]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import Proc, scheduler_argv, sleepy_argv, worker_argv  # noqa: E402
from vaccelray.agent_client import AgentClient  # noqa: E402
from vaccelray.transport.client import connect  # noqa: E402
from vaccelray.transport.endpoints import TcpEndpoint, UnixEndpoint, parse_endpoint  # noqa: E402

QUIET = ("--log-level", "warning")
TARGETS = {
    "noop_classify": (">=", 0.6),
    "noop_go_session_mix": (">=", 0.5),
    "sleepy5ms_classify": (">=", 0.9),
    "cpu_per_call_scheduler_vs_worker": ("<=", 1.0),
    "scaleout_3_vs_1": (">=", 2.5),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Where the daemons listen: loopback TCP (the scheduler's link to a worker is then TLS,
#: as a cluster's is), or with ``--plaintext`` unix sockets in this directory (every hop
#: plaintext: the scheduler shows a unix worker its token as metadata).
UNIX_DIR: Path | None = None


def _listen_address() -> str:
    if UNIX_DIR is None:
        return f"tcp://127.0.0.1:{_free_port()}"
    return f"unix://{tempfile.mktemp(suffix='.sock', dir=UNIX_DIR)}"


def _link() -> str:
    """How the daemons are reached, as the figures say it."""
    if UNIX_DIR is None:
        return "loopback TCP (TLS from the scheduler to the worker)"
    return "unix sockets (every hop plaintext)"


def _accepts(address: str) -> bool:
    """Whether a daemon accepts connections at *address* (tcp:// or unix://) now."""
    endpoint = parse_endpoint(address)
    try:
        if isinstance(endpoint, UnixEndpoint):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1)
                sock.connect(endpoint.sockaddr)
        else:
            assert isinstance(endpoint, TcpEndpoint)
            socket.create_connection((endpoint.host, endpoint.port), timeout=1).close()
    except OSError:
        return False
    return True


@contextmanager
def daemon(
    argv: Sequence[str], env: dict[str, str] | None = None, patience: float = 60
) -> Iterator[tuple[Proc, str]]:
    """A daemon at warning level (no ready line): its address once it accepts connections
    (within *patience* seconds)."""
    address = _listen_address()
    proc = Proc([*argv, "-a", address, *QUIET], env=env)
    try:
        deadline = time.monotonic() + patience
        while not _accepts(address):
            if proc.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("\n".join(proc.lines[-20:]))
            time.sleep(0.05)
        yield proc, address
    finally:
        proc.stop()


def scheduler(workers: Sequence[str]) -> list[str]:
    argv = scheduler_argv("--no-discover")
    for worker in workers:
        argv += ["--worker", worker]
    return argv


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


async def counted_calls(address: str, pid: int, in_flight: int, calls: int) -> None:
    """Exactly *calls* classifications, *in_flight* at a time, counted by callgrind in *pid*."""
    async with connect(address) as client:
        agent = AgentClient(client)
        for _ in range(600):  # until the scheduler (slow under valgrind) routes to the worker
            try:
                await agent.destroy_session(await agent.create_session())
                break
            except Exception:
                await anyio.sleep(0.5)
        sessions = [await agent.create_session() for _ in range(in_flight)]
        image = b"\0" * 256
        for session in sessions:  # warm up every path
            await agent.classify(session, image)
        left = calls

        async def loop(session: int) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await agent.classify(session, image)

        await anyio.run_process(["callgrind_control", "-z", str(pid)])
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(loop, session)
        await anyio.run_process(["callgrind_control", "-d", str(pid)])
        for session in sessions:
            await agent.destroy_session(session)


def instructions_per_call(tree: Path, calls: int, in_flight: int) -> float:
    """Instructions (callgrind's Ir) *tree*'s scheduler runs per forwarded classify."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    env = {"PYTHONPATH": str(tree)}
    noop = worker_argv("--backend", "noop", "--pool-size", "0")
    with tempfile.TemporaryDirectory() as tmp, daemon(noop) as (_, waddr):
        out = Path(tmp) / "callgrind.out"
        # -P: the code of PYTHONPATH (the tree), not of the cwd; health checks seldom
        # (they are counted too) and patient (everything is some 50 times slower).
        sched = scheduler([waddr])
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", sched[0], "-P",
                *sched[1:], "--health-interval", "5", "--health-timeout", "60"]  # fmt: skip
        with daemon(argv, env, patience=600) as (proc, saddr):
            anyio.run(counted_calls, saddr, proc.pid, in_flight, calls, backend="asyncio")
        for dump in Path(tmp).iterdir():
            text = dump.read_text()
            if "Trigger: dump" in text:
                totals = next(line for line in text.splitlines() if line.startswith("totals:"))
                return int(totals.split()[1]) / calls
    raise RuntimeError("callgrind wrote no dump of the counted calls")


def hop_figures(
    worker: int, hop: int, address: str, peer: Path | None, in_flight: int, duration: float
) -> dict[str, float]:
    """What a relay process *hop* in front of the *worker* process allows, at its *address*:
    the classify load's rate, its CPU per call (and the worker's, and their ratio), and
    the Go session mix's rate when there is a Go peer."""
    before = cpu_seconds(worker), cpu_seconds(hop)
    calls = classify_load(address, in_flight, duration) * duration
    spent = cpu_seconds(worker) - before[0], cpu_seconds(hop) - before[1]
    figures = {
        "noop_classify": calls / duration,
        "cpu_us_per_call": spent[1] / calls * 1e6,
        "cpu_us_per_call_worker_behind": spent[0] / calls * 1e6,
        "cpu_per_call_vs_worker": spent[1] / spent[0],
    }
    if peer is not None:
        figures["noop_go_session_mix"] = go_session_mix(peer, address, in_flight, duration)
    return figures


def classify_load(address: str, in_flight: int, duration: float) -> float:
    return anyio.run(drive, address, in_flight, duration, backend="asyncio")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def go_peer() -> Path | None:
    """The Go interop peer, built if the toolchain is there; None when it is not."""
    spec = importlib.util.spec_from_file_location("bench_build", REPO / "tests/interop/build.py")
    assert spec is not None
    assert spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        return Path(build.build_peer())
    except Exception as exc:  # no Go toolchain or packages: the figure is skipped
        print(f"(Go session mix skipped: {exc})", file=sys.stderr)
        return None


def go_session_mix(peer: Path, address: str, in_flight: int, duration: float) -> float:
    out = subprocess.run(
        [str(peer), "bench", "-addr", address, "-mix", "-concurrency", str(in_flight),
         "-duration", f"{duration}s", "-image-size", "256"],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    if result.get("errors"):
        first = result.get("first_error")
        raise RuntimeError(f"Go session mix: {result['errors']} errors, the first: {first}")
    return float(result["calls_per_s"])


#: What both relays below start with: their arguments as a daemon's (``-a ADDRESS``,
#: then the worker's address; tcp:// or unix://), one read buffer as the daemons have,
#: a protocol that reads into it, and dialling and listening at either kind of address.
_RELAY_BASE = """
import asyncio, socket, sys
listen, worker = sys.argv[sys.argv.index("-a") + 1], sys.argv[1]
READS = memoryview(bytearray(256 << 10))

class Socket(asyncio.BufferedProtocol):
    transport = None
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def get_buffer(self, sizehint):
        return READS

async def dial(factory, address):
    loop = asyncio.get_running_loop()
    if address.startswith("unix://"):
        return (await loop.create_unix_connection(factory, address.removeprefix("unix://")))[1]
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return (await loop.create_connection(factory, host, int(port)))[1]

async def serve(factory, address):
    loop = asyncio.get_running_loop()
    if address.startswith("unix://"):
        server = await loop.create_unix_server(factory, address.removeprefix("unix://"))
    else:
        server = await loop.create_server(factory, "127.0.0.1", int(address.rsplit(":", 1)[1]))
    await server.serve_forever()
"""

#: The relay floor: copies bytes both ways, one worker connection per client connection.
#: With ``SPIN_US`` in its environment it also spends that much CPU per frame (it reads
#: the frame headers to count them): the cost curve, what a hop of a given cost allows.
RELAY = (
    _RELAY_BASE
    + """
import os, time
SPIN = float(os.environ.get("SPIN_US", "0")) * 1e-6

class Pipe(Socket):
    def __init__(self):
        self.peer, self.held = None, []
        self.skip = 0  # bytes of a frame begun in an earlier read (SPIN only)
    def buffer_updated(self, nbytes):
        data = READS[:nbytes].tobytes()
        if SPIN:
            self.spin(data)
        if self.peer is None:
            self.held.append(data)
        else:
            self.peer.transport.write(data)
    def spin(self, data):
        pos, frames = self.skip, 0
        while pos + 10 <= len(data):  # a header split across reads is not counted
            pos += 10 + int.from_bytes(data[pos:pos + 4], "big")
            frames += 1
        self.skip = max(0, pos - len(data))
        end = time.thread_time() + frames * SPIN
        while time.thread_time() < end:
            pass
    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        self.transport = None

def accepted():
    down = Pipe()
    async def link():
        up = await dial(Pipe, worker)
        up.peer, down.peer = down, up
        up.transport.write(b"".join(down.held))
    asyncio.get_running_loop().create_task(link())
    return down

asyncio.run(serve(accepted, listen))
"""
)

#: The parsing floor: the least a relay that routes by session does, in Python. Every
#: frame is parsed, a request's envelope decoded (upb) and its session id swapped for
#: the worker's in the bytes (``vaccelray.protocol.fields``), CreateSession's reply
#: mapped, the worker's answers passed back as they are with the caller's stream id.
#: Nothing else: no deadline, limit, metric, credential, failover or error check.
#: All client connections share one worker connection, as the scheduler's do.
PARSING_RELAY = (
    _RELAY_BASE
    + """
import struct
from vaccelray.protocol._pb import ttrpc_pb2, vaccel_pb2
from vaccelray.protocol.fields import find_varint_field, replace_varint_field
HEADER = struct.Struct(">IIBB")
Request, Response = ttrpc_pb2.Request, ttrpc_pb2.Response
Created = vaccel_pb2.CreateSessionResponse
sessions, ids = {}, iter(range(1, 1 << 62))  # ours -> the worker's
up = None

class Link(Socket):
    def __init__(self):
        self.rest, self.out = b"", []
    def buffer_updated(self, nbytes):
        data = self.rest + READS[:nbytes].tobytes() if self.rest else READS[:nbytes].tobytes()
        pos = 0
        while pos + 10 <= len(data):
            length, stream_id, _, _ = HEADER.unpack_from(data, pos)
            end = pos + 10 + length
            if end > len(data):
                break
            self.frame(stream_id, data[pos + 10:end])
            pos = end
        self.rest = data[pos:]
        self.flushed()
    def flush(self):
        out, self.out = self.out, []
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
    def connection_lost(self, exc):
        self.transport = None

class Worker(Link):
    def __init__(self):
        super().__init__()
        self.waiting, self.next_id, self.touched = {}, 1, set()
    def frame(self, stream_id, body):
        caller, caller_stream, create = self.waiting.pop(stream_id)
        if create:  # our id for the worker's session
            reply = Response.FromString(body)
            ours = next(ids)
            sessions[ours] = Created.FromString(reply.payload).session_id
            reply.payload = Created(session_id=ours).SerializeToString()
            body = reply.SerializeToString()
        caller.out += (HEADER.pack(len(body), caller_stream, 2, 0), body)
        self.touched.add(caller)
    def flushed(self):
        for caller in self.touched:
            caller.flush()
        self.touched.clear()
    def send(self, caller, caller_stream, request, create):
        stream_id, self.next_id = self.next_id, self.next_id + 2
        self.waiting[stream_id] = (caller, caller_stream, create)
        body = request.SerializeToString()
        self.out += (HEADER.pack(len(body), stream_id, 1, 0), body)

class Caller(Link):
    def frame(self, stream_id, body):
        request = Request.FromString(body)
        create = request.method == "CreateSession"
        if not create:
            field = find_varint_field(request.payload, 1)
            if request.method == "DestroySession":
                worker_id = sessions.pop(field.value)
            else:
                worker_id = sessions[field.value]
            request.payload = replace_varint_field(request.payload, field, worker_id)
        up.send(self, stream_id, request, create)
    def flushed(self):
        up.flush()

async def main():
    global up
    up = await dial(Worker, worker)
    await serve(Caller, listen)

asyncio.run(main())
"""
)

#: The task load of part 4, run by the interpreter of the tree measured.
TASK_LOAD = """
import sys, time, vaccelray
address, token, duration, in_flight = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
def noop():
    return None
with vaccelray.Client(address, token=token) as client:
    deadline = time.monotonic() + 60
    while True:  # until the scheduler routes to the worker
        try:
            client.submit(noop).result(timeout=30)
            break
        except vaccelray.TaskError:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    for _ in range(100):
        client.submit(noop).result(timeout=30)
    done, t0 = 0, time.monotonic()
    stop = t0 + duration
    while time.monotonic() < stop:
        refs = [client.submit(noop) for _ in range(in_flight)]
        for ref in refs:
            ref.result(timeout=30)
        done += in_flight
    print(done / (time.monotonic() - t0))
"""


def task_rate(tree: Path, token_file: Path, in_flight: int, duration: float) -> tuple[float, float]:
    """No-op task round trips per second through a scheduler, all of *tree*'s code, and
    the CPU µs the two daemons spent per task (warm-up included: ~100 tasks more)."""
    env = {"PYTHONPATH": str(tree)}
    token = ("--token-file", str(token_file))

    def of_tree(argv: list[str]) -> list[str]:
        return [argv[0], "-P", *argv[1:]]  # -P: the code of PYTHONPATH, not of the cwd

    worker = of_tree(worker_argv("--backend", "noop", "--pool-size", "1", *token))
    with (
        daemon(worker, env) as (wproc, waddr),
        daemon(of_tree([*scheduler([waddr]), *token]), env) as (sproc, saddr),
    ):
        pids = (wproc.pid, sproc.pid)
        before = sum(cpu_seconds(pid) for pid in pids)
        out = subprocess.run(
            [sys.executable, "-P", "-c", TASK_LOAD, saddr, token_file.read_text().strip(),
             str(duration), str(in_flight)],
            capture_output=True, text=True, env={**os.environ, **env}, cwd="/", check=False,
        )  # fmt: skip
        spent = sum(cpu_seconds(pid) for pid in pids) - before
    if out.returncode != 0:
        raise RuntimeError(f"the task load failed on {tree}:\n{out.stderr}")
    rate = float(out.stdout.strip().splitlines()[-1])
    return rate, spent / (rate * duration + 101) * 1e6


def membership_ab(base: Path, pairs: int, in_flight: int, duration: float) -> dict[str, object]:
    """Part 4: this tree (TLS and membership) against *base*, interleaved pairs."""
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(f"bench-{os.getpid()}-{time.time_ns()}\n")
        token_file.chmod(0o600)
        rows = []
        for i in range(pairs):
            order = [("base", base), ("tls", REPO)]
            if i % 2:
                order.reverse()
            got = {name: task_rate(tree, token_file, in_flight, duration) for name, tree in order}
            rates = {name: rate for name, (rate, _) in got.items()}
            cpu = {f"{name}_cpu_us": us for name, (_, us) in got.items()}
            rows.append(
                {
                    **rates,
                    **cpu,
                    "ratio": rates["tls"] / rates["base"],
                    "cpu_ratio": cpu["tls_cpu_us"] / cpu["base_cpu_us"],
                    "first": order[0][0],
                }
            )
            print(
                f"pair {i + 1} ({order[0][0]} first): base {rates['base']:,.0f} tasks/s "
                f"({cpu['base_cpu_us']:.0f} µs CPU/task), tls+membership {rates['tls']:,.0f} "
                f"tasks/s ({cpu['tls_cpu_us']:.0f} µs), ratio {rows[-1]['ratio']:.3f}",
                file=sys.stderr,
            )
    median = statistics.median(float(r["ratio"]) for r in rows)
    cpu_median = statistics.median(float(r["cpu_ratio"]) for r in rows)
    return {"pairs": rows, "median_ratio": median, "median_cpu_ratio": cpu_median,
            "target": ">= 0.9", "ok": median >= 0.9, "loadavg": os.getloadavg()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--relay-floor",
        action="store_true",
        help="also the floors: a relay copying bytes, and one that parses and maps sessions",
    )
    parser.add_argument(
        "--cost-curve",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[],
        metavar="US,US,...",
        help="also the copying relay spending each of these CPU µs per frame: the rate a "
        "hop of that cost allows (Go session mix, else the classify load)",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="every daemon on a unix socket: no hop is TLS (the issue's condition); "
        "by default loopback TCP, where the scheduler's link to the worker is TLS",
    )
    parser.add_argument("--membership-ab", type=Path, metavar="TREE", help="part 4 only")
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs of part 4")
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="CALLS",
        help="only the scheduler's instructions per forwarded call, over CALLS calls (callgrind)",
    )
    parser.add_argument(
        "--ab-tree",
        type=Path,
        metavar="TREE",
        help="with --instructions: also TREE's scheduler (git archive BASE | tar -x -C TREE)",
    )
    args = parser.parse_args()
    n, d = args.in_flight, args.duration
    if args.plaintext:
        if args.membership_ab is not None:
            parser.error("--membership-ab measures TLS: it runs over TCP, not with --plaintext")
        global UNIX_DIR
        with tempfile.TemporaryDirectory() as sockets:
            UNIX_DIR = Path(sockets)
            run(args, n, d)
        return
    run(args, n, d)


def run(args: argparse.Namespace, n: int, d: float) -> None:
    """The figures *args* ask for, *n* calls in flight, *d* seconds each."""
    if args.instructions is not None:
        trees = {"this": REPO} if args.ab_tree is None else {"this": REPO, "other": args.ab_tree}
        counts = {
            name: instructions_per_call(tree, args.instructions, n) for name, tree in trees.items()
        }
        if args.json:
            result = {"calls": args.instructions, "in_flight": n, "instructions_per_call": counts}
            print(json.dumps(result))
        else:
            for name, count in counts.items():
                print(f"scheduler instructions per forwarded classify, {name} tree: {count:,.0f}")
            if "other" in counts:
                print(f"this / other: {counts['this'] / counts['other']:.3f}")
        return
    if args.membership_ab is not None:
        result = membership_ab(args.membership_ab, args.pairs, n, d)
        print(json.dumps(result) if args.json else (
            f"median ratio tls+membership / base: {result['median_ratio']:.3f} "
            f"(target >= 0.9: {'ok' if result['ok'] else 'MISSED'}); daemons' CPU per task "
            f"{result['median_cpu_ratio']:.3f}x; "
            f"load average {result['loadavg']}"
        ))  # fmt: skip
        return
    figures: dict[str, float] = {}
    ratios: dict[str, float] = {}
    peer = go_peer()

    noop = worker_argv("--backend", "noop", "--pool-size", "0")
    with daemon(noop) as (worker, waddr), daemon(scheduler([waddr])) as (sched, saddr):
        figures["noop_classify_direct"] = classify_load(waddr, n, d)
        before = cpu_seconds(worker.pid), cpu_seconds(sched.pid)
        calls = classify_load(saddr, n, d) * d
        spent = cpu_seconds(worker.pid) - before[0], cpu_seconds(sched.pid) - before[1]
        figures["noop_classify_scheduler"] = calls / d
        figures["cpu_us_per_call_worker"] = spent[0] / calls * 1e6
        figures["cpu_us_per_call_scheduler"] = spent[1] / calls * 1e6
        ratios["noop_classify"] = calls / d / figures["noop_classify_direct"]
        ratios["cpu_per_call_scheduler_vs_worker"] = spent[1] / spent[0]
        if peer is not None:
            figures["noop_go_session_mix_direct"] = go_session_mix(peer, waddr, n, d)
            figures["noop_go_session_mix_scheduler"] = go_session_mix(peer, saddr, n, d)
            ratios["noop_go_session_mix"] = (
                figures["noop_go_session_mix_scheduler"] / figures["noop_go_session_mix_direct"]
            )
        if args.relay_floor:
            for name, script in (("relay_floor", RELAY), ("parsing_floor", PARSING_RELAY)):
                with daemon([sys.executable, "-c", script, waddr]) as (floor, faddr):
                    hop = hop_figures(worker.pid, floor.pid, faddr, peer, n, d)
                ratios[f"{name}_classify"] = hop["noop_classify"] / figures["noop_classify_direct"]
                ratios[f"cpu_per_call_{name}_vs_worker"] = hop.pop("cpu_per_call_vs_worker")
                for figure, value in hop.items():
                    figures[f"{figure}_{name}"] = value
                if peer is not None:
                    ratios[f"{name}_go_session_mix"] = (
                        hop["noop_go_session_mix"] / figures["noop_go_session_mix_direct"]
                    )
        for spin in args.cost_curve:
            env = {**os.environ, "SPIN_US": str(spin)}
            with daemon([sys.executable, "-c", RELAY, waddr], env) as (floor, faddr):
                hop = hop_figures(worker.pid, floor.pid, faddr, peer, n, d)
            name = f"cost_curve_{spin:g}us_per_frame"
            ratios[f"{name}_cpu_vs_worker"] = hop["cpu_per_call_vs_worker"]
            if peer is not None:
                mix = hop["noop_go_session_mix"] / figures["noop_go_session_mix_direct"]
                ratios[f"{name}_go_session_mix"] = mix
            else:
                ratios[f"{name}_classify"] = hop["noop_classify"] / figures["noop_classify_direct"]

    sleepy = sleepy_argv("--delay", "0.005")
    with daemon(sleepy) as (_, waddr), daemon(scheduler([waddr])) as (_, saddr):
        figures["sleepy5ms_classify_direct"] = classify_load(waddr, n, d)
        figures["sleepy5ms_classify_scheduler"] = classify_load(saddr, n, d)
        ratios["sleepy5ms_classify"] = (
            figures["sleepy5ms_classify_scheduler"] / figures["sleepy5ms_classify_direct"]
        )

    one_at_a_time = sleepy_argv("--delay", "0.005", "--slots", "1")
    with (
        daemon(one_at_a_time) as (_, a),
        daemon(one_at_a_time) as (_, b),
        daemon(one_at_a_time) as (_, c),
    ):
        for count, workers in ((1, [a]), (3, [a, b, c])):
            with daemon(scheduler(workers)) as (_, saddr):
                figures[f"scaleout_{count}_workers"] = classify_load(saddr, n, d)
    ratios["scaleout_3_vs_1"] = figures["scaleout_3_workers"] / figures["scaleout_1_workers"]

    if args.json:
        print(
            json.dumps(
                {
                    "in_flight": n,
                    "duration": d,
                    "link": _link(),
                    "figures": figures,
                    "ratios": ratios,
                    "loadavg": os.getloadavg(),
                }
            )
        )
        return
    print(
        f"{n} in flight, {d:g} s each, noop worker unless said (calls/s; CPU µs/call), "
        f"{_link()}; load average {os.getloadavg()[0]:.2f}"
    )
    for name, value in figures.items():
        print(f"  {name:48s} {value:9.1f}")
    for name, value in ratios.items():
        if name not in TARGETS:  # the floors' and the cost curve's: what a relay allows
            print(f"  {name:48s} {value:9.2f}x")
            continue
        op, target = TARGETS[name]
        met = value >= target if op == ">=" else value <= target
        print(f"  {name:48s} {value:9.2f}x  (target {op} {target}: {'ok' if met else 'MISSED'})")


if __name__ == "__main__":
    main()
