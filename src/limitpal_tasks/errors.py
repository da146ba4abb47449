"""The exceptions limitpal_tasks raises, all under one root, :class:`LimitpalError`."""

from __future__ import annotations

import math
from datetime import timedelta

__all__ = [
    "ConfigurationError",
    "Cooldown",
    "DeferralLimitExceeded",
    "LimitpalError",
    "RetryBudgetExhausted",
    "StoreError",
]


class LimitpalError(Exception):
    """Root of every exception raised by limitpal_tasks."""


class ConfigurationError(LimitpalError, ValueError):
    """A policy, setting or key template is invalid.

    The message always names the field and the offending value, e.g.
    ``breaker.failure_rate_threshold: expected a number in (0, 100], got 150``.
    """

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(field, value, expected)  # the constructor's args: picklable, rebuildable

    def __str__(self) -> str:
        return f"{self.field}: {self.expected}, got {self.value!r}"


class StoreError(LimitpalError):
    """The state store could not answer (unreachable, too slow, or a garbled reply).

    The client library's exception is chained as ``__cause__``.
    """


class DeferralLimitExceeded(LimitpalError):
    """A task was deferred too often or for too long; it goes to the dead letter."""

    def __init__(self, reason: str, limit: str, deferrals: int, waited: float) -> None:
        self.reason = reason
        self.limit = limit
        self.deferrals = deferrals
        self.waited = waited
        # args are the constructor's: Celery rebuilds JSON-serialized errors as cls(*args).
        super().__init__(reason, limit, deferrals, waited)

    def __str__(self) -> str:
        return (
            f"gave up after {self.deferrals} deferrals over {self.waited:.1f}s "
            f"(limit: {self.limit}; last reason: {self.reason})"
        )


class RetryBudgetExhausted(LimitpalError):
    """A retry was refused because the key's fleet-wide retry budget is spent."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)

    def __str__(self) -> str:
        return f"retry budget exhausted for key {self.key!r}"


class Cooldown(LimitpalError):
    """Raise from a task when the upstream said "come back later" (HTTP 429/503 ``Retry-After``).

    The task's key is paused fleet-wide for ``retry_after`` seconds and the task itself
    is deferred, not failed::

        if response.status_code == 429:
            raise Cooldown(retry_after=float(response.headers["Retry-After"]))
    """

    def __init__(self, retry_after: float | timedelta, message: str = "") -> None:
        seconds = retry_after.total_seconds() if isinstance(retry_after, timedelta) else retry_after
        if not isinstance(seconds, (int, float)) or seconds < 0 or math.isnan(seconds):
            raise ConfigurationError("Cooldown.retry_after", retry_after, "expected seconds >= 0")
        self.retry_after = float(seconds)
        self.message = message or f"upstream asked to come back in {self.retry_after:g}s"
        super().__init__(self.retry_after, message)

    def __str__(self) -> str:
        return self.message
