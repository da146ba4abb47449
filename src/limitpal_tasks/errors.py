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
        super().__init__(f"{field}: {expected}, got {value!r}")


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
        super().__init__(
            f"gave up after {deferrals} deferrals over {waited:.1f}s (limit: {limit}; last reason: {reason})"
        )

    def __reduce__(self) -> tuple[type[DeferralLimitExceeded], tuple[str, str, int, float]]:
        return (type(self), (self.reason, self.limit, self.deferrals, self.waited))


class RetryBudgetExhausted(LimitpalError):
    """A retry was refused because the key's fleet-wide retry budget is spent."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"retry budget exhausted for key {key!r}")

    def __reduce__(self) -> tuple[type[RetryBudgetExhausted], tuple[str]]:
        return (type(self), (self.key,))


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
        super().__init__(message or f"upstream asked to come back in {self.retry_after:g}s")

    def __reduce__(self) -> tuple[type[Cooldown], tuple[float, str]]:
        return (type(self), (self.retry_after, str(self)))
