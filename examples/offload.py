"""Offload Python functions to a worker: remote calls, errors, sessions.

    python examples/offload.py

With VACCELRAY_ADDRESS unset, an embedded local worker runs the tasks in its
warm process pool; set it (and VACCELRAY_TOKEN for a non-loopback worker) to
use a remote one.
"""

from __future__ import annotations

from pathlib import Path

import vaccelray

HERE = Path(__file__).parent


@vaccelray.offload(retries=2, timeout=30)
def preprocess_and_classify(path: str) -> str:
    # Runs on the worker: reads the file there, classifies on its backend.
    image = Path(path).read_bytes()
    return vaccelray.local.classify(image)


@vaccelray.offload
def square(x: int) -> int:
    return x * x


@vaccelray.offload
def total(values: list[int]) -> int:
    return sum(values)


class NotAnImage(ValueError):
    pass


@vaccelray.offload
def check(data: bytes) -> int:
    if not data.startswith(b"\xff\xd8"):
        raise NotAnImage(f"{len(data)} bytes that are not a JPEG")
    return len(data)


def main() -> None:
    vaccelray.init()
    try:
        # .remote() returns a TaskRef at once; get() waits for the result.
        ref = preprocess_and_classify.remote(str(HERE / "cat.jpeg"))
        print("cat.jpeg:", vaccelray.get(ref))

        # Many tasks at once; wait() for the first few.
        refs = [square.remote(i) for i in range(20)]
        done, pending = vaccelray.wait(refs, num_returns=5, timeout=10)
        print(f"first {len(done)} done, {len(pending)} pending")
        print("squares:", vaccelray.get(refs))

        # A TaskRef as an argument: resolved before the task runs.
        print("sum of squares:", total(vaccelray.get(refs)), square(square.remote(3)))

        # Remote exceptions come back as your own type (and vaccelray.TaskError).
        try:
            check(b"GIF89a...")
        except NotAnImage as exc:
            print(f"NotAnImage: {exc} (a TaskError: {isinstance(exc, vaccelray.TaskError)})")

        # A session is pinned to one worker; its tasks use the same vAccel session.
        with vaccelray.Session() as session:
            print("session classify:", session.classify((HERE / "coffee.jpeg").read_bytes()))
            print("session run:", session.run(preprocess_and_classify, str(HERE / "coffee.jpeg")))
    finally:
        vaccelray.shutdown()


if __name__ == "__main__":
    main()
