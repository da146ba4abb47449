"""Store contract: what operators do at runtime — rate overrides, finding keys, purging dead letters."""

from __future__ import annotations

import pytest

from limitpal_tasks import (
    DeadLetter,
    DeferPolicy,
    MockClock,
    Pipeline,
    Policy,
    Rate,
    RateLimit,
    Store,
    TaskContext,
)

from .support import admitted

NO_JITTER = DeferPolicy(jitter=0.0, open_spread=0.0)
POLICY = Policy("api", key="tenant:{tenant_id}", rate=RateLimit("10/s", reserve_ahead=0), defer=NO_JITTER)
LIMIT = POLICY.rates[0].slot_id


def run(pipeline: Pipeline, tenant: str = "a") -> bool:
    """Whether one fresh execution of ``tenant`` is admitted now."""
    decision = pipeline.admit(POLICY, TaskContext("task", kwargs={"tenant_id": tenant}))
    return decision.admitted


def admissions_in(pipeline: Pipeline, clock: MockClock, seconds: float, step: float = 0.01) -> int:
    """How many executions are admitted when one is tried every ``step`` for ``seconds``."""
    count = 0
    for _ in range(round(seconds / step)):
        count += run(pipeline)
        clock.advance(step)
    return count


def test_override_lowers_the_rate_of_one_key_fleet_wide(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """With the key at 2/s by override, a steady stream of tries gets 2 admissions a second, not 10."""
    store.override("tenant:a", LIMIT, Rate.parse("2/s"), seconds=600)
    assert admissions_in(pipeline, clock, 5.0) == pytest.approx(10, abs=1)


def test_override_raises_the_rate(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """An override above the configured rate lets more through: 50/s instead of 10/s."""
    store.override("tenant:a", LIMIT, Rate.parse("50/s"), seconds=600)
    assert admissions_in(pipeline, clock, 2.0) == pytest.approx(100, abs=2)


def test_override_leaves_other_keys_alone(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """Tenant b keeps the configured rate while tenant a is overridden."""
    store.override("tenant:a", LIMIT, Rate.parse("1/s"), seconds=600)
    admitted_b = 0
    for _ in range(200):
        admitted_b += run(pipeline, "b")
        clock.advance(0.01)
    assert admitted_b == pytest.approx(20, abs=1)


def test_override_expires_by_itself(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """After its duration the override is gone: status no longer shows it and the configured rate applies."""
    store.override("tenant:a", LIMIT, Rate.parse("1/s"), seconds=10)
    assert str(store.status("tenant:a").overrides[LIMIT]) == "1/s burst 1"
    clock.advance(11)
    assert store.status("tenant:a").overrides == {}
    assert admissions_in(pipeline, clock, 2.0) == pytest.approx(20, abs=1)


def test_permanent_override_stays_until_lifted(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A permanent override has no end; lifting it restores the configured rate."""
    store.override("tenant:a", LIMIT, Rate.parse("1/s"), burst=3)
    clock.advance(86_400)
    override = store.status("tenant:a").overrides[LIMIT]
    assert (override.until, override.burst) == (None, 3)
    store.override("tenant:a", LIMIT, None)
    assert store.status("tenant:a").overrides == {}
    clock.advance(10)
    assert admissions_in(pipeline, clock, 2.0) == pytest.approx(20, abs=1)


def test_status_shows_the_override_and_its_end(store: Store, clock: MockClock) -> None:
    """status reports the override's rate, burst and the time it ends (store clock)."""
    store.override("tenant:a", LIMIT, Rate.parse("5/m"), burst=2, seconds=60)
    override = store.status("tenant:a").overrides[LIMIT]
    assert (override.rate, override.burst) == (Rate(5, 60.0), 2)
    assert override.until == pytest.approx(clock.now() + 60)


def test_status_names_the_policy_of_the_last_admission(pipeline: Pipeline, store: Store) -> None:
    """A key remembers which policy last asked for it, so operators can filter by policy."""
    assert store.status("tenant:a").policy is None
    assert run(pipeline)
    assert store.status("tenant:a").policy == "api"


def test_keys_lists_every_key_with_state(pipeline: Pipeline, store: Store) -> None:
    """keys() finds every key that holds state, and only those matching the pattern."""
    for tenant in ("a", "b", "c{x}"):
        admitted(pipeline.admit(POLICY, TaskContext("task", kwargs={"tenant_id": tenant})))
    store.pause("other:1", 60, "operator")
    assert sorted(store.keys()) == sorted(["tenant:a", "tenant:b", "tenant:c%7Bx%7D", "other:1"])
    assert sorted(store.keys("tenant:*")) == ["tenant:a", "tenant:b", "tenant:c%7Bx%7D"]


def test_purge_dead_deletes_every_letter(store: Store) -> None:
    """purge_dead empties the dead letter and says how many were there."""
    for n in range(3):
        store.put_dead(DeadLetter(id=f"l{n}", task_name="t", reason="max_deferrals", dead_at=2.0 + n))
    assert store.purge_dead() == 3
    assert store.list_dead() == []
    assert store.purge_dead() == 0
