"""Time, injected: every rule of the engine reads the clock it is given, never ``time``."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "MockClock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time in seconds, and a way to wait."""

    def now(self) -> float:
        """Current time in seconds since the Unix epoch."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds``."""
        ...

    async def sleep_async(self, seconds: float) -> None:
        """Wait for ``seconds`` without blocking the event loop."""
        ...


class MonotonicClock:
    """Wall-clock seconds that never go backwards within a process.

    Anchored to ``time.time()`` once, then advanced by ``time.monotonic()``, so values are
    comparable across processes (as far as their hosts' clocks agree) while an NTP step
    can never make a deadline or lease jump. Fleet-wide decisions do not depend on it:
    the Redis store reads the server's clock.
    """

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = time.time() - time.monotonic()

    def now(self) -> float:
        return self._offset + time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    async def sleep_async(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class MockClock:
    """A clock that moves only when told to; ``sleep`` advances it instead of waiting.

    >>> clock = MockClock(1000.0)
    >>> clock.advance(2.5)
    1002.5
    """

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (never backwards) and return the new time."""
        if seconds < 0:
            raise ValueError(f"MockClock.advance: seconds must be >= 0, got {seconds!r}")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        """Jump to an absolute time (tests may go backwards to simulate clock skew)."""
        with self._lock:
            self._now = float(now)

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    async def sleep_async(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
