"""Store contract: parked deferrals — kept until due, claimed once, released in order, paced per key."""

from __future__ import annotations

import pytest

from limitpal_tasks import MockClock, Store
from limitpal_tasks.core.parking import ParkedEntry

LEASE = 30.0
PARK = "test"


def entry(key: str = "tenant:a", delay: float = 5.0, interval: float = 0.0, n: int = 0) -> ParkedEntry:
    return ParkedEntry(
        park=PARK,
        task_name="charge",
        policy="payments",
        key=key,
        delay=delay,
        interval=interval,
        payload={"n": n, "args": [], "nested": {"empty": []}},
    )


def take(store: Store, limit: int = 100) -> list[int]:
    """Claim what is due and confirm it; the ``n`` of each entry taken."""
    taken = store.take_parked(PARK, limit, LEASE)
    for parked in taken:
        store.confirm_parked(PARK, parked.id)
    return [int(parked.payload["n"]) for parked in taken]


def test_a_parked_entry_is_kept_until_due_then_taken_whole(store: Store, clock: MockClock) -> None:
    """Nothing is released before the delay; then the entry comes back as parked, with its due time."""
    parked = store.park(entry(delay=5.0), limit=10)
    assert parked is not None
    assert parked.due == pytest.approx(clock.now() + 5.0)
    clock.advance(4.9)
    assert store.take_parked(PARK, 10, LEASE) == []
    clock.advance(0.2)

    (taken,) = store.take_parked(PARK, 10, LEASE)

    assert taken == parked
    assert taken.payload == {"n": 0, "args": [], "nested": {"empty": []}}


def test_entries_leave_in_due_order_and_in_parking_order_when_due_together(
    store: Store, clock: MockClock
) -> None:
    """Due times order the releases; entries due at the same time leave in the order they were parked."""
    for n, delay in enumerate([3.0, 1.0, 2.0, 2.0, 2.0]):
        store.park(entry(delay=delay, n=n), limit=10)
    clock.advance(3.0)
    assert take(store) == [1, 2, 3, 4, 0]


def test_a_claimed_entry_is_released_to_one_taker_only(store: Store, clock: MockClock) -> None:
    """Two releasers taking at once: each entry goes to exactly one of them."""
    for n in range(6):
        store.park(entry(delay=0.0, n=n), limit=10)
    first = store.take_parked(PARK, 4, LEASE)
    second = store.take_parked(PARK, 4, LEASE)
    ids = [p.id for p in first + second]
    assert len(ids) == 6
    assert len(set(ids)) == 6
    assert store.take_parked(PARK, 4, LEASE) == []


def test_an_unconfirmed_claim_is_released_again_after_its_lease(store: Store, clock: MockClock) -> None:
    """A releaser that died between taking and publishing: its entry is due again once the lease ends."""
    store.park(entry(delay=0.0, n=7), limit=10)
    (lost,) = store.take_parked(PARK, 10, LEASE)
    clock.advance(LEASE - 1)
    assert store.take_parked(PARK, 10, LEASE) == []
    clock.advance(2)

    (again,) = store.take_parked(PARK, 10, LEASE)
    store.confirm_parked(PARK, again.id)

    assert again.id == lost.id
    clock.advance(2 * LEASE)
    assert store.take_parked(PARK, 10, LEASE) == []
    assert store.parked(PARK) == []


def test_a_late_confirm_prevents_a_second_release(store: Store, clock: MockClock) -> None:
    """Published, but confirmed after the lease: the entry is forgotten, not released twice."""
    store.park(entry(delay=0.0), limit=10)
    (slow,) = store.take_parked(PARK, 10, LEASE)
    clock.advance(LEASE + 1)
    store.confirm_parked(PARK, slow.id)
    assert store.take_parked(PARK, 10, LEASE) == []


def test_releases_of_one_key_are_paced_at_its_interval(store: Store, clock: MockClock) -> None:
    """Five entries of a key due at once leave one per interval, in order; another key is not held back."""
    for n in range(5):
        store.park(entry("tenant:a", delay=0.0, interval=1.0, n=n), limit=10)
    store.park(entry("tenant:b", delay=0.0, interval=1.0, n=100), limit=10)

    released = [take(store)]
    for _ in range(5):
        clock.advance(1.0)
        released.append(take(store))

    assert released == [[0, 100], [1], [2], [3], [4], []]


def test_a_full_key_refuses_more(store: Store) -> None:
    """A key already holding ``limit`` parked tasks refuses the next one; other keys still park."""
    assert all(store.park(entry("tenant:a", n=n), limit=3) for n in range(3))
    assert store.park(entry("tenant:a", n=3), limit=3) is None
    assert store.park(entry("tenant:b"), limit=3) is not None


def test_summary_release_and_purge(store: Store, clock: MockClock) -> None:
    """parked() counts per key with the next due time; release makes a key due now; purge deletes."""
    store.park(entry("tenant:a", delay=60.0), limit=10)
    store.park(entry("tenant:a", delay=30.0), limit=10)
    store.park(entry("tenant:b", delay=10.0), limit=10)
    now = clock.now()
    summary = [(s.key, s.count, round((s.next_due or 0) - now, 3)) for s in store.parked(PARK)]
    assert summary == [("tenant:a", 2, 30.0), ("tenant:b", 1, 10.0)]

    assert store.release_parked(PARK, "tenant:a") == 2
    assert len(store.take_parked(PARK, 10, LEASE)) == 2
    assert store.purge_parked(PARK, "tenant:b") == 1
    assert store.purge_parked(PARK) == 2  # the two taken of tenant:a, never confirmed
    assert store.parked(PARK) == []


def test_parks_are_separate(store: Store, clock: MockClock) -> None:
    """An entry parked in one park (say Celery's) is never taken from another (Dramatiq's)."""
    store.park(entry(delay=0.0), limit=10)
    assert store.take_parked("other", 10, LEASE) == []
    assert len(store.take_parked(PARK, 10, LEASE)) == 1


def test_an_unpaced_entry_leaves_when_due_past_the_keys_paced_backlog(store: Store, clock: MockClock) -> None:
    """A rate-limited deferral (interval 0: its booked slot paces it) is not queued behind paced ones."""
    for n in range(5):
        store.park(entry("tenant:a", delay=0.0, interval=1.0, n=n), limit=10)
    assert take(store) == [0]  # the rest now hold paced slots 1 s apart
    store.park(entry("tenant:a", delay=0.5, interval=0.0, n=99), limit=10)
    clock.advance(0.5)
    assert take(store) == [99]
