"""Store contract: dead letters, the status of unknown keys, and the retry budget."""

from __future__ import annotations

from limitpal_tasks import (
    DeadLetter,
    MockClock,
    Pipeline,
    Policy,
    RetryBudget,
    RetryPolicy,
    Store,
    TaskContext,
)


def letter(n: int) -> DeadLetter:
    return DeadLetter(
        id=f"letter-{n}",
        task_name="send_invoice",
        reason="max_attempts",
        policy="payments",
        key="tenant:acme",
        args=(n, "eur"),
        kwargs={"tenant_id": "acme", "amount": n * 10},
        headers={"limitpal_deferrals": 3},
        attempts=5,
        deferrals=3,
        first_seen=1_700_000_000.0,
        dead_at=1_700_000_100.0 + n,
        error="ConnectionError('upstream down')",
    )


# -- dead letters -----------------------------------------------------------------------


def test_dead_letters_are_listed_newest_first(store: Store) -> None:
    """``list_dead`` returns what was put, newest first."""
    for n in range(3):
        store.put_dead(letter(n))

    assert [d.id for d in store.list_dead()] == ["letter-2", "letter-1", "letter-0"]


def test_dead_letter_keeps_every_field(store: Store) -> None:
    """A dead letter reads back equal to what was put, arguments and headers included."""
    original = letter(7)
    store.put_dead(original)

    assert store.list_dead() == [original]


def test_list_dead_returns_at_most_limit_newest(store: Store) -> None:
    """``list_dead(limit)`` returns only the ``limit`` newest letters."""
    for n in range(5):
        store.put_dead(letter(n))

    assert [d.id for d in store.list_dead(limit=2)] == ["letter-4", "letter-3"]


def test_take_dead_returns_a_letter_exactly_once(store: Store) -> None:
    """``take_dead`` hands a letter out once and removes it; a second take gets ``None``."""
    store.put_dead(letter(1))
    store.put_dead(letter(2))

    taken = store.take_dead("letter-1")
    again = store.take_dead("letter-1")

    assert taken == letter(1)
    assert again is None
    assert [d.id for d in store.list_dead()] == ["letter-2"]


def test_take_dead_of_an_unknown_id_is_none(store: Store) -> None:
    """Taking a letter that was never put returns ``None``."""
    assert store.take_dead("nope") is None
    assert store.list_dead() == []


# -- status -------------------------------------------------------------------------


def test_status_of_an_unknown_key_is_empty(store: Store) -> None:
    """A key nothing was ever kept under reads as a CLOSED breaker with nothing in flight."""
    status = store.status("tenant:never-seen")

    assert status.key == "tenant:never-seen"
    assert status.breaker == "closed"
    assert (status.generation, status.open_until) == (0, None)
    assert (status.calls, status.failures, status.slow_calls) == (0, 0, 0)
    assert (status.in_flight, status.probes_in_flight) == (0, 0)
    assert (status.paused_until, status.pause_reason) == (None, None)
    assert dict(status.rates) == {}


def test_status_reads_the_store_clock_when_now_is_omitted(store: Store, clock: MockClock) -> None:
    """``status(key)`` without ``now`` reads the store's clock: a pause is over once that clock passes it."""
    store.pause("tenant:a", 10, "operator")
    assert store.status("tenant:a").paused_until is not None

    clock.advance(10.5)

    assert store.status("tenant:a").paused_until is None


# -- retry budget ---------------------------------------------------------------------


def test_retry_budget_allows_the_floor_per_window(store: Store, clock: MockClock) -> None:
    """With no admissions, ``min_per_second`` × ``window`` retries are allowed, then refused."""
    budget = RetryBudget(ratio=0.5, min_per_second=0.5, window=10)

    spent = [store.spend_retry("tenant:a", budget, None) for _ in range(6)]

    assert spent == [True] * 5 + [False]


def test_retry_budget_grows_with_admissions(store: Store, clock: MockClock) -> None:
    """Every admission on the key adds ``ratio`` retries to the budget."""
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=10)
    policy = Policy("api", key="tenant:{tenant_id}", retry=RetryPolicy(budget=budget))
    pipeline = Pipeline(store, clock=clock)
    assert store.spend_retry("tenant:a", budget, None) is False

    for _ in range(4):
        assert pipeline.admit(policy, TaskContext("task", kwargs={"tenant_id": "a"})).admitted

    spent = [store.spend_retry("tenant:a", budget, None) for _ in range(3)]
    assert spent == [True, True, False]
    assert store.spend_retry("tenant:b", budget, None) is False


def test_retry_budget_refills_as_the_window_slides(store: Store, clock: MockClock) -> None:
    """Retries spent more than two windows ago no longer count against the budget."""
    budget = RetryBudget(ratio=0, min_per_second=0.2, window=10)
    assert [store.spend_retry("tenant:a", budget, None) for _ in range(3)] == [True, True, False]

    clock.advance(25)

    assert store.spend_retry("tenant:a", budget, None) is True


def test_retry_budget_accepts_an_explicit_now(store: Store, clock: MockClock) -> None:
    """``spend_retry`` with an explicit ``now`` uses that time, not the store's clock."""
    budget = RetryBudget(ratio=0, min_per_second=0.1, window=10)
    start = clock.now()
    assert store.spend_retry("tenant:a", budget, start) is True
    assert store.spend_retry("tenant:a", budget, start + 1) is False

    assert store.spend_retry("tenant:a", budget, start + 30) is True
