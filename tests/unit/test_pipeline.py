"""Specification of what :class:`Pipeline` adds on top of a store: deferral bounds, jitter,
fail modes, hooks, and async twins that decide exactly like the sync methods."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    Bulkhead,
    Decision,
    DeferPolicy,
    Deferred,
    Hooks,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    StoreError,
    TaskContext,
    Ticket,
    Transition,
)
from limitpal_tasks.core.decisions import AdmitRequest, RecordResult
from limitpal_tasks.core.store import AdmitResult

KEY = "tenant:{tenant_id}"


def context(tenant: str = "a", after: Deferred | None = None) -> TaskContext:
    if after is None:
        return TaskContext("task", kwargs={"tenant_id": tenant})
    return TaskContext(
        "task",
        kwargs={"tenant_id": tenant},
        deferrals=after.deferrals,
        first_seen=after.first_seen,
        reservations=after.reservations,
    )


def admitted(decision: Decision) -> Ticket:
    assert isinstance(decision, Admitted), f"expected Admitted, got {decision!r}"
    return decision.ticket


def deferred(decision: Decision) -> Deferred:
    assert isinstance(decision, Deferred), f"expected Deferred, got {decision!r}"
    return decision


@pytest.fixture
def store(clock: MockClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def pipeline(store: MemoryStore, clock: MockClock) -> Pipeline:
    return Pipeline(store, clock=clock, rng=random.Random(0))


def occupied(pipeline: Pipeline, defer: DeferPolicy, retry_delay: float = 10.0) -> Policy:
    """A policy whose only bulkhead slot for tenant ``a`` is taken: every admit defers."""
    policy = Policy("api", key=KEY, bulkhead=Bulkhead(1, retry_delay=retry_delay), defer=defer)
    admitted(pipeline.admit(policy, context()))
    return policy


# -- deferral bounds ------------------------------------------------------------------


def test_deferrals_count_up_and_carry_first_seen(pipeline: Pipeline, clock: MockClock) -> None:
    """Each deferral adds one to the count the message carries; ``first_seen`` stays the first time."""
    policy = occupied(pipeline, DeferPolicy(jitter=0))
    start = clock.now()

    first = deferred(pipeline.admit(policy, context()))
    clock.advance(first.delay)
    second = deferred(pipeline.admit(policy, context(after=first)))

    assert (first.deferrals, second.deferrals) == (1, 2)
    assert first.first_seen == second.first_seen == start
    assert (first.exhausted, second.exhausted) == (None, None)


def test_max_deferrals_exhausts_the_task(pipeline: Pipeline, clock: MockClock) -> None:
    """The deferral beyond ``max_deferrals`` is marked ``exhausted="max_deferrals"``."""
    policy = occupied(pipeline, DeferPolicy(jitter=0, max_deferrals=2))

    decisions = []
    previous: Deferred | None = None
    for _ in range(3):
        previous = deferred(pipeline.admit(policy, context(after=previous)))
        decisions.append(previous)
        clock.advance(previous.delay)

    assert [d.exhausted for d in decisions] == [None, None, "max_deferrals"]
    assert decisions[-1].deferrals == 3


def test_deadline_exhausts_a_task_that_would_come_back_too_late(pipeline: Pipeline, clock: MockClock) -> None:
    """A deferral that would bring the task back past ``deadline`` after ``first_seen`` is exhausted."""
    policy = occupied(pipeline, DeferPolicy(jitter=0, deadline=60), retry_delay=10)
    first = deferred(pipeline.admit(policy, context()))

    clock.advance(45)
    within = deferred(pipeline.admit(policy, context(after=first)))  # back at 55 s
    clock.advance(10)
    beyond = deferred(pipeline.admit(policy, context(after=within)))  # back at 65 s

    assert (first.exhausted, within.exhausted, beyond.exhausted) == (None, None, "deadline")


def test_max_delay_caps_a_single_delay(pipeline: Pipeline, store: MemoryStore) -> None:
    """No deferral is scheduled further than ``max_delay``, jitter included."""
    policy = Policy("api", key=KEY, defer=DeferPolicy(max_delay=300, jitter=0.5))
    store.pause("tenant:a", 3600, "operator")

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(20)]

    assert all(delay <= 300 for delay in delays)
    assert max(delays) == 300


def test_max_delay_caps_a_breaker_open_delay(pipeline: Pipeline, store: MemoryStore) -> None:
    """A breaker open for longer than ``max_delay`` defers by ``max_delay`` at most."""
    policy = Policy("api", key=KEY, breaker=Breaker(), defer=DeferPolicy(max_delay=60))
    store.force("tenant:a", "forced_open")

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(20)]

    assert all(0 < delay <= 60 for delay in delays)


def test_slot_beyond_max_delay_is_reached_in_hops_that_are_not_deferrals(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """A reserved slot further than ``max_delay`` is reached in capped hops; only the first is a deferral."""
    policy = Policy("api", key=KEY, rate=RateLimit("1/m", reserve_ahead=120), defer=DeferPolicy(max_delay=25))
    start = clock.now()
    admitted(pipeline.admit(policy, context()))
    first = deferred(pipeline.admit(policy, context()))  # slot at +60 s
    clock.advance(first.delay)
    second = deferred(pipeline.admit(policy, context(after=first)))
    clock.advance(second.delay)
    third = deferred(pipeline.admit(policy, context(after=second)))
    clock.advance(third.delay)

    final = pipeline.admit(policy, context(after=third))

    assert [first.delay, second.delay, third.delay] == pytest.approx([25, 25, 10], abs=1e-5)
    assert [first.deferrals, second.deferrals, third.deferrals] == [1, 1, 1]
    assert final.admitted
    assert clock.now() == pytest.approx(start + 60, abs=1e-5)


# -- jitter ---------------------------------------------------------------------------


def test_pause_deferrals_are_jittered_within_the_fraction(pipeline: Pipeline, store: MemoryStore) -> None:
    """A ``paused`` deferral waits between the pause's end and ``jitter`` × that much more."""
    policy = Policy("api", key=KEY, defer=DeferPolicy(jitter=0.2))
    store.pause("tenant:a", 10, "operator")

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(200)]

    assert all(10 <= delay <= 12 for delay in delays)
    assert len(set(delays)) > 100


