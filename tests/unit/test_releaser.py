"""The releaser of parked tasks: publish, then confirm; stop early rather than double-publish."""

from __future__ import annotations

import itertools

import pytest

from limitpal_tasks import MemoryStore, MockClock
from limitpal_tasks.core.parking import ParkedEntry
from limitpal_tasks.integrations._runtime import Releaser

LEASE = 10.0


def parked_store(clock: MockClock, count: int) -> MemoryStore:
    store = MemoryStore(clock=clock)
    for n in range(count):
        store.park(ParkedEntry("p", "t", "x", "k", 0.0, 0.0, {"n": n}), limit=100)
    return store


def test_a_failed_publish_stops_the_batch_and_everything_is_released_again_after_the_lease() -> None:
    """Broker down: one publish fails, the batch stops; after the lease each entry is published once."""
    clock = MockClock()
    store = parked_store(clock, 5)
    attempts: list[int] = []
    published: list[int] = []
    broker_up = False

    def publish(entry: ParkedEntry) -> None:
        attempts.append(entry.payload["n"])
        if not broker_up:
            raise ConnectionError("broker down")
        published.append(entry.payload["n"])

    releaser = Releaser(store, "p", publish, lease=LEASE)
    assert releaser.run_once() == 0
    assert attempts == [0], "no slow failing publishes for the rest of the batch"

    broker_up = True
    assert releaser.run_once() == 0, "claimed: not due again before the lease ends"
    clock.advance(LEASE + 1)
    assert releaser.run_once() == 5
    assert sorted(published) == [0, 1, 2, 3, 4]
    clock.advance(LEASE + 1)
    assert releaser.run_once() == 0


def test_a_batch_that_outlives_half_its_lease_leaves_the_rest_for_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Publishing slower than half the lease stops the batch: no other releaser can hold those entries yet."""
    clock = MockClock()
    store = parked_store(clock, 5)
    ticks = itertools.count(step=2.0)  # every publish "takes" 2 s of the releaser's own clock
    monkeypatch.setattr("limitpal_tasks.integrations._runtime.time.monotonic", lambda: float(next(ticks)))
    published: list[int] = []

    releaser = Releaser(store, "p", lambda entry: published.append(entry.payload["n"]), lease=LEASE)

    assert releaser.run_once() == 2
    assert published == [0, 1]
    clock.advance(LEASE + 1)
    monkeypatch.setattr("limitpal_tasks.integrations._runtime.time.monotonic", lambda: 0.0)
    assert releaser.run_once() == 3
    assert published == [0, 1, 2, 3, 4]
