"""Classify a directory of images through one actor that holds a vAccel session.

    python examples/actor_classifier.py [DIRECTORY]

The actor is created once: its process opens a session on the worker's
accelerator at its first call (the model is loaded once, by the worker's backend: ``onnx`` for
real ImageNet labels, ``noop`` for a stand-in) and keeps it for every call;
the images are sent to it in order and classified there one at a time. With
VACCELRAY_ADDRESS unset, an embedded local worker does the work (backend:
VACCEL_PLUGINS, else the built-in default). DIRECTORY defaults to this
example's folder (its ``*.jpeg`` files).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import vaccelray

HERE = Path(__file__).parent
SUFFIXES = {".jpeg", ".jpg", ".png"}


@vaccelray.offload
class Classifier:
    """One session, opened by the first call and used by every later one."""

    def __init__(self) -> None:
        from vaccelray import local

        self.local = local
        self.calls = 0

    def classify(self, image: bytes) -> str:
        self.calls += 1
        return self.local.classify(image)

    def stats(self) -> tuple[int, int]:
        """Calls served, and the process serving them."""
        return self.calls, os.getpid()


def main(directory: str | None) -> None:
    folder = Path(directory) if directory else HERE
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    vaccelray.init()
    try:
        classifier = Classifier.remote()
        refs = [classifier.classify.remote(p.read_bytes()) for p in images]
        for path, tag in zip(images, vaccelray.get(refs), strict=True):
            print(f"{path.name}: {tag}")
        calls, _ = vaccelray.get(classifier.stats.remote())
        print(f"{calls} images classified by one actor")
        vaccelray.kill(classifier)
    finally:
        vaccelray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
