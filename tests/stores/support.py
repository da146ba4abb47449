"""Assertions shared by the store tests."""

from __future__ import annotations

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
