"""The rule every record of a daemon's bounds follows: 0 means no bound, less is refused."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Bounds"]


@dataclass(frozen=True)
class Bounds:
    """Base of a frozen dataclass of integer bounds (0: no bound).

    A negative value is refused when the record is made, naming the field,
    so a bad option fails at start and not at the first call past it.
    """

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value < 0:
                raise ValueError(f"{spec.name} must be 0 (no bound) or more, got {value}")
