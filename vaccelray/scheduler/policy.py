"""The routing policy: which worker gets the next session or task (pure).

A worker's load is what runs on it and what is bound to it, per slot:
``(calls in flight + sessions) / capacity``, taking for each count the larger
of what this scheduler knows (its own calls) and what the worker last
reported (which includes other clients'), less the reported sessions this
scheduler is destroying (``leaving``: sessions it left on the worker while it
was unreachable, destroyed when it returns). The least-loaded healthy worker
that supports the operation wins; equal loads take turns (``turn`` rotates
through the tied workers, so ties are broken round-robin, not by name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["LoadView", "load_score", "pick_least_loaded"]


class LoadView(Protocol):
    """What the policy reads of a worker."""

    @property
    def address(self) -> str: ...
    @property
    def ops(self) -> frozenset[str]: ...
    @property
    def capacity(self) -> int: ...
    @property
    def inflight(self) -> int: ...
    @property
    def sessions(self) -> int: ...
    @property
    def reported_inflight(self) -> int: ...
    @property
    def reported_sessions(self) -> int: ...
    @property
    def leaving(self) -> int: ...


def load_score(worker: LoadView) -> float:
    inflight = max(worker.inflight, worker.reported_inflight)
    sessions = max(worker.sessions, worker.reported_sessions - worker.leaving)
    return (inflight + sessions) / max(1, worker.capacity)


def pick_least_loaded(
    candidates: Sequence[LoadView], *, op: str | None = None, turn: int = 0
) -> LoadView | None:
    """The least-loaded candidate supporting *op* (any when None), or None.

    *candidates* must already be the healthy ones. Among equal loads the
    ``turn``-th (modulo their number, in address order) is chosen.
    """
    capable = [w for w in candidates if op is None or op in w.ops]
    if not capable:
        return None
    scored = [(load_score(w), w) for w in capable]
    best = min(score for score, _ in scored)
    tied = sorted((w for score, w in scored if score == best), key=lambda w: w.address)
    return tied[turn % len(tied)]
