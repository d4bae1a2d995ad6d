"""Where a client connects: explicit address, then the environment, else embedded."""

from __future__ import annotations

import os

__all__ = ["ADDRESS_ENV_VARS", "resolve_address"]

#: Looked up in this order; the vAccel ones let existing vAccel setups just work.
ADDRESS_ENV_VARS = ("VACCELRAY_ADDRESS", "VACCEL_RPC_ADDRESS", "VACCEL_RPC_ADDR", "VACCEL_VSOCK")


def resolve_address(explicit: str | None = None) -> str | None:
    """The cluster address to use, or None when an embedded local worker should start."""
    if explicit:
        return explicit
    for name in ADDRESS_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None
