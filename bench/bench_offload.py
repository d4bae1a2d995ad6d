"""Offload overhead, side by side with Ray when Ray is installed.

    python bench/bench_offload.py [--quick]
    python bench/bench_offload.py --sandbox-ab [--pairs 5]


Measures, against a ``vaccelray worker --backend noop`` process on a unix
socket (like Ray's driver talking to its raylet), with the worker's default
pool (one process per CPU):

* sync no-op round trip: ``f.remote().result()`` in a loop (tasks/s, p50)
* 10,000 async no-op tasks: submit all, then ``get`` all (tasks/s)
* 1 MiB argument echo, one at a time (tasks/s)
* a three-stage pipeline passing 16 MiB intermediates: the input put once, each
  stage given the previous one's ref, only the last (small) result fetched
  (pipelines/s)
* cold start: ``init()`` with an embedded worker + the first result, in a fresh process
* idle RSS of the worker process and its pool processes (and their PSS)

``--floor`` measures the sync round trips against the floor of their process
layout instead: raw bytes from a client through a daemon (an asyncio relay,
like the worker) to a child process (a blocking echo, like a pool process)
and back, over unix sockets, with no framing or pickling. It prints the p50
of a sync no-op task and of a sync actor method call (an actor is a child
process of its own) as ratios to the floor's (targets <= 1.3), in
interleaved rounds against one worker, and beside them the CPU a round trip
takes in the client, the daemon and its child (robust where the p50s swing
with the machine's load). A sync task goes to the calling thread's leased
pool process (``vaccelray.client.direct``: one hop fewer than the floor's
layout, the worker out of the path), a sync actor call to the actor's
process on the thread's lane to it (``vaccelray.client.actorlanes``); the
same task and call by the worker (a client with ``VACCELRAY_DIRECT=0``) are
measured beside them.

``--pipeline`` measures only the three-stage pipeline, in interleaved rounds
of ``--rounds`` (each of ``--n`` pipelines) against Ray when it is installed:
pipelines/s of each and their ratio (target >= 2), and beside vaccelray's the
CPU one pipeline takes in the client, the worker and its pool processes.

``--object-memory`` checks the object store's memory instead: 1 GiB of 16 MiB
puts (every ref kept) into a worker with ``--object-memory 256M``; it prints the
worker's RSS growth against that budget (the target: within 10%) and what was
spilled to disk.

``--sandbox-ab`` measures what the task sandbox costs instead: the sync no-op
rate against a sandboxed worker (the default) and one started with
``--unsafe-no-sandbox``, both up at once, in interleaved pairs (the median
ratio; the target is >= 0.9), and the embedded worker's cold start (target
<= 0.5 s). Sandboxing is per pool process, so the rates should match.

Ray is never a dependency: without it, the anchors measured on the
reference machine (DESIGN.md §10) are printed instead. To compare side by
side, install Ray and vaccelray in a separate venv and run the bench in a
private network namespace, so that Ray's node address is loopback:

    python -m venv /tmp/rayvenv && /tmp/rayvenv/bin/pip install ray -e .
    unshare -n sh -c 'ip link set lo up; RAY_USAGE_STATS_ENABLED=0 \
        /tmp/rayvenv/bin/python bench/bench_offload.py'
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

RAY_ANCHORS = {
    "sync": "~500 tasks/s, p50 1.8 ms",
    "actor": "1,200-1,680 calls/s",
    "async": "~1,800 tasks/s",
    "cold": "2.6 s",
    "rss": "~770 MiB over 10 processes",
    "echo": "(Go ttrpc 1 MiB echo, 1 in flight: ~140 calls/s)",
    "pipeline": "(not measured here: run with Ray installed)",
}


def noop() -> None:
    return None


def stage(data: bytes) -> bytes:
    """A pipeline stage: as large as its input."""
    return data[::-1]


def size_of(data: bytes) -> int:
    """The pipeline's last stage: a small result."""
    return len(data)


PIPELINE_MIB = 16


def echo(data: bytes) -> bytes:
    return data


