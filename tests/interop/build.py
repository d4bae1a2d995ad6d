"""Build the Go ttrpc interop peer (tests/interop/peer) from Debian's packages.

The peer is compiled in GOPATH mode against containerd ttrpc 1.1.1 and gogo
protobuf as Debian ships them under ``/usr/share/gocode``; its message code is
generated at build time from the repository's own ``vaccel.proto`` and the
peer's ``interop.proto``. The binary is cached under a directory keyed by a
hash of every input, so it is rebuilt only when a source changes.

Used by ``tests/interop/conftest.py`` and ``bench/bench_worker.py``; runnable
on its own (``python tests/interop/build.py``) to print the binary's path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_DIR = HERE / "peer"
REPO = HERE.parent.parent
VACCEL_PROTO = REPO / "vaccelray" / "protocol" / "protos" / "vaccel.proto"

#: Debian's root of packaged Go sources (the GOPATH entry the packages install to).
DEBIAN_GOCODE = Path("/usr/share/gocode")

APT_PACKAGES = (
    "golang-go",
    "golang-github-containerd-ttrpc-dev",
    "golang-github-gogo-protobuf-dev",
    "golang-github-golang-protobuf-1-3-dev",
    "golang-google-grpc-dev",
    "golang-google-genproto-dev",
    "protobuf-compiler",
    "gogottrpc",
)
APT_COMMAND = "apt-get install -y " + " ".join(APT_PACKAGES)

# Go import paths the peer needs, as directories under DEBIAN_GOCODE/src.
_GO_PACKAGES = (
    "github.com/containerd/ttrpc",
    "github.com/gogo/protobuf/proto",
    "github.com/golang/protobuf/ptypes/any",
    "google.golang.org/genproto/googleapis/rpc/status",
    "google.golang.org/grpc/status",
)

# The import path of the peer inside its private GOPATH; main imports
# "vaccelpeer/vaccel" and "vaccelpeer/interop", generated here.
_IMPORT_ROOT = "vaccelpeer"


class PeerUnavailable(RuntimeError):
    """The Go toolchain or the Debian Go packages are missing."""


def missing_tools() -> list[str]:
    """What is missing to build the peer (empty when everything is there)."""
    missing = [
        tool for tool in ("go", "protoc", "protoc-gen-gogottrpc") if shutil.which(tool) is None
    ]
    missing += [
        str(DEBIAN_GOCODE / "src" / pkg)
        for pkg in _GO_PACKAGES
        if not (DEBIAN_GOCODE / "src" / pkg).is_dir()
    ]
    return missing


def _sources() -> list[Path]:
    return sorted([*PEER_DIR.glob("*.go"), *PEER_DIR.glob("*.proto"), VACCEL_PROTO])


def source_hash() -> str:
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    go = shutil.which("go")
    if go is not None:
        version = subprocess.run([go, "version"], capture_output=True, text=True, check=False)
        digest.update(version.stdout.encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "vaccelray-go-peer"


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"building the Go peer failed: {' '.join(cmd)} exited {proc.returncode}\n"
            f"{proc.stdout}{proc.stderr}"
        )


def build_peer(cache_dir: Path | None = None) -> Path:
    """The path of the peer binary, building it first unless it is cached.

    Raises :class:`PeerUnavailable` when the toolchain is missing (the message
    names the apt-get command that installs it) and ``RuntimeError`` when the
    build itself fails.
    """
    missing = missing_tools()
    if missing:
        raise PeerUnavailable(
            f"the Go ttrpc peer cannot be built, missing: {', '.join(missing)}; "
            f"install with: {APT_COMMAND}"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / source_hash() / "peer"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as tmp:
        gopath = Path(tmp) / "gopath"
        pkg = gopath / "src" / _IMPORT_ROOT
        for sub in ("vaccel", "interop"):
            (pkg / sub).mkdir(parents=True)
        for src in PEER_DIR.glob("*.go"):
            shutil.copy2(src, pkg / src.name)
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": f"{gopath}{os.pathsep}{DEBIAN_GOCODE}",
            "CGO_ENABLED": "0",
            "GOPROXY": "off",
            "GOFLAGS": "",
        }
        if "GOCACHE" not in env and "HOME" not in env and "XDG_CACHE_HOME" not in env:
            env["GOCACHE"] = str(cache_dir / "gocache")
        _run(
            [
                "protoc",
                f"-I{VACCEL_PROTO.parent}",
                f"--gogottrpc_out=plugins=ttrpc:{pkg / 'vaccel'}",
                str(VACCEL_PROTO),
            ],
            cwd=pkg,
            env=env,
        )
        _run(
            [
                "protoc",
                f"-I{PEER_DIR}",
                f"--gogottrpc_out=plugins=ttrpc:{pkg / 'interop'}",
                str(PEER_DIR / "interop.proto"),
            ],
            cwd=pkg,
            env=env,
        )
        built = Path(tmp) / "peer"
        _run(["go", "build", "-o", str(built), "."], cwd=pkg, env=env)
        # Atomic: a concurrent build of the same sources just replaces it.
        os.replace(built, target)
    return target


if __name__ == "__main__":
    try:
        print(build_peer())
    except PeerUnavailable as exc:
        sys.exit(str(exc))
