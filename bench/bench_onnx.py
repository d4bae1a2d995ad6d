"""Benchmark the ``onnx`` backend: dynamic batching against one image per inference.

Usage: python bench/bench_onnx.py [--calls 192] [--repeat 3] [--max-batch 32]
                                  [--max-wait-ms 5] [--via worker|backend]

Prints, from one run:

* model load time (a build into an empty cache, then a load from the cache),
  the process RSS with the model loaded;
* single-image latency (one call at a time);
* end-to-end classify throughput with 8 and 32 calls in flight, for the
  batching backend and for batch size 1 (``--via worker``, the default: real
  vAccel ``ImageClassification`` calls through a worker over ttrpc on
  127.0.0.1; ``--via backend``: the backend called from threads);
* onnxruntime's own batch-32 rate on ready tensors;
* the ratios against the targets (batched at 32 in flight >= 1.3x batch size 1,
  >= 0.8x the raw batch-32 rate).

Measurements are interleaved and repeated; each figure is the median of
``--repeat`` runs, so a noisy machine moves all of them alike.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vaccelray.worker.onnx import OnnxBackend, onnx_available  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sample_images() -> list[bytes]:
    """The example JPEGs (CC0 scikit-image samples), or the same encoded on the fly."""
    files = [REPO / "examples" / "cat.jpeg", REPO / "examples" / "coffee.jpeg"]
    if all(f.is_file() for f in files):
        return [f.read_bytes() for f in files]
    import skimage.data
    from PIL import Image

    out = []
    for array in (skimage.data.chelsea(), skimage.data.coffee()):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def threaded_rate(backend: OnnxBackend, images: list[bytes], inflight: int, calls: int) -> float:
    """Calls per second with *inflight* threads each classifying in a loop."""
    counter = iter(range(calls))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                backend.classify(0, images[i % len(images)])
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(inflight)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return calls / elapsed


class WorkerRunner:
    """A worker per backend on 127.0.0.1 and one ttrpc client each, in a background loop."""

    def __init__(self, backends: dict[str, OnnxBackend]) -> None:
        self.backends = backends
        self._portal_cm: Any = None

    def __enter__(self) -> WorkerRunner:
        from anyio.from_thread import start_blocking_portal

        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.clients: dict[str, Any] = {}
        self._cms: list[Any] = []
        for name, backend in self.backends.items():
            cm = self.portal.wrap_async_context_manager(self._serve(backend))
            self._cms.append(cm)
            self.clients[name] = cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for cm in reversed(self._cms):
            cm.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)

    @staticmethod
    def _serve(backend: OnnxBackend) -> Any:
        from contextlib import asynccontextmanager

        from vaccelray.agent_client import AgentClient
        from vaccelray.transport.client import connect
        from vaccelray.worker.daemon import WorkerConfig, run_worker

        @asynccontextmanager
        async def cm() -> Any:
            config = WorkerConfig(addresses=("tcp://127.0.0.1:0",))
            async with (
                run_worker(config, backend=backend) as worker,
                connect(worker.addresses[0]) as client,
            ):
                agent = AgentClient(client, timeout=60.0)
                session = await agent.create_session()
                yield agent, session

        return cm()

    def rate(self, name: str, images: list[bytes], inflight: int, calls: int) -> float:
        agent, session = self.clients[name]

        async def run() -> float:
            remaining = calls

            async def loop() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    tag = await agent.classify(session, images[remaining % len(images)])
                    if not tag:
                        raise RuntimeError("empty tag")

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(inflight):
                    tg.start_soon(loop)
            return calls / (time.perf_counter() - start)

        result: float = self.portal.call(run)
        return result


def median_of(repeat: int, fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(repeat)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=192, help="classify calls per measurement")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    parser.add_argument("--no-split", action="store_true", help="run batches whole")
    parser.add_argument("--no-spin", action="store_true", help="idle onnxruntime threads sleep")
    parser.add_argument("--via", choices=("worker", "backend"), default="worker")
    args = parser.parse_args()
    if not onnx_available():
        sys.exit("the onnx extra is not installed: pip install 'vaccelray[onnx]'")

    tuning: dict[str, Any] = {
        "threads": args.threads,
        "split_batches": not args.no_split,
        "spin": not args.no_spin,
    }
    images = sample_images()
    print(f"cpus {os.cpu_count()}, images {[len(i) for i in images]} bytes, via {args.via}")

    with tempfile.TemporaryDirectory() as cache:
        rss0 = rss_mib()
        batched = OnnxBackend(
            max_batch=args.max_batch,
            max_wait=args.max_wait_ms / 1000,
            **tuning,
            cache_dir=cache,
        )
        batched.start()
        rss1 = rss_mib()
        build_s = batched.load_seconds
        probe = OnnxBackend(cache_dir=cache, **tuning)
        probe.start()
        cached_s = probe.load_seconds
        probe.close()
        del probe
        single = OnnxBackend(max_batch=1, **tuning, cache_dir=cache)
        single.start()
        print(
            f"model load: {build_s * 1000:.0f} ms building into an empty cache "
            f"(first in process, includes importing onnxruntime), "
            f"{cached_s * 1000:.0f} ms from the cache"
        )
        print(f"RSS: {rss0:.0f} MiB before, {rss1:.0f} MiB with the model loaded")

        import numpy as np

        from vaccelray.worker.onnx.preprocess import preprocess

        tensors = np.stack([preprocess(images[i % len(images)]) for i in range(32)])
        for img in images:  # warm up
            batched.classify(0, img)
            single.classify(0, img)

        latencies = []
        for i in range(40):
            t = time.perf_counter()
            single.classify(0, images[i % len(images)])
            latencies.append(time.perf_counter() - t)
        print(
            f"single-image latency (backend, one call at a time): "
            f"median {statistics.median(latencies) * 1000:.1f} ms, "
            f"min {min(latencies) * 1000:.1f} ms"
        )

        def raw_rate(batch: int) -> float:
            """onnxruntime alone on the 32 ready tensors, *batch* at a time (img/s)."""
            t = time.perf_counter()
            for start in range(0, len(tensors), batch):
                batched.infer(tensors[start : start + batch])
            return len(tensors) / (time.perf_counter() - t)

        results: dict[str, list[float]] = {}
        configs: list[tuple[str, str, int]] = [
            (f"batched(max {args.max_batch})", "batched", 8),
            ("batch size 1", "single", 8),
            (f"batched(max {args.max_batch})", "batched", 32),
            ("batch size 1", "single", 32),
        ]
        backends = {"batched": batched, "single": single}

        def measure(rate: Callable[[str, int], float]) -> None:
            rate("batched", 8)  # warm-up
            rate("single", 8)
            for _ in range(args.repeat):
                for label, name, inflight in configs:
                    results.setdefault(f"{label} @{inflight}", []).append(rate(name, inflight))
                for batch in (1, 32):
                    raw_rate(batch)
                    results.setdefault(f"raw onnxruntime batch {batch}", []).append(
                        statistics.median(raw_rate(batch) for _ in range(3))
                    )

        if args.via == "worker":
            with WorkerRunner(backends) as runner:
                lat = []
                for i in range(20):
                    t = time.perf_counter()
                    runner.rate("single", [images[i % len(images)]], 1, 1)
                    lat.append(time.perf_counter() - t)
                print(
                    f"single-image latency (through the worker over ttrpc): "
                    f"median {statistics.median(lat) * 1000:.1f} ms"
                )
                measure(lambda name, inflight: runner.rate(name, images, inflight, args.calls))
        else:
            measure(
                lambda name, inflight: threaded_rate(backends[name], images, inflight, args.calls)
            )

        print(f"\nthroughput, images/s (median of {args.repeat}; all runs):")
        med = {}
        for key, values in results.items():
            med[key] = statistics.median(values)
            runs = ", ".join(f"{v:.1f}" for v in values)
            print(f"  {key:32s} {med[key]:7.1f}   [{runs}]")
        stats = batched.stats
        print(
            f"batched backend: {stats.inputs} images in {stats.batches} inferences "
            f"(mean {stats.inputs / max(stats.batches, 1):.1f}, largest {stats.largest})"
        )
        b32 = med[f"batched(max {args.max_batch}) @32"]
        s32 = med["batch size 1 @32"]
        raw = med["raw onnxruntime batch 32"]
        r1 = b32 / s32
        r2 = b32 / raw
        verdict = {True: "ok", False: "MISSED"}
        print(f"\nbatched @32 / batch size 1 @32 = {r1:.2f}  (target >= 1.3: {verdict[r1 >= 1.3]})")
        print(f"batched @32 / raw batch 32      = {r2:.2f}  (target >= 0.8: {verdict[r2 >= 0.8]})")
        batched.close()
        single.close()


if __name__ == "__main__":
    main()
