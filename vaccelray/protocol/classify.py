"""``vaccelray.v1.Worker/Classify``: classification with scores (msgspec, no I/O).

The vAccel agent's ImageClassification answers one tag text; this method
answers the top-k labels with their scores where the backend has them, and
needs no session.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["CLASSIFY_METHOD", "ClassifyReply", "ClassifyRequest"]

CLASSIFY_METHOD: Final = "Classify"


class ClassifyRequest(msgspec.Struct, frozen=True, kw_only=True):
    image: bytes
    top_k: int = 5


class ClassifyReply(msgspec.Struct, frozen=True, kw_only=True):
    #: What a vAccel client would get as the tag text.
    tag: str
    #: Up to top_k (label, score) pairs, best first; empty for backends without scores.
    labels: tuple[tuple[str, float], ...] = ()
