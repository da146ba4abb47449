"""Specification of the injected clocks: ``MockClock`` for tests and ``MonotonicClock`` for production."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

from limitpal_tasks import Clock, MockClock, MonotonicClock

# -- MockClock ---------------------------------------------------------------------------


def test_mock_clock_starts_where_told() -> None:
    """``MockClock(start)`` reads ``start`` until moved."""
    clock = MockClock(1000.0)
    assert clock.now() == 1000.0
    assert clock.now() == 1000.0


def test_mock_clock_default_start_is_a_realistic_epoch() -> None:
    """A default ``MockClock`` starts at a fixed, realistic Unix time (not zero)."""
    assert MockClock().now() == 1_700_000_000.0


def test_mock_clock_advance_moves_time_and_returns_it() -> None:
    """``advance(s)`` moves time forward by ``s`` and returns the new time."""
    clock = MockClock(1000.0)
    assert clock.advance(2.5) == 1002.5
    assert clock.now() == 1002.5


def test_mock_clock_advances_accumulate() -> None:
    """Successive advances add up."""
    clock = MockClock(0.0)
    for _ in range(4):
        clock.advance(0.25)
    assert clock.now() == 1.0


def test_mock_clock_refuses_to_advance_backwards() -> None:
    """``advance`` with a negative amount raises ``ValueError`` and leaves time unchanged."""
    clock = MockClock(1000.0)
    with pytest.raises(ValueError, match="-1"):
        clock.advance(-1)
    assert clock.now() == 1000.0


def test_mock_clock_set_jumps_to_an_absolute_time() -> None:
    """``set(t)`` makes ``now()`` return ``t``."""
    clock = MockClock(1000.0)
    clock.set(5000.0)
    assert clock.now() == 5000.0


def test_mock_clock_set_may_go_backwards() -> None:
    """``set`` may move time backwards, to simulate clock skew."""
    clock = MockClock(1000.0)
    clock.set(10.0)
    assert clock.now() == 10.0


def test_mock_clock_sleep_advances_time() -> None:
    """``sleep(s)`` advances the clock by ``s`` instead of waiting."""
    clock = MockClock(1000.0)
    clock.sleep(30.0)
    assert clock.now() == 1030.0


def test_mock_clock_sleep_never_blocks() -> None:
    """``sleep`` of an hour returns at once in real time."""
    clock = MockClock(0.0)
    started = time.monotonic()
    clock.sleep(3600.0)
    assert time.monotonic() - started < 1.0
    assert clock.now() == 3600.0


def test_mock_clock_sleep_of_a_negative_duration_does_nothing() -> None:
    """``sleep`` of a negative duration neither raises nor moves time."""
    clock = MockClock(1000.0)
    clock.sleep(-5.0)
    assert clock.now() == 1000.0


def test_mock_clock_sleep_async_advances_time() -> None:
    """``await sleep_async(s)`` advances the clock by ``s``."""
    clock = MockClock(1000.0)
    asyncio.run(clock.sleep_async(12.0))
    assert clock.now() == 1012.0


def test_mock_clock_sleep_async_never_blocks() -> None:
    """``sleep_async`` of an hour completes well within a one-second real timeout."""
    clock = MockClock(0.0)

    async def main() -> None:
        await asyncio.wait_for(clock.sleep_async(3600.0), timeout=1.0)

    asyncio.run(main())
    assert clock.now() == 3600.0


def test_mock_clock_advance_is_thread_safe() -> None:
    """Advances from many threads at once add up exactly."""
    clock = MockClock(0.0)
    threads, per_thread = 16, 2000
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            clock.advance(0.5)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert clock.now() == threads * per_thread * 0.5


@pytest.mark.parametrize("clock", [MockClock(), MonotonicClock()], ids=["mock", "monotonic"])
def test_clocks_satisfy_the_clock_protocol(clock: object) -> None:
    """Both clocks implement the ``Clock`` protocol."""
    assert isinstance(clock, Clock)


# -- MonotonicClock ------------------------------------------------------------------------


def test_monotonic_clock_is_near_wall_clock_time() -> None:
    """``MonotonicClock.now()`` reads Unix time, within a second of ``time.time()``."""
    assert abs(MonotonicClock().now() - time.time()) < 1.0


def test_monotonic_clock_never_goes_backwards() -> None:
    """Successive readings never decrease."""
    clock = MonotonicClock()
    readings = [clock.now() for _ in range(10_000)]
    assert all(later >= earlier for earlier, later in itertools.pairwise(readings))


def test_monotonic_clock_ignores_wall_clock_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wall-clock step (NTP) after construction does not move the clock."""
    clock = MonotonicClock()
    before = clock.now()
    monkeypatch.setattr(time, "time", lambda: before - 86_400.0)
    after = clock.now()
    assert after >= before
    assert after - before < 1.0


def test_monotonic_clock_sleep_of_a_negative_duration_returns() -> None:
    """``sleep`` of a negative duration returns instead of raising."""
    MonotonicClock().sleep(-1.0)
