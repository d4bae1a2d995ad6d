"""The libvaccel ctypes backend, against C test doubles compiled with ``cc`` here.

One double per ABI generation (tests/cdouble/libvaccel_double.c); each records
its calls in the file named by VDOUBLE_LOG and checks what it is given.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cdouble import build as cdouble
from vaccelray.errors import RPCError, StatusCode, VaccelrayError
from vaccelray.worker import libvaccel as lv
from vaccelray.worker.backend import Arg, Framework, Model, ModelRun, OpType, Tensor
from vaccelray.worker.libvaccel import (
    LibvaccelBackend,
    LibvaccelLoadError,
    LibvaccelNotFound,
    find_libvaccel,
)

HERE = Path(__file__).resolve().parent

GENERATIONS = list(cdouble.GENERATIONS)
NOOP_TAG = "This is a dummy classification tag!"
NOOP_IMGNAME = "This is a dummy imgname!"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def cc() -> str:
    compiler = cdouble.find_cc()
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("no C compiler (cc) on a CI machine: the libvaccel doubles need one")
        pytest.skip("no C compiler (cc): cannot build the libvaccel test doubles")
    return str(compiler)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The backend sets these for libvaccel; monkeypatch puts the originals back.
    for name in ("VACCEL_PLUGINS", "VACCEL_BACKENDS", "VDOUBLE_SKIP_PLUGINS", "VDOUBLE_TAG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("VDOUBLE_SYNC_WRITE", raising=False)
    monkeypatch.delenv("VDOUBLE_SYNC_BREAK", raising=False)
    monkeypatch.delenv("VDOUBLE_RUN_BREAK", raising=False)
    for op in ("SESSION_INIT", "SESSION_RELEASE", "CLASSIFY", "GENOP", "EXEC", "MODEL", "SYNC"):
        monkeypatch.delenv(f"VDOUBLE_FAIL_{op}", raising=False)
    monkeypatch.setenv("VDOUBLE_LOG", str(tmp_path / "calls.log"))


class Calls:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def named(self, prefix: str) -> list[dict[str, str]]:
        """The calls whose line starts with *prefix*, as key=value dicts."""
        out = []
        for line in self.lines():
            if line.split(" ", 1)[0] == prefix:
                fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
                out.append(fields)
        return out


@pytest.fixture
def calls(tmp_path: Path) -> Calls:
    return Calls(tmp_path / "calls.log")


@pytest.fixture(scope="session")
def double_05(cc: str) -> Any:
    """The one 0.5 double of this process (see cdouble.shared_double; fresh ones in children)."""
    return cdouble.shared_double("0.5", cc)


@pytest.fixture
def make_double(cc: str, tmp_path: Path, double_05: Any) -> Callable[[str], Any]:
    counter = iter(range(1000))

    def make(generation: str) -> Any:
        if generation == "0.5":
            return double_05
        return cdouble.build_double(generation, tmp_path / f"build{next(counter)}", cc)

    return make


@pytest.fixture
def started(make_double: Callable[[str], Any]) -> Iterator[Callable[..., Any]]:
    backends: list[LibvaccelBackend] = []

    def start(generation: str, **kwargs: Any) -> tuple[LibvaccelBackend, Any]:
        double = make_double(generation)
        backend = LibvaccelBackend(str(double.plugin), libvaccel=str(double.libvaccel), **kwargs)
        backend.start()
        backends.append(backend)
        return backend, double

    yield start
    for backend in backends:
        backend.close()


def _no_bad_args(calls: Calls) -> None:
    assert not [line for line in calls.lines() if line.startswith("BADARG")]


# -- loading --------------------------------------------------------------------------


@pytest.mark.parametrize("generation", GENERATIONS)
def test_loads_detects_generation_and_describes(
    generation: str, started: Callable[..., Any], calls: Calls
) -> None:
    backend, double = started(generation)
    assert backend.lib is not None
    assert backend.lib.generation.name == generation
    assert backend.lib.version == double.version
    text = backend.describe()
    assert f"libvaccel {double.version}" in text
    assert str(double.libdir) in text
    assert f"ABI {generation}" in text
    assert str(double.plugin) in text
    assert ("exec" in backend.ops) == (generation != "0.5")
    if generation == "0.5":
        # loaded in-process without the variables (see test_05_plugin_registered_in_process)
        assert "VACCEL_PLUGINS" not in os.environ
        assert "VACCEL_BACKENDS" not in os.environ
        return
    # the plugin is selected through both variable generations before loading
    assert os.environ["VACCEL_PLUGINS"] == str(double.plugin)
    assert os.environ["VACCEL_BACKENDS"] == str(double.plugin)
    var = "VACCEL_BACKENDS" if generation == "0.6" else "VACCEL_PLUGINS"
    inits = [line for line in calls.lines() if line.startswith("init ")]
    abi = double_abi(generation)
    # the generation probe (no plugin), the load probe, then this process
    assert inits == [
        f"init abi={abi} VACCEL_BACKENDS=(unset)",
        *[f"init abi={abi} {var}={double.plugin}"] * 2,
    ]
    assert calls.lines().count(f"plugin_loaded {double.plugin}") == 2


def double_abi(generation: str) -> int:
    return int(cdouble.GENERATIONS[generation][0])


def test_arg_layout_matches_generation(started: Callable[..., Any]) -> None:
    layouts = {g: started(g)[0].lib.arg_layout for g in GENERATIONS}
    assert layouts == {"0.5": "0.5", "0.6": "0.6", "0.7": "0.6", "current": "current"}


def test_nothing_loaded_at_import() -> None:
    code = (
        "import os, vaccelray.worker.libvaccel, vaccelray.worker.libvaccel_abi\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('libvaccel' in maps, 'VACCEL_PLUGINS' in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VACCEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["False", "False"]


def test_constructor_does_nothing_until_start(make_double: Callable[[str], Any]) -> None:
    double = make_double("0.7")
    backend = LibvaccelBackend(str(double.plugin), libvaccel=str(double.libvaccel))
    assert backend.lib is None
    assert "not loaded yet" in backend.describe()
    assert "VACCEL_PLUGINS" not in os.environ


def test_missing_plugin_is_one_line_and_worker_survives(
    make_double: Callable[[str], Any], tmp_path: Path
) -> None:
    double = make_double("0.7")
    backend = LibvaccelBackend(str(tmp_path / "nope.so"), libvaccel=str(double.libvaccel))
    with pytest.raises(LibvaccelLoadError) as info:
        backend.start()
    assert "nope.so does not exist" in str(info.value)
    assert "\n" not in str(info.value)


def test_plugin_that_fails_to_load_is_caught_by_the_probe(
    make_double: Callable[[str], Any], tmp_path: Path
) -> None:
    # libvaccel 0.6+ exit()s in its constructor when a plugin fails to load:
    # the probe child dies instead of the worker.
    double = make_double("current")
    broken = tmp_path / "libvaccel-broken.so"
    broken.write_bytes(b"not an ELF file")
    backend = LibvaccelBackend(str(broken), libvaccel=str(double.libvaccel))
    with pytest.raises(LibvaccelLoadError) as info:
        backend.start()
    message = str(info.value)
    assert "exited with status 2" in message  # ENOENT, as the real constructor
    assert "libvaccel-broken.so" in message
    assert "\n" not in message
    assert backend.lib is None


def test_bare_plugin_name_is_found_next_to_libvaccel(started: Callable[..., Any]) -> None:
    backend, double = started("0.7")
    # started() gave a path; a bare name resolves against libvaccel's directory
    other = LibvaccelBackend("libvaccel-double.so", libvaccel=str(double.libvaccel))
    assert lv._resolve_plugin("libvaccel-double.so", str(double.libvaccel)) == str(double.plugin)
    other.start()  # already loaded with the same plugin: reused, no second constructor
    assert other.lib is backend.lib


# -- search order -----------------------------------------------------------------------


@pytest.fixture
def no_system_libvaccel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    empty = tmp_path / "usr-local-lib"
    empty.mkdir()
    monkeypatch.setattr(lv, "_standard_dirs", lambda: [str(empty)])
    monkeypatch.setattr(lv.ctypes.util, "find_library", lambda name: None)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    return empty


def test_search_order(
    no_system_libvaccel: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dirs = {}
    for name in ("explicit", "ldpath", "plugindir"):
        d = tmp_path / name
        d.mkdir()
        (d / "libvaccel.so").write_bytes(b"")
        dirs[name] = d
    (no_system_libvaccel / "libvaccel.so.0.7.1").write_bytes(b"")
    plugin = str(dirs["plugindir"] / "libvaccel-noop.so")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{dirs['ldpath']}")
    assert find_libvaccel(str(dirs["explicit"]), [plugin]) == str(dirs["explicit"] / "libvaccel.so")
    assert find_libvaccel(str(dirs["explicit"] / "libvaccel.so"), [plugin]).startswith(
        str(dirs["explicit"])
    )
    assert find_libvaccel(None, [plugin]) == str(dirs["ldpath"] / "libvaccel.so")
    monkeypatch.delenv("LD_LIBRARY_PATH")
    assert find_libvaccel(None, [plugin]) == str(dirs["plugindir"] / "libvaccel.so")
    assert find_libvaccel(None, ["libvaccel-noop.so"]) == str(
        no_system_libvaccel / "libvaccel.so.0.7.1"
    )
    monkeypatch.setattr(lv.ctypes.util, "find_library", lambda name: "libvaccel.so.0")
    (no_system_libvaccel / "libvaccel.so.0.7.1").unlink()
    assert find_libvaccel(None, ["libvaccel-noop.so"]) == "libvaccel.so.0"


def test_not_found_is_one_line_naming_search_and_fixes(
    no_system_libvaccel: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path / "a"))
    backend = LibvaccelBackend(str(tmp_path / "p" / "libvaccel-noop.so"))
    with pytest.raises(LibvaccelNotFound) as info:
        backend.start()
    message = str(info.value)
    assert "\n" not in message
    for part in (
        str(tmp_path / "a"),
        str(tmp_path / "p"),
        str(no_system_libvaccel),
        "find_library",
        "install vAccel",
        "--libvaccel PATH",
        "--backend noop",
    ):
        assert part in message
    with pytest.raises(LibvaccelNotFound, match=r"--libvaccel .*nowhere.*--backend noop"):
        find_libvaccel(str(tmp_path / "nowhere"))


# -- operations --------------------------------------------------------------------------


@pytest.mark.parametrize("generation", GENERATIONS)
def test_session_and_classify(generation: str, started: Callable[..., Any], calls: Calls) -> None:
    backend, _ = started(generation)
    image = bytes(range(256)) * 3
    handle = backend.session_create(42, 3)
    result = backend.classify(handle, image)
    # the plugin writes junk after the NUL: the tag stops at the first NUL
    assert result.tag == NOOP_TAG
    assert result.imgname == NOOP_IMGNAME
    backend.session_release(handle)

    init_fn = backend.lib.generation.init
    release_fn = backend.lib.generation.release
    (init,) = calls.named(init_fn)
    assert init["flags"] == "3"
    assert int(init["id"]) == handle.native.id
    (call,) = calls.named("vaccel_image_classification")
    assert call["sess"] == init["sess"]  # the struct libvaccel initialised
    assert int(call["len_img"]) == len(image)
    assert int(call["sum_img"]) == sum(image)  # every byte reached the library
    assert call["len_out_text"] == call["len_out_imgname"] == "512"
    (release,) = calls.named(release_fn)
    assert release["sess"] == init["sess"]
    _no_bad_args(calls)
    with pytest.raises(RPCError) as info:
        backend.classify(handle, image)
    assert info.value.code == StatusCode.NOT_FOUND


@pytest.mark.parametrize("generation", GENERATIONS)
def test_genop_image_classification(
    generation: str, started: Callable[..., Any], calls: Calls
) -> None:
    backend, _ = started(generation)
    handle = backend.session_create(1, 0)
    image = b"\x89PNG fake image"
    op = struct.pack("=I", OpType.IMAGE_CLASSIFY)
    out = backend.genop(handle, [Arg(op, 5), Arg(image, 27)], [Arg(bytes(100)), Arg(bytes(64))])
    assert [len(b) for b in out] == [100, 64]
    assert out[0].split(b"\0", 1)[0].decode() == NOOP_TAG
    assert out[1].split(b"\0", 1)[0].decode() == NOOP_IMGNAME
    (call,) = [c for c in calls.named("vaccel_genop") if "nr_read" in c]
    assert (call["nr_read"], call["nr_write"]) == ("2", "2")
    args = [line.split()[1:] for line in calls.lines() if line.startswith("vaccel_genop ")][1:]
    sizes = [(a[0].split("[")[0], next(f for f in a if f.startswith("size="))) for a in args]
    assert sizes == [
        ("read", "size=4"),
        ("read", f"size={len(image)}"),
        ("write", "size=100"),
        ("write", "size=64"),
    ]
    # the arg type travels in the 0.6+ layouts (0.5 has no type field)
    types = [next(f for f in a if f.startswith("type=")) for a in args[:2]]
    assert types == (["type=0", "type=0"] if generation == "0.5" else ["type=5", "type=27"])
    (inner,) = calls.named("genop:image_classification")
    assert int(inner["sum_img"]) == sum(image)
    _no_bad_args(calls)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_exec(generation: str, started: Callable[..., Any], calls: Calls) -> None:
    backend, _ = started(generation)
    handle = backend.session_create(1, 0)
    if generation == "0.5":
        with pytest.raises(RPCError) as info:
            backend.exec(handle, "libmylib.so", "mytestfunc", [Arg(b"x")], [Arg(bytes(8))])
        assert info.value.code == StatusCode.UNIMPLEMENTED
        return
    out = backend.exec(handle, "libmylib.so", "mytestfunc", [Arg(b"hello")], [Arg(bytes(20))])
    assert out == [b"mytestfunc:hello".ljust(20, b"\0")]
    (call,) = [c for c in calls.named("vaccel_exec") if "nr_read" in c]
    assert call["library"] == "libmylib.so"
    assert (call["nr_read"], call["nr_write"]) == ("1", "1")
    _no_bad_args(calls)


# -- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize(
    ("code", "status", "name"),
    [
        (22, StatusCode.INVALID_ARGUMENT, "VACCEL_EINVAL"),
        (71, StatusCode.INTERNAL, "VACCEL_EBACKEND"),
        (104, StatusCode.INTERNAL, "VACCEL_ESESS"),
    ],
)
def test_library_failure_becomes_status(
    generation: str,
    code: int,
    status: StatusCode,
    name: str,
    started: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, _ = started(generation)
    handle = backend.session_create(1, 0)
    monkeypatch.setenv("VDOUBLE_FAIL_CLASSIFY", str(code))
    with pytest.raises(RPCError) as info:
        backend.classify(handle, b"img")
    assert info.value.code == status
    assert info.value.message.startswith(f"vaccel_image_classification failed: {name} (")
    assert f" {code}: " in info.value.message
    monkeypatch.setenv("VDOUBLE_FAIL_GENOP", str(code))
    with pytest.raises(RPCError) as info:
        backend.genop(handle, [Arg(struct.pack("=I", 2)), Arg(b"i")], [Arg(bytes(8))])
    assert info.value.code == status
    assert "vaccel_genop failed" in info.value.message


def test_session_failures(started: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _ = started("current")
    monkeypatch.setenv("VDOUBLE_FAIL_SESSION_INIT", "12")
    with pytest.raises(RPCError, match="vaccel_session_new failed: VACCEL_ENOMEM") as info:
        backend.session_create(1, 0)
    assert info.value.code == StatusCode.INTERNAL
    monkeypatch.delenv("VDOUBLE_FAIL_SESSION_INIT")
    handle = backend.session_create(1, 0)
    monkeypatch.setenv("VDOUBLE_FAIL_SESSION_RELEASE", "104")
    with pytest.raises(RPCError, match="vaccel_session_delete failed: VACCEL_ESESS"):
        backend.session_release(handle)


@pytest.mark.parametrize("generation", ["0.6", "current"])
def test_no_plugin_loaded(
    generation: str, started: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDOUBLE_SKIP_PLUGINS", "1")
    backend, _ = started(generation)
    handle = backend.session_create(1, 0)
    with pytest.raises(RPCError) as info:
        backend.classify(handle, b"img")
    assert info.value.code == StatusCode.INTERNAL
    assert "VACCEL_ENOTSUP" in info.value.message
    assert "is the plugin loaded?" in info.value.message


def test_empty_image_is_a_bad_argument(started: Callable[..., Any], calls: Calls) -> None:
    backend, _ = started("0.7")
    handle = backend.session_create(1, 0)
    with pytest.raises(RPCError) as info:
        backend.classify(handle, b"")
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert not calls.named("vaccel_image_classification")


# -- concurrency -------------------------------------------------------------------------


def _classify_in_threads(backend: LibvaccelBackend, handles: list[Any]) -> float:
    errors: list[BaseException] = []

    def run(h: Any) -> None:
        try:
            assert backend.classify(h, b"img").tag == NOOP_TAG
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(h,)) for h in handles]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    return time.perf_counter() - t0


@pytest.mark.parametrize(
    ("generation", "parallel"), [("0.5", False), ("0.6", False), ("0.7", True), ("current", True)]
)
def test_concurrency_rules(
    generation: str, parallel: bool, started: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDOUBLE_CLASSIFY_SLEEP_US", "300000")
    backend, _ = started(generation)
    a, b = backend.session_create(1, 0), backend.session_create(2, 0)
    # one session: always one call at a time
    assert _classify_in_threads(backend, [a, a]) >= 0.59
    # two sessions: in parallel from 0.7 on, one library-wide lock for 0.5/0.6
    elapsed = _classify_in_threads(backend, [a, b])
    assert (elapsed < 0.55) if parallel else (elapsed >= 0.59)


# -- end to end: worker + vAccel client over ttrpc -----------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("generation", ["0.5", "current"])
async def test_end_to_end_over_ttrpc(
    generation: str,
    make_double: Callable[[str], Any],
    calls: Calls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vaccelray.protocol._pb import vaccel_pb2 as pb
    from vaccelray.transport.client import connect
    from vaccelray.worker.daemon import WorkerConfig, run_worker

    double = make_double(generation)
    monkeypatch.setenv("VDOUBLE_TAG", "tag from the double")
    config = WorkerConfig(
        addresses=("tcp://127.0.0.1:0",),
        backend=str(double.plugin),
        libvaccel=str(double.libvaccel),
    )
    async with run_worker(config) as worker, connect(worker.addresses[0]) as client:
        assert isinstance(worker.backend, LibvaccelBackend)
        service = "vaccel.VaccelAgent"
        created = await client.call_message(
            service, "CreateSession", pb.CreateSessionRequest(flags=0), pb.CreateSessionResponse
        )
        sid = created.session_id
        image = b"cat.jpeg bytes"
        answer = await client.call_message(
            service,
            "ImageClassification",
            pb.ImageClassificationRequest(session_id=sid, image=image),
            pb.ImageClassificationResponse,
        )
        assert answer.tags.rstrip(b"\0") == b"tag from the double"
        (call,) = calls.named("vaccel_image_classification")
        assert int(call["len_img"]) == len(image)

        genop = await client.call_message(
            "vaccel.sync.agent.AgentService",
            "Genop",
            pb.GenopRequest(
                session_id=sid,
                read_args=[
                    pb.Arg(buf=struct.pack("=I", 2), size=4),
                    pb.Arg(buf=image, size=len(image)),
                ],
                write_args=[pb.Arg(size=64), pb.Arg(size=64)],
            ),
            pb.GenopResponse,
        )
        assert genop.write_args[0].buf.split(b"\0")[0] == b"tag from the double"
        assert genop.write_args[0].size == 64

        monkeypatch.setenv("VDOUBLE_FAIL_CLASSIFY", "71")
        with pytest.raises(RPCError) as info:
            await client.call_message(
                service,
                "ImageClassification",
                pb.ImageClassificationRequest(session_id=sid, image=image),
                pb.ImageClassificationResponse,
            )
        assert info.value.code == StatusCode.INTERNAL
        assert "VACCEL_EBACKEND" in info.value.message
        monkeypatch.setenv("VDOUBLE_FAIL_CLASSIFY", "22")
        with pytest.raises(RPCError) as info:
            await client.call_message(
                service,
                "ImageClassification",
                pb.ImageClassificationRequest(session_id=sid, image=image),
                pb.ImageClassificationResponse,
            )
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert "VACCEL_EINVAL" in info.value.message
        monkeypatch.delenv("VDOUBLE_FAIL_CLASSIFY")

        await client.call_message(
            service, "DestroySession", pb.DestroySessionRequest(session_id=sid), pb.EmptyResponse
        )
        assert len(calls.named(worker.backend.lib.generation.release)) == 1
    _no_bad_args(calls)


# -- models ------------------------------------------------------------------------------

#: What each generation calls for each framework: load, run, unload, and the destructor
#: of the output tensors (None: the generation has no such function).
MODEL_FUNCTIONS: dict[str, dict[Framework, tuple[str | None, str, str | None, str]]] = {
    "0.5": {
        Framework.TENSORFLOW: (
            "vaccel_tf_session_load",
            "vaccel_tf_session_run",
            "vaccel_tf_session_delete",
            "vaccel_tf_tensor_destroy",
        ),
    },
    "0.6": {
        Framework.TENSORFLOW: (
            "vaccel_tf_session_load",
            "vaccel_tf_session_run",
            "vaccel_tf_session_delete",
            "vaccel_tf_tensor_destroy",
        ),
        Framework.TFLITE: (
            "vaccel_tflite_session_load",
            "vaccel_tflite_session_run",
            "vaccel_tflite_session_delete",
            "vaccel_tflite_tensor_destroy",
        ),
    },
    "0.7": {
        Framework.TENSORFLOW: (
            "vaccel_tf_session_load",
            "vaccel_tf_session_run",
            "vaccel_tf_session_delete",
            "vaccel_tf_tensor_delete",
        ),
        Framework.TFLITE: (
            "vaccel_tflite_session_load",
            "vaccel_tflite_session_run",
            "vaccel_tflite_session_delete",
            "vaccel_tflite_tensor_delete",
        ),
        Framework.TORCH: (None, "vaccel_torch_jitload_forward", None, "vaccel_torch_tensor_delete"),
    },
    "current": {
        Framework.TENSORFLOW: (
            "vaccel_tf_model_load",
            "vaccel_tf_model_run",
            "vaccel_tf_model_unload",
            "vaccel_tf_tensor_delete",
        ),
        Framework.TFLITE: (
            "vaccel_tflite_model_load",
            "vaccel_tflite_model_run",
            "vaccel_tflite_model_unload",
            "vaccel_tflite_tensor_delete",
        ),
        Framework.TORCH: (
            "vaccel_torch_model_load",
            "vaccel_torch_model_run",
            None,
            "vaccel_torch_tensor_delete",
        ),
    },
}
#: A float tensor's type number in each framework.
FLOAT = {Framework.TENSORFLOW: 1, Framework.TFLITE: 1, Framework.TORCH: 7}
#: How a generation registers a model with a session, and frees it.
REGISTER = {"0.5": "vaccel_sess_register", "0.6": "vaccel_sess_register"}
UNREGISTER = {"0.5": "vaccel_sess_unregister", "0.6": "vaccel_sess_unregister"}


def _live_tensors(double: Any) -> int:
    lib = ctypes.CDLL(str(double.libvaccel))
    lib.vdouble_live_tensors.restype = ctypes.c_long
    return int(lib.vdouble_live_tensors())


def _run_of(framework: Framework, *tensors: Tensor, outputs: int | None = None) -> ModelRun:
    n = len(tensors) if outputs is None else outputs
    if framework is Framework.TENSORFLOW:
        return ModelRun(
            tensors,
            n,
            b"opts",
            tuple((f"in{i}", i) for i in range(len(tensors))),
            tuple((f"out{i}", 10 + i) for i in range(n)),
        )
    return ModelRun(tensors, n, b"opts" if framework is Framework.TORCH else None)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("framework", list(Framework))
def test_model_ops_call_the_generations_own_functions(
    generation: str, framework: Framework, started: Callable[..., Any], calls: Calls
) -> None:
    backend, double = started(generation)
    handle = backend.session_create(7, 0)
    model = Model(3, (), (("model.bin", b"\x01\x02weights"),))
    functions = MODEL_FUNCTIONS[generation].get(framework)
    prefix = framework.method_prefix
    if functions is None:
        # this generation has no such op: 12 naming the op and the backend, nothing made
        for op, call in [
            ("ModelLoad", lambda: backend.model_load(handle, framework, model)),
            ("ModelRun", lambda: backend.model_run(handle, framework, model, ModelRun((), 0))),
        ]:
            with pytest.raises(RPCError) as info:
                call()
            assert info.value.code == StatusCode.UNIMPLEMENTED
            assert info.value.message == f"backend libvaccel does not support {prefix}{op}"
        assert not [
            line for line in calls.lines() if line.startswith("vaccel_") and "register" in line
        ]
        backend.session_release(handle)
        return
    load, run, unload, free = functions
    message = backend.model_load(handle, framework, model)
    expected = "Operation handled by noop plugin" if framework is Framework.TENSORFLOW else ""
    assert message == expected
    # made once from the blob, registered with this session's struct
    register = REGISTER.get(generation, "vaccel_resource_register")
    (reg,) = calls.named(register)
    assert int(reg["size"]) == len(model.blobs[0][1])
    assert int(reg["sum"]) == sum(model.blobs[0][1])
    assert int(reg["id"]) == handle.native.id
    if load is not None:
        (loaded,) = calls.named(load)
        assert loaded["framework"] in ("tf", "tflite", "torch")

    first = Tensor(struct.pack("=4f", 1, 2, 3, 4), (2, 2), FLOAT[framework])
    second = Tensor(struct.pack("=2f", 5, 6), (2,), FLOAT[framework])
    outputs = backend.model_run(handle, framework, model, _run_of(framework, first, second))
    assert outputs == [first, second]  # the plugin echoes: same bytes, dims, type
    (ran,) = [c for c in calls.named(run) if "nr_in" in c]
    assert (ran["nr_in"], ran["nr_out"]) == ("2", "2")
    ins = [line for line in calls.lines() if line.startswith(f"{run} in[")]
    assert [line.split()[2:5] for line in ins] == [
        [f"type={FLOAT[framework]}", "dims=2,2", "size=16"],
        [f"type={FLOAT[framework]}", "dims=2", "size=8"],
    ]
    assert int(ran["options"]) == (4 if framework is not Framework.TFLITE else 0)
    assert int(ran["options_sum"]) == (sum(b"opts") if framework is not Framework.TFLITE else 0)
    if framework is Framework.TENSORFLOW:
        assert [line.split()[1:] for line in calls.lines() if "out_node" in line] == [
            ["out_node[0]", "name=out0", "id=10"],
            ["out_node[1]", "name=out1", "id=11"],
        ]
        assert [line.split()[-1] for line in ins] == ["node=in0", "node=in1"]
    # the plugin's outputs were freed with the generation's destructor
    assert calls.lines().count(free) == 2
    assert _live_tensors(double) == 0

    if unload is not None:
        assert backend.model_unload(handle, framework, model) == expected
        assert len(calls.named(unload)) == 1
    # the model object is made once per session, whatever was called on it
    assert len(calls.named(register)) == 1
    backend.session_release(handle)
    unregister = UNREGISTER.get(generation, "vaccel_resource_unregister")
    assert len(calls.named(unregister)) == 1
    _no_bad_args(calls)


@pytest.mark.parametrize("framework", [Framework.TENSORFLOW, Framework.TORCH])
def test_a_run_without_options_passes_none(
    framework: Framework, started: Callable[..., Any], calls: Calls
) -> None:
    backend, _ = started("current")
    handle = backend.session_create(1, 0)
    model = Model(1, (), (("m", b"w"),))
    tensor = Tensor(bytes(4), (1,), FLOAT[framework])
    run = dataclasses.replace(_run_of(framework, tensor), run_options=None)
    assert backend.model_run(handle, framework, model, run) == [tensor]
    function = MODEL_FUNCTIONS["current"][framework][1]
    (ran,) = [c for c in calls.named(function) if "nr_in" in c]
    assert (ran["options"], ran["options_sum"]) == ("0", "0")
    backend.session_release(handle)


@pytest.mark.parametrize("generation", ["0.7", "current"])
def test_pytorch_model_load(generation: str, started: Callable[..., Any], calls: Calls) -> None:
    backend, _ = started(generation)
    handle = backend.session_create(1, 0)
    with pytest.raises(RPCError) as info:
        backend.model_load(handle, Framework.TORCH, Model(9, (), ()))
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert info.value.message == "PyTorch model 9 has no file to load"
    assert backend.model_load(handle, Framework.TORCH, Model(9, (), (("m.pt", b"x"),))) == ""
    # 0.7 loads in each run (jitload_forward): nothing to call; current has a load
    assert len(calls.named("vaccel_torch_model_load")) == (generation == "current")
    backend.session_release(handle)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_model_given_by_path(
    generation: str, started: Callable[..., Any], calls: Calls, tmp_path: Path
) -> None:
    backend, _ = started(generation)
    handle = backend.session_create(1, 0)
    path = tmp_path / "model.pb"
    path.write_bytes(b"on disk")
    backend.model_load(handle, Framework.TENSORFLOW, Model(4, (str(path),), ()))
    if generation in ("0.5", "0.6"):
        (made,) = calls.named("vaccel_tf_saved_model_set_path")
        assert made["path"] == str(path)
    else:
        (made,) = calls.named("vaccel_resource_multi_new")
        assert (made["nr_paths"], made["size"]) == ("1", "7")
        assert int(made["sum"]) == sum(b"on disk")
    backend.session_release(handle)
    _no_bad_args(calls)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_model_of_several_blobs(
    generation: str, started: Callable[..., Any], calls: Calls
) -> None:
    backend, _ = started(generation)
    handle = backend.session_create(1, 0)
    blobs = (("saved_model.pb", b"graph"), ("variables.data-0", b"vars"), ("variables.index", b"i"))
    backend.model_load(handle, Framework.TENSORFLOW, Model(5, (), blobs))
    if generation in ("0.5", "0.6"):
        # the saved model's parts, told apart by name
        parts = [
            (c, calls.named(f"vaccel_tf_saved_model_set_{c}"))
            for c in ("model", "checkpoint", "var_index")
        ]
        assert [(c, [x["size"] for x in found]) for c, found in parts] == [
            ("model", ["5"]),
            ("checkpoint", ["4"]),
            ("var_index", ["1"]),
        ]
    elif generation == "0.7":
        # 0.7 takes several buffers only as files: written to a directory of the session's
        (made,) = calls.named("vaccel_resource_multi_new")
        assert (made["nr_paths"], made["size"]) == ("3", "10")
    else:
        made_blobs = calls.named("vaccel_resource_from_blobs")
        assert [(b["name"], b["size"]) for b in made_blobs] == [
            ("saved_model.pb", "5"),
            ("variables.data-0", "4"),
            ("variables.index", "1"),
        ]
    session = handle
    tmpdirs = [n.tmpdir for n in session.models.values() if n.tmpdir]
    backend.session_release(handle)
    assert all(not os.path.exists(d) for d in tmpdirs)
    assert len(tmpdirs) == (generation == "0.7")
    _no_bad_args(calls)


def test_a_tflite_model_of_two_blobs_is_refused_by_0_6(started: Callable[..., Any]) -> None:
    backend, _ = started("0.6")
    handle = backend.session_create(1, 0)
    with pytest.raises(RPCError) as info:
        backend.model_load(handle, Framework.TFLITE, Model(2, (), (("a", b"1"), ("b", b"2"))))
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "this libvaccel takes a model of one file" in info.value.message
    backend.session_release(handle)


def test_model_run_arguments_are_checked_before_the_library(
    started: Callable[..., Any], calls: Calls
) -> None:
    backend, double = started("current")
    handle = backend.session_create(1, 0)
    model = Model(1, (), (("m", b"w"),))
    tensor = Tensor(bytes(8), (2,), 1)
    # TensorFlow reads one input node per input tensor
    with pytest.raises(RPCError) as info:
        backend.model_run(handle, Framework.TENSORFLOW, model, ModelRun((tensor,), 1))
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "1 input tensors but 0 input nodes" in info.value.message
    # a tensor with fewer bytes than its shape: a plugin would read past it
    short = Tensor(bytes(7), (2,), 1)
    with pytest.raises(RPCError) as info:
        backend.model_run(handle, Framework.TFLITE, model, ModelRun((short,), 1))
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "has 7 bytes; its dims [2] and type 1 need 8" in info.value.message
    assert not calls.named("vaccel_tf_model_run")
    assert not calls.named("vaccel_tflite_model_run")
    # a type of no fixed width is the plugin's to check
    odd = Tensor(b"abc", (2,), 5)  # TFLite STRING
    assert backend.model_run(handle, Framework.TFLITE, model, ModelRun((odd,), 1)) == [odd]
    # more outputs than inputs: the noop plugin's EINVAL; nothing leaks
    with pytest.raises(RPCError) as info:
        backend.model_run(handle, Framework.TORCH, model, ModelRun((tensor,), 2))
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "vaccel_torch_model_run failed: VACCEL_EINVAL" in info.value.message
    assert _live_tensors(double) == 0
    backend.session_release(handle)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_model_op_failure_becomes_a_status(
    generation: str, started: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, double = started(generation)
    handle = backend.session_create(1, 0)
    model = Model(1, (), (("m", b"w"),))
    monkeypatch.setenv("VDOUBLE_FAIL_MODEL", "71")
    load = MODEL_FUNCTIONS[generation][Framework.TENSORFLOW][0]
    with pytest.raises(RPCError) as info:
        backend.model_load(handle, Framework.TENSORFLOW, model)
    assert info.value.code == StatusCode.INTERNAL
    assert info.value.message.startswith(f"{load} failed: VACCEL_EBACKEND")
    with pytest.raises(RPCError) as info:
        backend.model_run(
            handle, Framework.TENSORFLOW, model, _run_of(Framework.TENSORFLOW, Tensor(b"", (), 1))
        )
    assert info.value.code == StatusCode.INTERNAL
    assert _live_tensors(double) == 0
    backend.session_release(handle)


def test_sync_resource_reads_the_librarys_blobs(
    started: Callable[..., Any], calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, _ = started("current")
    model = Model(6, (), (("m.bin", b"abcdef"),))
    # no session made it in the library yet: the agent's copy stands
    assert backend.sync_resource(model) is None
    handle = backend.session_create(1, 0)
    backend.model_load(handle, Framework.TORCH, model)
    assert backend.sync_resource(model) == [(1, "m.bin", b"abcdef")]
    monkeypatch.setenv("VDOUBLE_SYNC_WRITE", "XY")  # as if an op wrote into the blob
    assert backend.sync_resource(model) == [(1, "m.bin", b"XYcdef")]
    assert len(calls.named("vaccel_resource_sync")) == 2
    backend.session_release(handle)
    assert backend.sync_resource(model) is None


@pytest.mark.parametrize(
    ("env", "value", "code", "message"),
    [
        (
            "VDOUBLE_FAIL_SYNC",
            "71",
            StatusCode.INTERNAL,
            "vaccel_resource_sync failed: VACCEL_EBACKEND (EPROTO 71: Protocol error); "
            "the plugin reported an error",
        ),
        (
            "VDOUBLE_SYNC_BREAK",
            "array",
            StatusCode.INTERNAL,
            "vaccel_resource_sync (no blob array) failed: VACCEL_EBACKEND",
        ),
        (
            "VDOUBLE_SYNC_BREAK",
            "blob",
            StatusCode.INTERNAL,
            "vaccel_resource_sync (a NULL blob) failed: VACCEL_EBACKEND",
        ),
    ],
)
def test_a_failed_or_broken_sync_is_a_status(
    env: str,
    value: str,
    code: StatusCode,
    message: str,
    started: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, _ = started("current")
    model = Model(6, (), (("m.bin", b"abcdef"),))
    handle = backend.session_create(1, 0)
    backend.model_load(handle, Framework.TORCH, model)
    monkeypatch.setenv(env, value)
    with pytest.raises(RPCError) as info:
        backend.sync_resource(model)
    assert info.value.code == code
    assert info.value.message.startswith(message)
    backend.session_release(handle)


@pytest.mark.parametrize("framework", list(Framework))
@pytest.mark.parametrize(
    ("brk", "what"), [("null", "(a NULL output tensor)"), ("dims", "(an output of 65 dims)")]
)
def test_a_broken_output_is_an_error_and_every_output_is_freed(
    framework: Framework,
    brk: str,
    what: str,
    started: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, double = started("current")
    handle = backend.session_create(1, 0)
    model = Model(1, (), (("m", b"w"),))
    monkeypatch.setenv("VDOUBLE_RUN_BREAK", brk)
    tensor = Tensor(bytes(4), (1,), FLOAT[framework])
    run = _run_of(framework, tensor, tensor)
    with pytest.raises(RPCError) as info:
        backend.model_run(handle, framework, model, run)
    function = MODEL_FUNCTIONS["current"][framework][1]
    assert info.value.code == StatusCode.INTERNAL
    assert info.value.message.startswith(f"{function} {what} failed: VACCEL_EBACKEND")
    assert _live_tensors(double) == 0
    backend.session_release(handle)


def test_a_saved_models_graph_is_its_pb_or_pbtxt_blob(
    started: Callable[..., Any], calls: Calls
) -> None:
    backend, _ = started("0.5")
    handle = backend.session_create(1, 0)
    blobs = (("variables.index", b"ix"), ("graph.pbtxt", b"text graph"))
    backend.model_load(handle, Framework.TENSORFLOW, Model(8, (), blobs))
    assert [c["size"] for c in calls.named("vaccel_tf_saved_model_set_model")] == ["10"]
    assert [c["size"] for c in calls.named("vaccel_tf_saved_model_set_var_index")] == ["2"]
    backend.session_release(handle)
    _no_bad_args(calls)


@pytest.mark.parametrize("generation", ["0.5", "0.6", "0.7"])
def test_sync_resource_is_unimplemented_before_current(
    generation: str, started: Callable[..., Any]
) -> None:
    backend, _ = started(generation)
    with pytest.raises(RPCError) as info:
        backend.sync_resource(Model(1, (), (("m", b"w"),)))
    assert info.value.code == StatusCode.UNIMPLEMENTED
    assert info.value.message == "backend libvaccel does not support SyncResource"


# -- 0.5 plugins ---------------------------------------------------------------------------


def test_05_plugin_fails_the_environment_route(make_double: Callable[[str], Any]) -> None:
    """A 0.5 plugin given through VACCEL_BACKENDS kills the process loading libvaccel."""
    double = make_double("0.5")
    with pytest.raises(LibvaccelLoadError) as info:
        lv._probe(str(double.libvaccel), str(double.plugin))
    assert "undefined symbol: register_plugin_functions" in str(info.value)
    # the plugin really does not link libvaccel
    needed = subprocess.run(
        ["readelf", "-d", str(double.plugin)], capture_output=True, text=True, check=False
    ).stdout
    if needed:
        assert "libvaccel" not in needed


_FRESH_05 = """
import os, sys
from vaccelray.worker.libvaccel import LibvaccelBackend
from vaccelray.worker.backend import Framework, Model, ModelRun, Tensor
backend = LibvaccelBackend(sys.argv[2], libvaccel=sys.argv[1])
backend.start()
handle = backend.session_create(1, 0)
print(backend.classify(handle, b"img").tag)
model = Model(1, (), (("saved_model.pb", b"g"),))
t = Tensor(bytes(4), (1,), 1)
print(backend.model_run(handle, Framework.TENSORFLOW, model,
                        ModelRun((t,), 1, None, (("i", 0),), (("o", 0),)))[0] == t)