def test_concurrency_deferrals_are_jittered_within_the_fraction(pipeline: Pipeline) -> None:
    """A ``concurrency`` deferral waits between ``retry_delay`` and ``retry_delay`` × (1 + ``jitter``)."""
    policy = occupied(pipeline, DeferPolicy(jitter=0.1), retry_delay=2)

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(200)]

    assert all(2 <= delay <= 2.2 for delay in delays)
    assert len(set(delays)) > 100


def test_jitter_zero_gives_exact_delays(pipeline: Pipeline) -> None:
    """With ``jitter=0`` every deferral waits exactly the store's delay."""
    policy = occupied(pipeline, DeferPolicy(jitter=0), retry_delay=2)

    delays = {deferred(pipeline.admit(policy, context())).delay for _ in range(20)}

    assert delays == {2.0}


def trip(pipeline: Pipeline, policy: Policy) -> None:
    pipeline.record(admitted(pipeline.admit(policy, context())), Outcome.failure())


def test_breaker_open_deferrals_spread_over_open_spread_after_open_until(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """Deferrals of an open breaker land between ``open_until`` and ``open_until + open_spread``."""
    policy = Policy(
        "api", key=KEY, breaker=Breaker(minimum_calls=1, open_for=30), defer=DeferPolicy(open_spread=8)
    )
    trip(pipeline, policy)
    clock.advance(10)

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(300)]

    assert all(20 - 1e-5 <= delay <= 28 + 1e-5 for delay in delays)
    assert len(set(delays)) > 100
    # Spread over the whole window, not a wave
    assert min(delays) < 21
    assert max(delays) > 27


def test_default_open_spread_is_jitter_times_the_break(pipeline: Pipeline, clock: MockClock) -> None:
    """Without ``open_spread``, deferrals spread over ``jitter`` × ``open_for`` after ``open_until``."""
    policy = Policy(
        "api", key=KEY, breaker=Breaker(minimum_calls=1, open_for=100), defer=DeferPolicy(jitter=0.1)
    )
    trip(pipeline, policy)

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(300)]

    assert all(100 - 1e-5 <= delay <= 110 + 1e-5 for delay in delays)
    assert max(delays) > 108


# -- fail modes -----------------------------------------------------------------------