def start_worker(address: str, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vaccelray",
            "worker",
            "-a",
            address,
            "--backend",
            "noop",
            "--log-level",
            "info",
            "--no-announce",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    startup = []
    for line in process.stderr:
        startup.append(line)
        if "Listening on" in line:
            break
    process.startup = startup  # type: ignore[attr-defined]
    threading.Thread(target=lambda: [None for _ in process.stderr or ()], daemon=True).start()
    return process


def segment_bytes(pids: list[int]) -> int:
    """Bytes of the shared-memory segments (memfds) *pids* hold open, each counted once:
    the object store keeps large objects in them, outside any process's RSS."""
    seen, total = set(), 0
    for p in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{p}/fd/{fd}").startswith("/memfd:"):
                        info = os.stat(f"/proc/{p}/fd/{fd}")
                        if info.st_ino not in seen:
                            seen.add(info.st_ino)
                            total += info.st_blocks * 512
    return total


def memory(pid: int) -> tuple[float, float]:
    """RSS and PSS of *pid* and its descendants (pool processes, their sandboxes), in MiB,
    each with the shared-memory segments they hold added."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        children = Path(f"/proc/{p}/task/{p}/children")
        if children.exists():
            todo += [int(c) for c in children.read_text().split()]
    rss = pss = 0
    for p in pids:
        text = Path(f"/proc/{p}/smaps_rollup").read_text()
        rss += int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        pss += int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    shared = segment_bytes(pids) / 1024
    return (rss + shared) / 1024, (pss + shared) / 1024


COLD = """
import time, sys
t0 = time.perf_counter()
import vaccelray
def noop(): return None
vaccelray.init(backend="noop")
vaccelray.get(vaccelray.offload(noop).remote())
print(time.perf_counter() - t0)
vaccelray.shutdown()
"""


def cold_start(runs: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VACCELRAY_", "VACCEL_"))}
    times = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", COLD], capture_output=True, text=True, env=env, check=True
        )
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return times


def bench_vaccelray(quick: bool) -> dict[str, str]:
    import vaccelray

    n_sync, n_async, n_echo = (1000, 2000, 100) if quick else (5000, 10000, 500)
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        worker = start_worker(f"unix://{tmp}/worker.sock")
        try:
            time.sleep(1.0)  # let the pool finish starting
            rss, pss = memory(worker.pid)  # idle: before any large message kept a heap
            results["rss"] = f"{rss:.0f} MiB RSS ({pss:.0f} MiB PSS), worker + pool"
            with vaccelray.Client(f"unix://{tmp}/worker.sock") as client:
                f, e = vaccelray.offload(noop), vaccelray.offload(echo)
                results["sync"] = timed_sync(lambda: client.submit(f).result(), n_sync, "tasks")
                actor = vaccelray.offload(Nop).remote_on(client)
                results["actor"] = timed_sync(lambda: actor.nop.remote().result(), n_sync, "calls")

                start = time.perf_counter()
                vaccelray.get([client.submit(f) for _ in range(n_async)])
                results["async"] = f"{n_async / (time.perf_counter() - start):,.0f} tasks/s"

                blob = os.urandom(1 << 20)
                assert client.submit(e, blob).result() == blob
                start = time.perf_counter()
                for _ in range(n_echo):
                    client.submit(e, blob).result()
                results["echo"] = f"{n_echo / (time.perf_counter() - start):,.0f} tasks/s"

                first, last = vaccelray.offload(stage), vaccelray.offload(size_of)
                n_pipe = 5 if quick else 20
                data = os.urandom(PIPELINE_MIB << 20)

                def pipeline() -> int:
                    middle = client.submit(first, client.submit(first, client.put(data)))
                    return client.submit(last, middle).result()

                assert pipeline() == len(data)
                start = time.perf_counter()
                for _ in range(n_pipe):
                    pipeline()
                results["pipeline"] = f"{n_pipe / (time.perf_counter() - start):,.1f} pipelines/s"
            time.sleep(0.5)
            # Each daemon process keeps up to 128 MiB of freed heap (vaccelray.allocator).
            rss, pss = memory(worker.pid)
            results["rss_after"] = f"{rss:.0f} MiB RSS ({pss:.0f} MiB PSS), worker + pool"
        finally:
            worker.terminate()
            worker.wait(10)
    colds = cold_start(3 if quick else 5)
    results["cold"] = f"{statistics.median(colds):.3f} s (median of {len(colds)})"
    return results


FLOOR_CHILD = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    data = s.recv(65536)
    if not data:
        break
    s.sendall(data)
"""

FLOOR_DAEMON = """
import asyncio, socket, subprocess, sys

async def main(path, child_code):
    parent, child = socket.socketpair()
    subprocess.Popen([sys.executable, "-c", child_code, str(child.fileno())],
                     pass_fds=(child.fileno(),))
    child.close()
    loop = asyncio.get_running_loop()
    clients = []

    class FromChild(asyncio.Protocol):
        def data_received(self, data):
            clients[-1].write(data)

    to_child, _ = await loop.create_unix_connection(FromChild, sock=parent)

    class FromClient(asyncio.Protocol):
        def connection_made(self, transport):
            clients.append(transport)
        def data_received(self, data):
            to_child.write(data)

    await loop.create_unix_server(FromClient, path)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def p50_of(call: Callable[[], object], n: int) -> float:
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    return statistics.median(lat)


def descendants(pid: int) -> list[int]:
    """*pid*'s children, theirs, and so on (a sandboxed pool process sits under bwrap)."""
    found, todo = [], [pid]
    while todo:
        children = Path(f"/proc/{todo.pop()}/task")
        for task in children.iterdir() if children.exists() else ():
            with contextlib.suppress(OSError):
                kids = [int(c) for c in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of *pids* (all their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def measured(
    call: Callable[[], object], n: int, daemon: int, children: list[int]
) -> dict[str, float]:
    """The p50 of *n* calls and the CPU per call of the client, the daemon and its *children*."""
    client, own, kids = time.process_time(), cpu_seconds([daemon]), cpu_seconds(children)
    p50 = p50_of(call, n)
    return {
        "p50": p50,
        "client": (time.process_time() - client) / n,
        "daemon": (cpu_seconds([daemon]) - own) / n,
        "child": (cpu_seconds(children) - kids) / n,
    }


class Nop:
    def nop(self) -> None:
        return None


def bench_floor(rounds: int, quick: bool) -> None:
    """Sync no-op task and actor call p50s as ratios to the raw-bytes floor, interleaved.

    Beside each p50, the CPU one round trip takes in each process (client,
    daemon, child): on a loaded machine the p50s swing with the scheduler,
    the CPU much less, and the work a round trip costs is what can be cut.
    """
    import vaccelray

    n = 500 if quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        floor_path = f"{tmp}/floor.sock"
        relay = subprocess.Popen(
            [sys.executable, "-c", FLOOR_DAEMON, floor_path, FLOOR_CHILD],
            stdout=subprocess.PIPE,
            text=True,
        )
        worker = start_worker(f"unix://{tmp}/worker.sock")
        try:
            assert relay.stdout is not None
            assert relay.stdout.readline().strip() == "ready"
            time.sleep(1.0)  # let the pool finish starting
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(floor_path)
            os.environ["VACCELRAY_DIRECT"] = "0"
            by_worker = vaccelray.Client(f"unix://{tmp}/worker.sock")
            del os.environ["VACCELRAY_DIRECT"]
            with sock, by_worker, vaccelray.Client(f"unix://{tmp}/worker.sock") as client:
                pool = descendants(worker.pid)
                f = vaccelray.offload(noop)
                actor = vaccelray.offload(Nop).remote_on(client)
                actor.ready().result()
                actor_tree = [p for p in descendants(worker.pid) if p not in pool]
                actor_by_worker = vaccelray.offload(Nop).remote_on(by_worker)
                actor_by_worker.ready().result()
                other_tree = [p for p in descendants(worker.pid) if p not in pool + actor_tree]

                def floor() -> None:
                    sock.sendall(b"x")
                    sock.recv(1)

                def task() -> None:
                    client.submit(f).result()

                def task_by_worker() -> None:
                    by_worker.submit(f).result()

                def method() -> None:
                    actor.nop.remote().result()

                def method_by_worker() -> None:
                    actor_by_worker.nop.remote().result()

                for warm in (floor, task, task_by_worker, method, method_by_worker):
                    p50_of(warm, 200)
                # The thread's leased pool process (vaccelray.client.direct), started meanwhile.
                actors = actor_tree + other_tree
                leased = [p for p in descendants(worker.pid) if p not in pool + actors]
                layouts = {
                    "floor": (floor, relay.pid, descendants(relay.pid)),
                    "task": (task, worker.pid, leased),
                    "task by the worker": (task_by_worker, worker.pid, pool),
                    "actor": (method, worker.pid, actor_tree),
                    "actor by the worker": (method_by_worker, worker.pid, other_tree),
                }
                rows = []
                for i in range(rounds):
                    row = {k: measured(c, n, d, kids) for k, (c, d, kids) in layouts.items()}
                    rows.append(row)
                    print(f"round {i + 1}:", ", ".join(
                        f"{k} p50 {r['p50'] * 1e6:.0f} us (cpu {cpu_of(r) * 1e6:.0f} us)"
                        for k, r in row.items()
                    ))  # fmt: skip
                print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
                labels = (
                    ("task", "sync no-op task"),
                    ("task by the worker", "  (the same, VACCELRAY_DIRECT=0)"),
                    ("actor", "sync actor call"),
                    ("actor by the worker", "  (the same, VACCELRAY_DIRECT=0)"),
                )
                for key, label in labels:
                    ratio = statistics.median(r[key]["p50"] / r["floor"]["p50"] for r in rows)
                    cpu = statistics.median(cpu_of(r[key]) / cpu_of(r["floor"]) for r in rows)
                    parts = " + ".join(
                        f"{part} {statistics.median(r[key][part] for r in rows) * 1e6:.0f}"
                        for part in ("client", "daemon", "child")
                    )
                    print(
                        f"{label} p50 / floor p50: median {ratio:.2f}x (target <= 1.3); "
                        f"CPU per call / floor's: {cpu:.2f}x ({parts} us)"
                    )
                floor_parts = " + ".join(
                    f"{part} {statistics.median(r['floor'][part] for r in rows) * 1e6:.0f}"
                    for part in ("client", "daemon", "child")
                )
                print(f"floor CPU per round trip: {floor_parts} us")
        finally:
            for process in (relay, worker):
                process.terminate()
                process.wait(10)


def bench_pipeline(rounds: int, n: int) -> None:
    """The 16 MiB three-stage pipeline alone, interleaved rounds against Ray if installed."""
    import vaccelray

    try:
        import ray
    except ImportError:
        ray = None
    data = os.urandom(PIPELINE_MIB << 20)
    with tempfile.TemporaryDirectory() as tmp:
        worker = start_worker(f"unix://{tmp}/worker.sock")
        try:
            time.sleep(1.0)  # let the pool finish starting
            pool = descendants(worker.pid)
            with vaccelray.Client(f"unix://{tmp}/worker.sock") as client:
                first, last = vaccelray.offload(stage), vaccelray.offload(size_of)

                def ours() -> int:
                    middle = client.submit(first, client.submit(first, client.put(data)))
                    return client.submit(last, middle).result()

                theirs: Callable[[], int] | None = None
                if ray is not None:
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
                    r_first, r_last = ray.remote(stage), ray.remote(size_of)

                    def theirs() -> int:
                        return ray.get(r_last.remote(r_first.remote(r_first.remote(ray.put(data)))))  # type: ignore[no-any-return]

                for call in (ours, theirs):
                    if call is not None:
                        assert call() == len(data)
                ratios = []
                for i in range(rounds):
                    row = measured(ours, n, worker.pid, pool)
                    line = (
                        f"round {i + 1}: vaccelray {1 / row['p50']:.1f} pipelines/s "
                        f"(p50 {row['p50'] * 1e3:.0f} ms; cpu per pipeline: client "
                        f"{row['client'] * 1e3:.0f} + worker {row['daemon'] * 1e3:.0f} + "
                        f"pool {row['child'] * 1e3:.0f} ms)"
                    )
                    if theirs is not None:
                        mine = {worker.pid, *descendants(worker.pid)}
                        ray_pids = [p for p in descendants(os.getpid()) if p not in mine]
                        driver, cpu = time.process_time(), cpu_seconds(ray_pids)
                        p50 = p50_of(theirs, n)
                        cpu = cpu_seconds(ray_pids) - cpu + time.process_time() - driver
                        ratios.append(p50 / row["p50"])
                        line += (
                            f", ray {1 / p50:.1f} pipelines/s (cpu {cpu / n * 1e3:.0f} ms), "
                            f"ratio {ratios[-1]:.2f}"
                        )
                    print(line, flush=True)
                print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
                if ratios:
                    print(f"vaccelray / ray: median {statistics.median(ratios):.2f}x (target >= 2)")
                if ray is not None:
                    ray.shutdown()
        finally:
            worker.terminate()
            worker.wait(10)


def timed_sync(call: Callable[[], object], n: int, what: str) -> str:
    """The rate and p50 of *n* sync calls, after 200 to warm up."""
    for _ in range(200):
        call()
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    rate = n / (time.perf_counter() - start)
    return f"{rate:,.0f} {what}/s, p50 {statistics.median(lat) * 1e3:.2f} ms"


def cpu_of(row: dict[str, float]) -> float:
    return row["client"] + row["daemon"] + row["child"]


def sync_rate(client: object, fn: object, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        client.submit(fn).result()  # type: ignore[attr-defined]
    return n / (time.perf_counter() - start)


def bench_sandbox(pairs: int, quick: bool) -> None:
    """Sync no-op rate, sandboxed vs --unsafe-no-sandbox, interleaved; embedded cold start."""
    import vaccelray

    n = 300 if quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        workers = {
            "sandbox": start_worker(f"unix://{tmp}/sandboxed.sock"),
            "unsafe": start_worker(f"unix://{tmp}/unsafe.sock", "--unsafe-no-sandbox"),
        }
        try:
            time.sleep(1.0)  # let the pools finish starting
            clients = {
                k: vaccelray.Client(f"unix://{tmp}/{'sandboxed' if k == 'sandbox' else k}.sock")
                for k in workers
            }
            f = vaccelray.offload(noop)
            for client in clients.values():
                sync_rate(client, f, 200)  # warm: functions shipped to every process
            ratios = []
            for i in range(pairs):
                order = ("sandbox", "unsafe") if i % 2 == 0 else ("unsafe", "sandbox")
                rates = {k: sync_rate(clients[k], f, n) for k in order}
                ratios.append(rates["sandbox"] / rates["unsafe"])
                print(
                    f"pair {i + 1}: sandbox {rates['sandbox']:,.0f} tasks/s, "
                    f"unsafe {rates['unsafe']:,.0f} tasks/s, ratio {ratios[-1]:.3f}"
                )
            for client in clients.values():
                client.shutdown()
        finally:
            for worker in workers.values():
                worker.terminate()
                worker.wait(10)
    print(
        f"median ratio sandbox / unsafe: {statistics.median(ratios):.3f} "
        f"({pairs} pairs of {n} sync no-op tasks; target >= 0.9)"
    )
    colds = cold_start(3 if quick else 5)
    print(
        f"embedded cold start + first result: median {statistics.median(colds):.3f} s "
        f"of {len(colds)} (target <= 0.5 s): " + ", ".join(f"{c:.3f}" for c in colds)
    )


def bench_store_memory(budget_mib: int = 256, total_mib: int = 1024) -> None:
    """1 GiB of 16 MiB puts (refs kept) into a store of *budget_mib* in memory."""
    import vaccelray

    with tempfile.TemporaryDirectory() as tmp:
        worker = start_worker(
            f"unix://{tmp}/worker.sock", "--object-memory", f"{budget_mib}M",
            "--object-disk", f"{2 * total_mib}M",
        )  # fmt: skip
        try:
            time.sleep(1.0)
            startup = "".join(worker.startup)  # type: ignore[attr-defined]
            found = re.search(r"Objects: .* on disk in (\S+),", startup)
            spill = Path(found.group(1)) if found else None
            with vaccelray.Client(f"unix://{tmp}/worker.sock") as client:
                client.put(b"warm up")
                before = memory(worker.pid)[0]
                chunk = os.urandom(PIPELINE_MIB << 20)
                refs = [client.put(chunk) for _ in range(total_mib // PIPELINE_MIB)]
                time.sleep(0.5)
                grown = memory(worker.pid)[0] - before
                spilled = sum(p.stat().st_size for p in spill.iterdir()) if spill else 0
                print(
                    f"object store: {total_mib} MiB put in {len(refs)} objects, budget "
                    f"{budget_mib} MiB in memory: worker RSS + segments grew {grown:.0f} MiB "
                    f"({grown / budget_mib - 1:+.1%} of the budget; target within 10%), "
                    f"{spilled / (1 << 20):.0f} MiB spilled to disk"
                )
        finally:
            worker.terminate()
            worker.wait(10)


def bench_ray(quick: bool) -> dict[str, str]:
    import ray

    n_sync, n_async, n_echo = (1000, 2000, 100) if quick else (5000, 10000, 500)
    results: dict[str, str] = {}
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    f, e = ray.remote(noop), ray.remote(echo)
    ray.get(f.remote())
    results["cold"] = f"{time.perf_counter() - start:.3f} s"
    results["sync"] = timed_sync(lambda: ray.get(f.remote()), n_sync, "tasks")
    actor = ray.remote(Nop).remote()
    results["actor"] = timed_sync(lambda: ray.get(actor.nop.remote()), n_sync, "calls")
    start = time.perf_counter()
    ray.get([f.remote() for _ in range(n_async)])
    results["async"] = f"{n_async / (time.perf_counter() - start):,.0f} tasks/s"
    blob = os.urandom(1 << 20)
    start = time.perf_counter()
    for _ in range(n_echo):
        ray.get(e.remote(blob))
    results["echo"] = f"{n_echo / (time.perf_counter() - start):,.0f} tasks/s"
    first, last = ray.remote(stage), ray.remote(size_of)
    n_pipe = 5 if quick else 20
    data = os.urandom(PIPELINE_MIB << 20)

    def pipeline() -> int:
        return ray.get(last.remote(first.remote(first.remote(ray.put(data)))))  # type: ignore[no-any-return]

    assert pipeline() == len(data)
    start = time.perf_counter()
    for _ in range(n_pipe):
        pipeline()
    results["pipeline"] = f"{n_pipe / (time.perf_counter() - start):,.1f} pipelines/s"
    ray.shutdown()
    results["rss"] = "(see DESIGN.md §10)"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument(
        "--sandbox-ab",
        action="store_true",
        help="only the cost of the task sandbox (A/B against no sandbox)",
    )
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs (--sandbox-ab)")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="only the sync task and actor call p50s against the raw-bytes floor",
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="only the 16 MiB pipeline (against Ray if there)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds (--floor, --pipeline)"
    )
    parser.add_argument("--n", type=int, default=10, help="pipelines a round (--pipeline)")
    parser.add_argument(
        "--object-memory",
        action="store_true",
        help="only the object store's memory under 1 GiB of puts, against its budget",
    )
    args = parser.parse_args()
    if args.object_memory:
        bench_store_memory()
        return
    if args.pipeline:
        bench_pipeline(args.rounds, args.n)
        return
    if args.floor:
        bench_floor(args.rounds, args.quick)
        return
    if args.sandbox_ab:
        bench_sandbox(args.pairs, args.quick)
        return
    ours = bench_vaccelray(args.quick)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("ray not installed; Ray figures are the DESIGN.md §10 anchors")
        theirs = RAY_ANCHORS
    else:
        theirs = bench_ray(args.quick)
    labels = {
        "sync": "sync no-op round trip",
        "actor": "sync actor method call",
        "async": "10,000 async no-op tasks" if not args.quick else "2,000 async no-op tasks",
        "echo": "1 MiB argument echo",
        "pipeline": f"3-stage pipeline, {PIPELINE_MIB} MiB",
        "cold": "cold start + first result",
        "rss": "idle memory, worker + pool",
        "rss_after": "memory after the workloads",
    }
    print(f"CPUs: {os.cpu_count()}  python {sys.version.split()[0]}")
    print(f"{'':28} {'vaccelray':44} ray")
    for key, label in labels.items():
        print(f"{label:28} {ours[key]:44} {theirs.get(key, '')}")


if __name__ == "__main__":
    main()