backend.session_release(handle)
print("VACCEL_BACKENDS" in os.environ, "VACCEL_PLUGINS" in os.environ)
"""


def test_05_plugin_registered_in_process(cc: str, tmp_path: Path, calls: Calls) -> None:
    """In a fresh process: libvaccel global with no plugin variable, then the plugin by hand."""
    double = cdouble.build_double("0.5", tmp_path / "fresh", cc)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_05, str(double.libvaccel), str(double.plugin)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [NOOP_TAG, "True", "False False"]
    # the constructor ran without plugins (generation probe, then this process)
    assert [line for line in calls.lines() if line.startswith("init ")] == [
        "init abi=5 VACCEL_BACKENDS=(unset)"
    ] * 2
    assert calls.lines().count("register_plugin name=vdouble-noop") == 1
    assert calls.lines().count("register_plugin_functions nr_ops=4") == 1
    _no_bad_args(calls)


def test_05_a_file_that_is_no_plugin_is_one_line(
    make_double: Callable[[str], Any], tmp_path: Path
) -> None:
    double = make_double("0.5")
    lib = lv._LOADED.get(os.path.realpath(str(double.libvaccel)))
    if lib is None:
        LibvaccelBackend(str(double.plugin), libvaccel=str(double.libvaccel)).start()
        lib = lv._LOADED[os.path.realpath(str(double.libvaccel))]
    with pytest.raises(VaccelrayError) as info:
        lib[0].load_plugin_in_process(str(double.libvaccel))  # a library, not a plugin
    assert "is not a vAccel plugin (no vaccel_plugin symbol)" in str(info.value)
    missing = tmp_path / "none.so"
    with pytest.raises(OSError, match=r"none\.so"):
        lib[0].load_plugin_in_process(str(missing))
