"""Specification of ``MemoryStore``'s memory bounds: idle keys are evicted, ``max_keys`` caps the rest.

A key idle for ``idle_ttl`` with nothing pending (no open breaker, pause, live lease or
booked slot) is evicted as the store works on other keys; beyond ``max_keys`` keys the
least recently used go first. Whether a key was kept shows in what its status remembers.
"""

from __future__ import annotations

import itertools

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    ConfigurationError,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    TaskContext,
    Ticket,
)

IDLE_TTL = 10.0
_fresh = itertools.count()


def context(tenant: str) -> TaskContext:
    return TaskContext("task", kwargs={"tenant_id": tenant})


def counted(lease: float = 1.0) -> Policy:
    """A policy whose breaker remembers every outcome (so a kept key is visible in its status)."""
    return Policy("api", key="tenant:{tenant_id}", breaker=Breaker(minimum_calls=1000), lease=lease)


def start(pipeline: Pipeline, policy: Policy, tenant: str) -> Ticket:
    decision = pipeline.admit(policy, context(tenant))
    assert isinstance(decision, Admitted), decision
    return decision.ticket


def run(pipeline: Pipeline, policy: Policy, tenant: str) -> None:
    """One execution of ``tenant`` that succeeds and is recorded at once."""
    pipeline.record(start(pipeline, policy, tenant), Outcome.success())


def touch_other_keys(pipeline: Pipeline, count: int = 300) -> None:
    """Work on ``count`` fresh keys, giving the store the chance to sweep everywhere."""
    policy = counted()
    for _ in range(count):
        run(pipeline, policy, f"other-{next(_fresh)}")


@pytest.fixture
def store(clock: MockClock) -> MemoryStore:
    return MemoryStore(clock=clock, idle_ttl=IDLE_TTL)


@pytest.fixture
def pipeline(store: MemoryStore, clock: MockClock) -> Pipeline:
    return Pipeline(store, clock=clock)


def test_idle_keys_are_evicted_after_idle_ttl(
    store: MemoryStore, pipeline: Pipeline, clock: MockClock
) -> None:
    """Keys untouched for ``idle_ttl`` with nothing pending disappear as other keys are worked on."""
    for n in range(50):
        run(pipeline, counted(lease=1), f"idle-{n}")
    assert len(store) == 50

    clock.advance(IDLE_TTL + 1)
    touch_other_keys(pipeline)

    assert len(store) == 300
    assert all(store.status(f"tenant:idle-{n}").calls == 0 for n in range(50))


def test_keys_are_kept_until_idle_ttl_has_passed(
    store: MemoryStore, pipeline: Pipeline, clock: MockClock
) -> None:
    """A key used less than ``idle_ttl`` ago is never evicted by the sweep."""
    run(pipeline, counted(lease=1), "recent")

    clock.advance(IDLE_TTL - 1)
    touch_other_keys(pipeline)

    assert store.status("tenant:recent").calls == 1


def test_key_with_an_open_breaker_is_kept_until_it_may_close(
    store: MemoryStore, pipeline: Pipeline, clock: MockClock
) -> None:
    """An OPEN breaker is not forgotten while idle; once its break is over the key may go."""
    policy = Policy("api", key="service:x", breaker=Breaker(minimum_calls=1, open_for=100), lease=1)
    pipeline.record(start(pipeline, policy, "a"), Outcome.failure())

    for _ in range(5):
        clock.advance(IDLE_TTL + 1)
        touch_other_keys(pipeline, 50)
        assert store.status("service:x").breaker == "open"
    clock.advance(100)
    touch_other_keys(pipeline)
    clock.advance(IDLE_TTL + 1)
    touch_other_keys(pipeline)

    assert store.status("service:x").generation == 0  # forgotten: a fresh key


def test_paused_key_is_kept_until_the_pause_ends(
    store: MemoryStore, pipeline: Pipeline, clock: MockClock
) -> None:
    """A paused key survives idleness until its pause is over."""
    store.pause("tenant:paused", 60, "operator")

    clock.advance(IDLE_TTL + 1)
    touch_other_keys(pipeline)
    assert store.status("tenant:paused").paused_until is not None

    clock.advance(60)
    touch_other_keys(pipeline)
    clock.advance(IDLE_TTL + 1)
    touch_other_keys(pipeline)
    assert store.status("tenant:paused").pause_reason is None
    assert len(store) == 300


def test_key_with_a_live_lease_is_kept_until_the_lease_expires(
    store: MemoryStore, pipeline: Pipeline, clock: MockClock
) -> None:
    """A key whose execution is still running (lease live) is kept; after the lease expires it may go."""
    policy = counted(lease=60)
    run(pipeline, policy, "running")  # an earlier execution, counted by the breaker
    start(pipeline, policy, "running")  # still running: never recorded

    clock.advance(IDLE_TTL + 1)
    touch_other_keys(pipeline)
    status = store.status("tenant:running")
    assert (status.in_flight, status.calls) == (1, 1)

    clock.advance(60)
    touch_other_keys(pipeline)
    clock.advance(IDLE_TTL + 1)
    touch_other_keys(pipeline)
    assert store.status("tenant:running").calls == 0  # forgotten: a fresh key


def test_key_whose_executions_were_all_recorded_is_evicted_after_idle_ttl(
    store: MemoryStore, pipeline: Pipeline, clock: MockClock
) -> None:
    """A released lease is nothing pending: the key goes after ``idle_ttl``, however long the lease was."""
    run(pipeline, counted(lease=300), "done")  # lease (300 s) released by the record at once

    clock.advance(IDLE_TTL + 1)
    touch_other_keys(pipeline)

    assert store.status("tenant:done").calls == 0, "kept though idle with nothing pending"


def test_max_keys_caps_the_number_of_keys(clock: MockClock) -> None:
    """However many keys are used, the store never holds more than ``max_keys``."""
    store = MemoryStore(clock=clock, max_keys=10)
    for n in range(100):
        store.pause(f"tenant:{n}", 3600, "operator")
        assert len(store) <= 10


def test_keys_up_to_max_keys_are_all_kept(clock: MockClock) -> None:
    """Nothing is evicted for the cap while the store holds at most ``max_keys`` keys."""
    store = MemoryStore(clock=clock, max_keys=100)

    for n in range(100):
        store.pause(f"tenant:{n}", 3600, "operator")

    assert len(store) == 100
    assert all(store.status(f"tenant:{n}").paused_until is not None for n in range(100))


def test_max_keys_evicts_the_least_recently_used_key(clock: MockClock) -> None:
    """Beyond ``max_keys`` the least recently used key goes, and only it."""
    store = MemoryStore(clock=clock, max_keys=20)
    for n in range(20):
        store.pause(f"tenant:{n}", 3600, "operator")
    store.pause("tenant:0", 3600, "operator")  # used again: now the most recent

    store.pause("tenant:new", 3600, "operator")

    kept = {n for n in range(20) if store.status(f"tenant:{n}").paused_until is not None}
    assert kept == set(range(20)) - {1}
    assert store.status("tenant:new").paused_until is not None


@pytest.mark.parametrize(("field", "kwargs"), [("idle_ttl", {"idle_ttl": 0}), ("max_keys", {"max_keys": 0})])
def test_invalid_bounds_are_rejected(field: str, kwargs: dict[str, float]) -> None:
    """A non-positive ``idle_ttl`` or ``max_keys`` is a ``ConfigurationError`` naming the field."""
    with pytest.raises(ConfigurationError, match=field):
        MemoryStore(**kwargs)  # type: ignore[arg-type]