class BrokenStore(MemoryStore):
    """A store whose every pipeline operation fails, as an unreachable Redis would."""

    def __init__(self, clock: MockClock) -> None:
        super().__init__(clock=clock)
        self.calls = {"admit": 0, "record": 0}

    def admit(self, request: AdmitRequest) -> AdmitResult:
        self.calls["admit"] += 1
        raise StoreError("connection refused")

    async def admit_async(self, request: AdmitRequest) -> AdmitResult:
        return self.admit(request)

    def record(self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float) -> RecordResult:
        self.calls["record"] += 1
        raise StoreError("connection refused")

    async def record_async(
        self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float
    ) -> RecordResult:
        return self.record(ticket, outcome, now, rand)


def test_fail_open_admits_on_the_local_fallback(clock: MockClock) -> None:
    """With ``fail_mode="open"`` an unreachable store admits through the per-process fallback."""
    broken, local = BrokenStore(clock), MemoryStore(clock=clock)
    pipeline = Pipeline(broken, clock=clock, fallback=local, rng=random.Random(0))
    policy = Policy("api", key=KEY, bulkhead=Bulkhead(1), fail_mode="open")

    decision = pipeline.admit(policy, context())

    ticket = admitted(decision)
    assert ticket.fallback
    assert local.status("tenant:a").in_flight == 1
    assert pipeline.store_errors == 1
    # The fallback enforces the policy too
    assert deferred(pipeline.admit(policy, context())).reason == "concurrency"


def test_fail_open_records_on_the_fallback(clock: MockClock) -> None:
    """A ticket admitted by the fallback is recorded there, never on the broken store."""
    broken, local = BrokenStore(clock), MemoryStore(clock=clock)
    pipeline = Pipeline(broken, clock=clock, fallback=local, rng=random.Random(0))
    policy = Policy("api", key=KEY, bulkhead=Bulkhead(1), fail_mode="open")
    ticket = admitted(pipeline.admit(policy, context()))

    pipeline.record(ticket, Outcome.success())

    assert broken.calls["record"] == 0
    assert local.status("tenant:a").in_flight == 0


def test_fail_open_has_a_default_fallback(clock: MockClock) -> None:
    """Without an explicit fallback, ``fail_mode="open"`` still admits, and its record does not raise."""
    pipeline = Pipeline(BrokenStore(clock), clock=clock, rng=random.Random(0))
    policy = Policy("api", key=KEY, breaker=Breaker(), fail_mode="open")

    ticket = admitted(pipeline.admit(policy, context()))
    pipeline.record(ticket, Outcome.failure())

    assert ticket.fallback


def test_fail_closed_defers_with_store_unavailable(clock: MockClock) -> None:
    """With ``fail_mode="closed"`` an unreachable store defers the task with ``store_unavailable``."""
    pipeline = Pipeline(BrokenStore(clock), clock=clock, rng=random.Random(0))
    policy = Policy("api", key=KEY, fail_mode="closed")

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "store_unavailable"
    assert decision.delay > 0
    assert decision.deferrals == 1
    assert pipeline.store_errors == 1


def test_record_on_an_unreachable_store_does_not_raise(clock: MockClock) -> None:
    """A store failing during ``record`` is counted and logged; the task is not affected."""
    store = BrokenStore(clock)
    healthy = Pipeline(MemoryStore(clock=clock), clock=clock)
    ticket = admitted(healthy.admit(Policy("api", key=KEY), context()))
    pipeline = Pipeline(store, clock=clock)

    pipeline.record(ticket, Outcome.success())

    assert store.calls["record"] == 1
    assert pipeline.store_errors == 1


# -- hooks ----------------------------------------------------------------------------


class Recorder(Hooks):
    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.decisions: list[tuple[str, Decision]] = []
        self.store_errors: list[tuple[str, str]] = []

    def on_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def on_decision(self, policy: str, decision: Decision) -> None:
        self.decisions.append((policy, decision))

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        self.store_errors.append((policy, fallback))


class Raising(Hooks):
    def on_transition(self, transition: Transition) -> None:
        raise RuntimeError("hook bug")

    def on_decision(self, policy: str, decision: Decision) -> None:
        raise RuntimeError("hook bug")


def test_hooks_receive_every_decision(store: MemoryStore, clock: MockClock) -> None:
    """``on_decision`` sees each admission decision, admitted or deferred, with the policy name."""
    recorder = Recorder()
    pipeline = Pipeline(store, clock=clock, hooks=[recorder])
    policy = Policy("api", key=KEY, bulkhead=Bulkhead(1))

    decisions = [pipeline.admit(policy, context()) for _ in range(2)]

    assert recorder.decisions == [("api", decisions[0]), ("api", decisions[1])]


