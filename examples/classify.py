"""Classify images on a worker's accelerator, in one vAccel session.

    python examples/classify.py [IMAGE...]

With VACCELRAY_ADDRESS unset, an embedded local worker does the work (its
backend: VACCEL_PLUGINS / VACCEL_BACKENDS, else the built-in default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import vaccelray

HERE = Path(__file__).parent


def main(paths: list[str]) -> None:
    images = [Path(p) for p in paths] or [HERE / "cat.jpeg", HERE / "coffee.jpeg"]
    vaccelray.init()
    try:
        with vaccelray.Session() as session:
            for path in images:
                print(f"{path.name}: {session.classify(path.read_bytes())}")
    finally:
        vaccelray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
