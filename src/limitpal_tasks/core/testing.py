"""A switch for users' own test suites: deferrals and retries without waiting.

>>> from limitpal_tasks import set_testing
>>> with set_testing():
...     pass  # every Deferred.delay and RetryDecision.delay is 0 here
"""

from __future__ import annotations

from types import TracebackType

__all__ = ["is_testing", "set_testing"]

_on = [False]


def is_testing() -> bool:
    """Whether delays are currently zeroed."""
    return _on[0]


class set_testing:
    """Zero every deferral and retry delay, so a test suite runs without waiting.

    ``set_testing(True)`` switches it on for the process (``set_testing(False)`` off);
    used as a context manager it restores the previous setting on exit. Decisions are
    unchanged: a deferred task is still deferred, with its reason, and counts toward its
    bounds.
    """

    def __init__(self, on: bool = True) -> None:
        self._previous = _on[0]
        _on[0] = on

    def __enter__(self) -> set_testing:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _on[0] = self._previous