def test_hooks_receive_each_transition_once(store: MemoryStore, clock: MockClock) -> None:
    """``on_transition`` sees closed→open (from a record) and open→half_open (from an admit) once each."""
    recorder = Recorder()
    pipeline = Pipeline(store, clock=clock, hooks=[recorder])
    policy = Policy("api", key=KEY, breaker=Breaker(minimum_calls=1, open_for=10, half_open_probes=2))
    trip(pipeline, policy)
    clock.advance(10)

    pipeline.admit(policy, context())
    pipeline.admit(policy, context())

    assert [(t.from_state, t.to_state) for t in recorder.transitions] == [
        ("closed", "open"),
        ("open", "half_open"),
    ]


def test_hooks_hear_about_store_errors(clock: MockClock) -> None:
    """``on_store_error`` is told which fail mode handled the error."""
    recorder = Recorder()
    pipeline = Pipeline(BrokenStore(clock), clock=clock, hooks=[recorder])

    pipeline.admit(Policy("api", key=KEY, fail_mode="closed"), context())

    assert recorder.store_errors == [("api", "closed")]


def test_raising_hook_does_not_break_admit(store: MemoryStore, clock: MockClock) -> None:
    """A hook that raises is counted in ``hooks.errors``; the decision stands and other hooks still run."""
    recorder = Recorder()
    pipeline = Pipeline(store, clock=clock, hooks=[Raising(), recorder])
    policy = Policy("api", key=KEY, breaker=Breaker(minimum_calls=1))

    decision = pipeline.admit(policy, context())
    pipeline.record(admitted(decision), Outcome.failure())

    assert pipeline.hooks.errors == 2  # one decision, one transition
    assert len(recorder.decisions) == 1
    assert len(recorder.transitions) == 1


# -- async twins ----------------------------------------------------------------------


def view(decision: Decision) -> tuple[Any, ...]:
    """Everything a decision says, without the (process-unique) ticket id."""
    if isinstance(decision, Admitted):
        ticket = decision.ticket
        return ("admitted", ticket.generations, ticket.probe, ticket.admitted_at, decision.transitions)
    return (
        "deferred",
        decision.delay,
        decision.reason,
        decision.deferrals,
        decision.first_seen,
        dict(decision.reservations),
        decision.exhausted,
        decision.transitions,
    )


async def script(use_async: bool) -> list[tuple[Any, ...]]:
    """A busy minute for two tenants: breaker trips and recovers, bulkhead and rate limits defer."""
    clock = MockClock()
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(42))
    policy = Policy(
        "api",
        key=KEY,
        breaker=Breaker(key="service:x", minimum_calls=4, window=8, open_for=2, half_open_probes=2),
        bulkhead=Bulkhead(2, lease=3),
        rate=RateLimit("5/s", burst=2),
        defer=DeferPolicy(jitter=0.3, max_deferrals=5),
    )
    plan = random.Random(7)
    running: list[Ticket] = []
    waiting: list[tuple[float, TaskContext]] = []
    seen: list[tuple[Any, ...]] = []
    for step in range(300):
        clock.advance(plan.choice((0.0, 0.05, 0.2, 0.5)))
        due = [item for item in waiting if item[0] <= clock.now()]
        task = due[0][1] if due and plan.random() < 0.7 else context(plan.choice("ab"))
        if due and task is due[0][1]:
            waiting.remove(due[0])
        decision = await pipeline.admit_async(policy, task) if use_async else pipeline.admit(policy, task)
        seen.append(view(decision))
        if isinstance(decision, Admitted):
            running.append(decision.ticket)
        elif decision.exhausted is None:
            waiting.append((clock.now() + decision.delay, context(task.kwargs["tenant_id"], decision)))
        if running and plan.random() < 0.5:
            ticket = running.pop(plan.randrange(len(running)))
            outcome = Outcome.failure() if step % 60 < 20 else Outcome.success()
            if use_async:
                await pipeline.record_async(ticket, outcome)
            else:
                pipeline.record(ticket, outcome)
    return seen


def test_async_twins_decide_exactly_like_the_sync_methods() -> None:
    """``admit_async``/``record_async`` decide exactly as ``admit``/``record`` for the same script."""
    sync = asyncio.run(script(use_async=False))
    in_async = asyncio.run(script(use_async=True))

    reasons = {entry[2] for entry in sync if entry[0] == "deferred"}
    assert {"breaker_open", "concurrency", "rate_limited"} <= reasons  # the script exercises them all
    assert in_async == sync
