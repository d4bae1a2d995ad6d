"""The request id a call carries across hops, as ttrpc metadata (sans-IO).

A client may send ``vaccelray-request-id``; the first hop that gets a call
without one makes one, and every hop sends it on with the calls it makes
for that call. A peer controls it, so only a short id of plain characters
is taken as it is: anything else is replaced by a fresh id.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_REQUEST_ID", "REQUEST_ID_KEY", "valid_request_id"]

#: The ttrpc metadata key of the request id.
REQUEST_ID_KEY: Final = "vaccelray-request-id"
#: Longest request id taken from a peer (a UUID is 36).
MAX_REQUEST_ID: Final = 64

_PLAIN = re.compile(r"[A-Za-z0-9._:-]+")


def valid_request_id(text: str) -> bool:
    """Whether *text* may be logged and sent on as a request id."""
    return len(text) <= MAX_REQUEST_ID and _PLAIN.fullmatch(text) is not None
