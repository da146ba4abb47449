"""Assertions shared by the store tests."""

from __future__ import annotations

import bisect
from typing import Any

import pytest

from limitpal_tasks import Admitted, Decision, Deferred, Ticket


def admitted(decision: Decision) -> Ticket:
    """The ticket of ``decision``, which must be Admitted."""
    assert isinstance(decision, Admitted), f"expected Admitted, got {decision!r}"
    return decision.ticket


def deferred(decision: Decision) -> Deferred:
    """``decision``, which must be Deferred."""
    assert isinstance(decision, Deferred), f"expected Deferred, got {decision!r}"
    return decision


def about(expected: object) -> Any:
    """Equal to ``expected`` within 10 µs: times near 1.7e9 s carry about 0.2 µs of rounding."""
    return pytest.approx(expected, abs=1e-5)


def most_in_window(times: list[float], length: float) -> int:
    """The most events in any closed window ``[t, t + length]`` (10 µs of rounding allowed)."""
    times = sorted(times)
    return max(
        (bisect.bisect_right(times, start + length + 1e-5) - i for i, start in enumerate(times)), default=0
    )
