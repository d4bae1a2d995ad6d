"""Compile the libvaccel test doubles with ``cc`` (used by the tests and the benchmark).

Each build goes to its own directory with its own soname, so several builds can
be loaded into one process (one per test) without the dynamic loader mistaking
one for another.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: ABI generation -> (-DVDOUBLE_ABI value, version in the file name).
GENERATIONS: dict[str, tuple[int, str]] = {
    "0.5": (5, "0.5.0"),
    "0.6": (6, "0.6.1"),
    "0.7": (7, "0.7.1"),
    "current": (8, "0.8.0"),
}

_counter = itertools.count()


@dataclass(frozen=True)
class DoubleBuild:
    generation: str
    version: str
    libdir: Path
    libvaccel: Path  # the libvaccel.so symlink
    plugin: Path  # libvaccel-double.so


def find_cc() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_double(generation: str, outdir: Path, cc: str | None = None) -> DoubleBuild:
    """Build libvaccel + plugin doubles of *generation* into *outdir* (created)."""
    cc = cc or find_cc()
    if cc is None:
        raise RuntimeError("no C compiler (cc) found")
    abi, version = GENERATIONS[generation]
    outdir.mkdir(parents=True, exist_ok=True)
    soname = f"libvaccel-t{os.getpid()}x{next(_counter)}.so.0"
    real = outdir / f"libvaccel.so.{version}"
    flags = ["-std=c11", "-O1", "-g", "-fPIC", "-Wall", "-Wextra", "-Werror", "-shared"]
    subprocess.run(
        [
            cc,
            *flags,
            f"-DVDOUBLE_ABI={abi}",
            f"-Wl,-soname,{soname}",
            "-o",
            str(real),
            str(HERE / "libvaccel_double.c"),
            "-ldl",
            "-lpthread",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (outdir / "libvaccel.so").symlink_to(real.name)
    (outdir / soname).symlink_to(real.name)
    plugin = outdir / "libvaccel-double.so"
    # From 0.6 on the plugin links the library by soname.  A 0.5 plugin does
    # not (no DT_NEEDED): it finds the library's symbols only in the global
    # scope, so loading it from the library's constructor fails and the
    # worker registers it itself (LibvaccelBackend, 0.5).
    link = [] if generation == "0.5" else [f"-L{outdir}", "-l:" + soname]
    subprocess.run(
        [cc, *flags, "-o", str(plugin), str(HERE / "plugin_double.c"), *link],
        check=True,
        capture_output=True,
        text=True,
    )
    return DoubleBuild(generation, version, outdir, outdir / "libvaccel.so", plugin)


_SHARED: dict[str, DoubleBuild] = {}


def shared_double(generation: str, cc: str | None = None) -> DoubleBuild:
    """The one build of *generation* this process uses (built on first call).

    A 0.5 plugin finds ``register_plugin_functions`` in the global scope, where
    the first 0.5 library a process loaded keeps it: a second 0.5 build in the
    same process would have its plugin register with the first library. So a
    process (several pytest sessions in one, forks of it) shares one 0.5 build,
    kept outside pytest's temporary directories and removed when the process
    that made it exits.
    """
    if generation not in _SHARED:
        outdir = Path(tempfile.mkdtemp(prefix=f"vdouble-{generation}-"))
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(outdir, True))
        _SHARED[generation] = build_double(generation, outdir / "build", cc)
    return _SHARED[generation]
