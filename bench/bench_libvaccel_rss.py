"""RSS growth over 10,000 image classifications through the libvaccel ctypes backend.

Builds the libvaccel test double (tests/cdouble, needs ``cc``), then:

1. calls ``LibvaccelBackend.classify`` 10,000 times directly (the ctypes path);
2. runs a worker with that backend and sends 10,000 ImageClassification calls
   over ttrpc from a client in the same process (worker + client RSS).

Each phase warms up first, then reports VmRSS before and after. The target
is < 5 MiB of growth. Usage: ``python bench/bench_libvaccel_rss.py [--calls N]
[--generation current|0.7|0.6|0.5]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 5.0


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def report(label: str, calls: int, before: int, after: int, seconds: float) -> bool:
    growth = (after - before) / 1024
    ok = growth <= LIMIT_MIB
    print(
        f"{label:<28} {calls:>6} calls  RSS {before / 1024:7.1f} -> {after / 1024:7.1f} MiB  "
        f"growth {growth:+6.2f} MiB  {seconds * 1e6 / calls:7.1f} us/call  "
        f"{'OK' if ok else 'OVER'} (limit {LIMIT_MIB} MiB)"
    )
    return ok


def bench_direct(plugin: str, libvaccel: str, calls: int, image: bytes) -> bool:
    from vaccelray.worker.libvaccel import LibvaccelBackend

    backend = LibvaccelBackend(plugin, libvaccel=libvaccel)
    backend.start()
    handle = backend.session_create(1, 0)
    for _ in range(500):
        backend.classify(handle, image)
    gc.collect()
    before = rss_kib()
    t0 = time.perf_counter()
    for _ in range(calls):
        backend.classify(handle, image)
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = rss_kib()
    backend.session_release(handle)
    print(f"backend: {backend.describe()}")
    return report("ctypes backend (direct)", calls, before, after, elapsed)


async def bench_worker(plugin: str, libvaccel: str, calls: int, image: bytes) -> bool:
    from vaccelray.protocol._pb import vaccel_pb2 as pb
    from vaccelray.transport.client import connect
    from vaccelray.worker.daemon import WorkerConfig, run_worker

    config = WorkerConfig(
        addresses=("tcp://127.0.0.1:0",), backend=plugin, libvaccel=libvaccel
    )
    async with run_worker(config) as worker, connect(worker.addresses[0]) as client:
        service = "vaccel.VaccelAgent"
        created = await client.call_message(
            service, "CreateSession", pb.CreateSessionRequest(), pb.CreateSessionResponse
        )
        request = pb.ImageClassificationRequest(session_id=created.session_id, image=image)

        async def one() -> None:
            answer = await client.call_message(
                service, "ImageClassification", request, pb.ImageClassificationResponse
            )
            assert answer.tags.startswith(b"This is a dummy classification tag!")

        for _ in range(500):
            await one()
        gc.collect()
        before = rss_kib()
        t0 = time.perf_counter()
        for _ in range(calls):
            await one()
        elapsed = time.perf_counter() - t0
        gc.collect()
        after = rss_kib()
    return report("worker over ttrpc (e2e)", calls, before, after, elapsed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--generation", default="current")
    parser.add_argument("--image-size", type=int, default=64 * 1024)
    args = parser.parse_args()
    os.environ.pop("VDOUBLE_LOG", None)  # no call log: measure the binding only
    sys.path.insert(0, str(ROOT))
    from tests.cdouble import build

    image = os.urandom(args.image_size)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        direct = build.build_double(args.generation, Path(tmp) / "direct")
        ok &= bench_direct(str(direct.plugin), str(direct.libvaccel), args.calls, image)
        e2e = build.build_double(args.generation, Path(tmp) / "e2e")
        ok &= anyio.run(bench_worker, str(e2e.plugin), str(e2e.libvaccel), args.calls, image)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
