"""Line charts as SVG text, drawn on the server (the page needs no chart library)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Final

__all__ = ["line_chart"]

WIDTH: Final = 560
HEIGHT: Final = 150
_PAD: Final = 30
#: Stroke colours of the series, in order.
COLOURS: Final = ("#2266cc", "#cc3322", "#22aa55")


def _nice(value: float) -> float:
    """The smallest of 1, 2, 5 or 10 times a power of ten at or above *value* (> 0)."""
    scale = 10.0 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 5, 10) if step * scale >= value)


def line_chart(
    title: str, unit: str, series: Sequence[tuple[str, Sequence[float]]], span: float
) -> str:
    """An SVG chart of *series* ((name, points), oldest first) over the last *span* seconds."""
    top = _nice(max((max(points, default=0.0) for _, points in series), default=0.0) or 1.0)
    inner_w, inner_h = WIDTH - 2 * _PAD, HEIGHT - 2 * _PAD
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<text x="{_PAD}" y="16" font-size="13" font-family="sans-serif">'
        f"{escape(title)} ({escape(unit)}, last {span:g} s)</text>",
        f'<rect x="{_PAD}" y="{_PAD}" width="{inner_w}" height="{inner_h}" fill="none" '
        'stroke="#bbb"/>',
        f'<text x="{_PAD - 4}" y="{_PAD + 4}" font-size="10" text-anchor="end" '
        f'font-family="sans-serif">{top:g}</text>',
        f'<text x="{_PAD - 4}" y="{HEIGHT - _PAD}" font-size="10" text-anchor="end" '
        'font-family="sans-serif">0</text>',
    ]
    for i, (name, points) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        n = len(points)
        if n:
            step = inner_w / max(n - 1, 1)
            coords = " ".join(
                f"{_PAD + j * step:.1f},{_PAD + inner_h * (1 - v / top):.1f}"
                for j, v in enumerate(points)
            )
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'
            )
        parts.append(
            f'<text x="{_PAD + 8 + 110 * i}" y="{HEIGHT - 8}" font-size="11" fill="{colour}" '
            f'font-family="sans-serif">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
