"""The built-in ``onnx`` backend: EfficientNet-Lite0 on onnxruntime with dynamic batching.

Skipped when the ``onnx`` extra is not installed, except under CI (``CI`` set),
where the extra is installed and a missing one must fail.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import LIVENESS, finishes, until
from vaccelray.errors import RPCError, StatusCode
from vaccelray.worker.onnx import OnnxBackend, onnx_available

_HAVE_EXTRA = onnx_available() and importlib.util.find_spec("skimage") is not None
if not _HAVE_EXTRA and not os.environ.get("CI"):
    pytest.skip(
        "the onnx extra is not installed (pip install 'vaccelray[onnx,test]')",
        allow_module_level=True,
    )

CAT_CLASSES = {
    "tabby, tabby cat",
    "tiger cat",
    "Persian cat",
    "Siamese cat, Siamese",
    "Egyptian cat",
}
COFFEE_CLASSES = {"espresso", "cup", "coffee mug"}


def test_extra_is_installed() -> None:
    assert onnx_available(), "pip install 'vaccelray[onnx]'"
    assert importlib.util.find_spec("skimage") is not None, "pip install scikit-image"


# -- images ------------------------------------------------------------------


def encode(array: Any, fmt: str = "JPEG", mode: str | None = None, **kw: Any) -> bytes:
    from PIL import Image

    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cat() -> bytes:
    import skimage.data

    return encode(skimage.data.chelsea(), quality=90)


@pytest.fixture(scope="module")
def coffee() -> bytes:
    import skimage.data

    return encode(skimage.data.coffee(), quality=90)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vaccelray-cache")


@pytest.fixture(scope="module")
def backend(model_cache: Path) -> Iterator[OnnxBackend]:
    be = OnnxBackend(cache_dir=model_cache, max_batch=8, max_wait=0.05)
    be.start()
    yield be
    be.close()


def top_labels(result: Any, n: int = 3) -> list[str]:
    return [label for label, _ in result.labels[:n]]


# -- answers -----------------------------------------------------------------


def test_cat_photo_is_a_cat(backend: OnnxBackend, cat: bytes) -> None:
    result = backend.classify(backend.session_create(1, 0), cat)
    assert CAT_CLASSES & set(top_labels(result)), result.labels
    assert result.tag == result.labels[0][0]
    assert result.tag in CAT_CLASSES
    scores = [score for _, score in result.labels]
    assert len(scores) == 5
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s <= 1.0 for s in scores)
    assert sum(scores[:3]) > 0.5


def test_coffee_photo_is_espresso(backend: OnnxBackend, coffee: bytes) -> None:
    result = backend.classify(None, coffee, top_k=3)
    assert len(result.labels) == 3
    assert COFFEE_CLASSES & set(top_labels(result)), result.labels
    assert result.tag == "espresso"


def test_top_k(backend: OnnxBackend, cat: bytes) -> None:
    one = backend.classify(None, cat, top_k=1)
    many = backend.classify(None, cat, top_k=20)
    assert len(one.labels) == 1
    assert len(many.labels) == 20
    assert many.labels[0] == one.labels[0]
    assert len(backend.classify(None, cat, top_k=5000).labels) == 1000
    with pytest.raises(RPCError) as info:
        backend.classify(None, cat, top_k=0)
    assert info.value.code == StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("fmt", "mode", "kw"),
    [
        ("PNG", None, {}),
        ("BMP", None, {}),
        ("WEBP", None, {"quality": 90}),
        ("TIFF", None, {}),
        ("PNG", "RGBA", {}),
        ("GIF", "P", {}),
        ("JPEG", "L", {"quality": 90}),
        ("JPEG", "CMYK", {"quality": 95}),
    ],
)
def test_any_pillow_format(backend: OnnxBackend, fmt: str, mode: str | None, kw: Any) -> None:
    import skimage.data

    data = encode(skimage.data.chelsea(), fmt, mode, **kw)
    result = backend.classify(None, data, top_k=5)
    assert CAT_CLASSES & set(top_labels(result, 5)), (fmt, mode, result.labels)


def test_large_jpeg_is_decoded_at_reduced_scale(backend: OnnxBackend) -> None:
    import numpy as np
    import skimage.data
    from PIL import Image

    big = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((1804, 1200)))
    result = backend.classify(None, encode(big, quality=90), top_k=5)
    assert CAT_CLASSES & set(top_labels(result)), result.labels


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"this is not an image",
        bytes(range(256)) * 40,
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        b"GIF89a",
    ],
    ids=["empty", "text", "noise", "png-header-only", "gif-header-only"],
)
def test_non_image_is_invalid_argument(backend: OnnxBackend, payload: bytes, cat: bytes) -> None:
    with pytest.raises(RPCError) as info:
        backend.classify(None, payload)
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "image" in info.value.message
    # the backend is unaffected
    assert backend.classify(None, cat).tag in CAT_CLASSES


def test_truncated_image_is_invalid_argument(backend: OnnxBackend, cat: bytes) -> None:
    with pytest.raises(RPCError) as info:
        backend.classify(None, cat[: len(cat) // 3])
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "truncated" in info.value.message
    assert backend.classify(None, cat).tag in CAT_CLASSES


def test_genop_classify(backend: OnnxBackend, coffee: bytes) -> None:
    import struct

    from vaccelray.worker.backend import Arg, OpType

    out = backend.genop(
        None,
        [Arg(struct.pack("=I", OpType.IMAGE_CLASSIFY)), Arg(coffee)],
        [Arg(b"\0" * 64), Arg(b"\0" * 64)],
    )
    assert out[0].rstrip(b"\0") == b"espresso"
    assert len(out[0]) == 64


@pytest.mark.anyio
async def test_classification_through_the_agent(model_cache: Path, cat: bytes) -> None:
    from vaccelray.testing import agent_client

    be = OnnxBackend(cache_dir=model_cache)
    async with agent_client(be) as (client, _agent):
        session = await client.create_session()
        assert await client.classify(session, cat) in CAT_CLASSES
        with pytest.raises(RPCError) as info:
            await client.classify(session, b"garbage, not a picture")
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert await client.classify(session, cat) in CAT_CLASSES
        await client.destroy_session(session)


def test_backend_attributes(backend: OnnxBackend) -> None:
    assert backend.name == "onnx"
    assert backend.blocking is True
    assert backend.serialize_sessions is False
    assert "classify" in backend.ops
    assert "EfficientNet-Lite0" in backend.describe()
    assert backend.model_file is not None
    assert backend.model_file.is_file()


def test_closed_backend_is_unavailable(model_cache: Path, cat: bytes) -> None:
    be = OnnxBackend(cache_dir=model_cache)
    be.start()
    be.close()
    with pytest.raises(RPCError) as info:
        be.classify(None, cat)
    assert info.value.code == StatusCode.UNAVAILABLE


# -- batching ----------------------------------------------------------------


def test_concurrent_callers_get_their_own_answers(
    model_cache: Path, cat: bytes, coffee: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vaccelray.worker.onnx import preprocess as prep

    callers = 18
    # Every caller finishes preparing its image only once all of them have
    # reserved a slot and prepared: the batches are then full ones of 6,
    # whatever the machine's speed (no batch window to race, it is an hour).
    all_prepared = threading.Barrier(callers, timeout=LIVENESS)
    real_preprocess = prep.preprocess

    def preprocess_together(image: bytes) -> Any:
        tensor = real_preprocess(image)
        all_prepared.wait()
        return tensor

    monkeypatch.setattr(prep, "preprocess", preprocess_together)
    be = OnnxBackend(cache_dir=model_cache, max_batch=6, max_wait=3600.0)
    be.start()
    try:
        answers: dict[int, Any] = {}
        errors: list[BaseException] = []

        def call(i: int) -> None:
            try:
                answers[i] = be.classify(None, cat if i % 2 else coffee)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(LIVENESS)
        assert not errors
        for i, result in answers.items():
            expected = CAT_CLASSES if i % 2 else COFFEE_CLASSES
            assert expected & set(top_labels(result)), (i, result.labels)
        assert len(answers) == callers
        stats = be.stats
        assert (stats.inputs, stats.batches, stats.largest) == (callers, 3, 6)
    finally:
        be.close()


def test_batched_equals_unbatched(model_cache: Path, cat: bytes, coffee: bytes) -> None:
    import numpy as np

    from vaccelray.worker.onnx.preprocess import preprocess

    be = OnnxBackend(cache_dir=model_cache)
    try:
        tensors = np.stack([preprocess(cat), preprocess(coffee)])
        together = be.infer(tensors)
        apart = np.concatenate([be.infer(tensors[:1]), be.infer(tensors[1:])])
        assert together.shape == (2, 1000)
        np.testing.assert_allclose(together, apart, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(together.sum(axis=1), 1.0, rtol=1e-5)
    finally:
        be.close()


def test_lone_call_does_not_wait_for_a_batch(model_cache: Path, cat: bytes) -> None:
    # A batch window of an hour: a lone call that waited for company would hang.
    be = OnnxBackend(cache_dir=model_cache, max_batch=32, max_wait=3600.0)
    be.start()
    try:
        for n in range(2):
            result = finishes(lambda: be.classify(None, cat), f"lone call {n}")
            assert CAT_CLASSES & set(top_labels(result)), result.labels
        assert (be.stats.batches, be.stats.largest) == (2, 1)
    finally:
        be.close()


def test_batcher_waits_for_callers_still_preparing() -> None:
    import numpy as np

    from vaccelray.worker.onnx.batcher import Batcher

    sizes: list[int] = []

    def run(batch: Any) -> Any:
        sizes.append(len(batch))
        return batch * 2

    # A batch window of an hour: were the inputs not batched, the test would hang.
    b = Batcher(run, max_batch=4, max_wait=3600.0)
    try:
        results: dict[int, Any] = {}
        slots = [b.reserve() for _ in range(4)]
        entered = [cm.__enter__() for cm in slots]

        def submit(i: int) -> None:
            results[i] = entered[i].submit(np.full(3, i))
            slots[i].__exit__(None, None, None)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
        for i, t in enumerate(threads[:3]):
            t.start()
            # Each input is queued, and the inference thread waits for the rest
            # instead of running what it has.
            held = i + 1
            until(lambda n=held: _waiting_for_more(b, n), f"{held} inputs held for the batch")
        threads[3].start()
        for t in threads:
            t.join(LIVENESS)
        assert sizes == [4]
        for i in range(4):
            assert results[i].tolist() == [2 * i] * 3
    finally:
        b.close()


def test_batcher_failed_preparation_does_not_stall() -> None:
    import numpy as np

    from vaccelray.worker.onnx.batcher import Batcher

    # A batch window of an hour: only the failed caller's leaving can end the wait.
    b = Batcher(lambda x: x + 1, max_batch=4, max_wait=3600.0)
    try:
        failing = b.reserve()
        failing.__enter__()
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(_submit_one(b, np.zeros(2))))
        t.start()
        until(lambda: _waiting_for_more(b, 1), "the input held for the caller still preparing")
        assert not got
        # the image turned out bad: the caller leaves without submitting
        assert failing.__exit__(ValueError, ValueError("bad image"), None) is False
        t.join(LIVENESS)
        assert got, "the batch still waits for the caller that left"
        assert got[0].tolist() == [1, 1]
    finally:
        b.close()


def test_batcher_waits_at_most_max_wait() -> None:
    import numpy as np

    from vaccelray.worker.onnx.batcher import Batcher

    b = Batcher(lambda x: x + 1, max_batch=4, max_wait=0.2)
    try:
        with b.reserve():  # a caller that is still preparing when the window ends
            got = finishes(lambda: _submit_one(b, np.zeros(2)), "the call past the batch window")
        assert got.tolist() == [1, 1]
        assert (b.stats.batches, b.stats.largest) == (1, 1)
    finally:
        b.close()


def _waiting_for_more(b: Any, queued: int) -> bool:
    """The inference thread holds *queued* inputs, waiting for callers still preparing.

    White-box: once an input is queued, the only wait of the inference thread
    on the batcher's condition is the one for more inputs, and a waiter sits
    in the condition's ``_waiters`` (CPython's threading.Condition) until
    notified: so this holds only once that thread has chosen to wait.
    """
    with b._cond:
        return len(b._queue) == queued and bool(b._cond._waiters)


def _submit_one(b: Any, item: Any) -> Any:
    with b.reserve() as slot:
        return slot.submit(item)


def test_batcher_errors_reach_every_caller_and_close_fails_pending() -> None:
    import numpy as np

    from vaccelray.worker.onnx.batcher import Batcher, BatcherClosed

    def boom(batch: Any) -> Any:
        raise RuntimeError("inference exploded")

    b = Batcher(boom, max_batch=4, max_wait=0.0)
    with pytest.raises(RuntimeError, match="exploded"):
        _submit_one(b, np.zeros(1))
    b.close()
    with pytest.raises(BatcherClosed):
        _submit_one(b, np.zeros(1))


# -- model build and cache ---------------------------------------------------


def test_graph_build_is_deterministic(backend: OnnxBackend) -> None:
    from vaccelray.worker.onnx import cache, graph
    from vaccelray.worker.onnx.weights import load_state_dict

    weights = cache.weights_path()
    meta = {
        "weights_sha256": cache.file_sha256(weights),
        "graph_version": str(graph.GRAPH_VERSION),
    }
    first = graph.build_model_bytes(load_state_dict(weights), meta)
    second = graph.build_model_bytes(load_state_dict(weights), meta)
    assert first == second
    # ... and a fresh interpreter builds the same bytes the backend cached
    assert backend.model_file is not None
    assert backend.model_file.read_bytes() == first


def test_graph_is_built_into_an_empty_cache(tmp_path: Path) -> None:
    # How long the build takes is bench/bench_onnx.py's business ("model load").
    be = OnnxBackend(cache_dir=tmp_path)
    try:
        be.start()
        assert be.model_built
        assert be.model_file is not None
        assert tmp_path in be.model_file.parents
        assert be.model_file.is_file()
        assert be.load_seconds > 0
    finally:
        be.close()


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path: Path, cat: bytes) -> None:
    first = OnnxBackend(cache_dir=tmp_path)
    first.start()
    first.close()
    assert first.model_built
    assert first.model_file is not None
    path = first.model_file
    good = path.read_bytes()

    again = OnnxBackend(cache_dir=tmp_path)
    again.start()
    again.close()
    assert not again.model_built

    # damaged file
    path.write_bytes(good[: len(good) // 2])
    damaged = OnnxBackend(cache_dir=tmp_path)
    try:
        damaged.start()
        assert damaged.model_built
        assert damaged.classify(None, cat).tag in CAT_CLASSES
    finally:
        damaged.close()
    assert path.read_bytes() == good

    # a loadable model whose metadata names other weights
    import onnx

    model = onnx.load_model_from_string(good)
    for prop in model.metadata_props:
        if prop.key == "weights_sha256":
            prop.value = "0" * 64
    path.write_bytes(model.SerializeToString())
    stale = OnnxBackend(cache_dir=tmp_path)
    stale.start()
    stale.close()
    assert stale.model_built
    assert path.read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


def test_changed_weights_get_their_own_model(tmp_path: Path) -> None:
    from vaccelray.worker.onnx import cache

    original = cache.weights_path().read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0x01  # a low mantissa bit of the last classifier bias
    weights = tmp_path / "weights.pth"
    weights.write_bytes(bytes(changed))
    a = OnnxBackend(cache_dir=tmp_path / "c")
    b = OnnxBackend(cache_dir=tmp_path / "c", weights=weights)
    try:
        a.start()
        b.start()
        assert a.model_built
        assert b.model_built
        assert a.model_file != b.model_file
    finally:
        a.close()
        b.close()


def test_concurrent_builds_into_one_cache(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from vaccelray.worker.onnx import OnnxBackend\n"
        "be = OnnxBackend(cache_dir=sys.argv[1]); be.start()\n"
        "print(be.model_built, be.model_file); be.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1, files  # one whole model, no temporary files left
    check = OnnxBackend(cache_dir=tmp_path)
    check.start()
    check.close()
    assert not check.model_built


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vaccelray.worker.onnx import cache

    monkeypatch.setenv("VACCELRAY_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("VACCELRAY_CACHE_DIR")
    assert cache.cache_dir() == tmp_path / "xdg" / "vaccelray"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "vaccelray"


def test_unwritable_cache_still_works(tmp_path: Path, cat: bytes) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    be = OnnxBackend(cache_dir=blocker / "cache")
    try:
        be.start()
        assert be.model_file is None
        assert be.classify(None, cat).tag in CAT_CLASSES
    finally:
        be.close()


# -- the restricted unpickler ------------------------------------------------


def test_weights_load_without_torch() -> None:
    from vaccelray.worker.onnx import cache
    from vaccelray.worker.onnx.weights import load_state_dict

    state = load_state_dict(cache.weights_path())
    assert "torch" not in sys.modules
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert str(state["_fc.weight"].dtype) == "float32"
    assert state["_bn0.num_batches_tracked"].shape == ()


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> Any:
        return (os.system, (self.command,))


def test_unpickler_refuses_os_system(tmp_path: Path) -> None:
    from vaccelray.worker.onnx.weights import WeightsError, restricted_loads

    marker = tmp_path / "pwned"
    handmade = (
        b"\x80\x02cos\nsystem\nq\x00X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    with pytest.raises(WeightsError, match=r"refusing to unpickle os\.system"):
        restricted_loads(handmade)
    with pytest.raises(WeightsError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        restricted_loads(pickle.dumps(_Evil(f"touch {marker}"), protocol=2))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load"), ("collections", "deque")],
)
def test_unpickler_refuses_other_globals(module: str, name: str) -> None:
    from vaccelray.worker.onnx.weights import WeightsError, restricted_loads

    with pytest.raises(WeightsError, match=f"refusing to unpickle {module}.{name}"):
        restricted_loads(f"c{module}\n{name}\n.".encode())


def test_hostile_weights_file_is_refused(tmp_path: Path) -> None:
    """A torch-format file whose state dict hides a call: the backend refuses to start."""
    from vaccelray.worker.onnx.weights import WeightsError, load_state_dict

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    pickle.dump({"_conv_stem.weight": _Evil(f"touch {marker}")}, buf, protocol=2)
    pickle.dump([], buf, protocol=2)
    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match=r"\.system"):
        load_state_dict(hostile)
    be = OnnxBackend(cache_dir=tmp_path / "cache", weights=hostile)
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        be.start()
    assert not marker.exists()


def test_unpickler_refuses_malformed_tensors() -> None:
    from vaccelray.worker.onnx.weights import WeightsError, restricted_loads

    # a tensor reaching past its 4-element storage
    data = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
        b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04Nt"
        b"QK\x00K\x08\x85K\x01\x85\x89NtR."
    )
    with pytest.raises(WeightsError, match="past the end"):
        restricted_loads(data)
    with pytest.raises(WeightsError, match="malformed pickle"):
        restricted_loads(b"\x80\x02(((")


def test_import_is_cheap() -> None:
    code = (
        "import sys, vaccelray.worker.onnx as o\n"
        "assert o.onnx_available()\n"
        "heavy = [m for m in ('numpy', 'PIL', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]"
