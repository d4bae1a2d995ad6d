"""The zeroconf announcement of a worker: its DNS-SD service type and TXT record.

The TXT record carries what a scheduler needs before it connects: ``version``,
``backend``, ``ops`` (comma-separated), ``capacity`` and ``instance`` (random
per start). Workers write it (:func:`txt_record`), schedulers read it
(:func:`parse_txt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from vaccelray.protocol.info import WorkerInfo

__all__ = ["SERVICE_TYPE", "parse_txt", "txt_record"]

SERVICE_TYPE: Final = "_vaccelray._tcp.local."


def txt_record(info: WorkerInfo) -> dict[str, str]:
    return {
        "version": info.version,
        "backend": info.backend,
        "ops": ",".join(sorted(info.ops)),
        "capacity": str(info.capacity),
        "instance": info.instance,
    }


def parse_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """A TXT record as text keys and values (a key without a value maps to "")."""
    return {
        key.decode(errors="replace"): (value or b"").decode(errors="replace")
        for key, value in properties.items()
    }
