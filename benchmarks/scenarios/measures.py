"""Small, exact measures over event times: percentiles, sliding-window maxima, bins."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["bins", "first_sustained", "max_in_window", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); ``inf`` values (unfinished tasks) sort last."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def max_in_window(
    times: Sequence[float], width: float, start: float = -math.inf, end: float = math.inf
) -> int:
    """The largest number of ``times`` (sorted) in any window ``[t, t + width)`` inside ``[start, end)``."""
    inside = [t for t in times if start <= t < end]
    best = 0
    low = 0
    for high, t in enumerate(inside):
        while inside[low] <= t - width:
            low += 1
        best = max(best, high - low + 1)
    return best


def bins(times: Sequence[float], start: float, end: float, width: float) -> list[int]:
    """Counts of ``times`` in consecutive bins of ``width`` from ``start`` to ``end``."""
    n = max(1, math.ceil((end - start) / width - 1e-9))
    counts = [0] * n
    for t in times:
        if start <= t < end:
            counts[min(n - 1, int((t - start) / width))] += 1
    return counts


def first_sustained(times: Sequence[float], start: float, width: float, needed: float) -> float | None:
    """The first ``t >= start`` with at least ``needed`` of ``times`` (sorted) in ``(t - width, t]``."""
    low = 0
    for high, t in enumerate(times):
        while times[low] <= t - width:
            low += 1
        if t >= start and high - low + 1 >= needed:
            return t
    return None
