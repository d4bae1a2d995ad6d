"""Choosing and constructing the worker's backend.

Resolution: the ``--backend`` value, else ``VACCEL_PLUGINS``, else
``VACCEL_BACKENDS`` (vAccel's older name), else the built-in default (``onnx``
when its extra is installed, ``noop`` otherwise). A value ending in ``.so``
(a plugin name or path; the first of a colon-separated list) means the real
libvaccel with that plugin; ``noop`` and ``onnx`` are built in.
"""

from __future__ import annotations

import os

from vaccelray.errors import VaccelrayError
from vaccelray.worker.backend import Backend

__all__ = ["BUILTIN_BACKENDS", "BackendError", "load_backend", "resolve_backend_spec"]

BUILTIN_BACKENDS = ("noop", "onnx")


class BackendError(VaccelrayError):
    """The requested backend cannot be used; the message says why and what to do."""


def default_backend() -> str:
    from vaccelray.worker.onnx import onnx_available

    return "onnx" if onnx_available() else "noop"


def resolve_backend_spec(spec: str | None) -> str:
    """The backend to use, following the resolution order of this module."""
    for value in (spec, os.environ.get("VACCEL_PLUGINS"), os.environ.get("VACCEL_BACKENDS")):
        if value:
            return value
    return default_backend()


def load_backend(spec: str | None = None, *, libvaccel: str | None = None) -> Backend:
    """Construct (not start) the backend named by *spec* (see :func:`resolve_backend_spec`)."""
    name = resolve_backend_spec(spec)
    if name == "noop":
        from vaccelray.worker.noop import NoopBackend

        return NoopBackend()
    if name == "onnx":
        from vaccelray.worker.onnx import OnnxBackend, onnx_available

        if not onnx_available():
            raise BackendError(
                "the onnx backend needs its extra: pip install 'vaccelray[onnx]' "
                "(or use --backend noop)"
            )
        return OnnxBackend()
    plugin = name.split(":")[0]
    if plugin.endswith(".so") or ".so." in plugin:
        from vaccelray.worker.libvaccel import LibvaccelBackend

        return LibvaccelBackend(name, libvaccel=libvaccel)
    raise BackendError(
        f"unknown backend {name!r}: use noop, onnx, or a vAccel plugin such as libvaccel-noop.so"
    )
