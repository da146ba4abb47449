"""Specification of the hooks and the pipeline's log lines: dead letters, failing hooks, the
deferral summary, and store-call timing."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import Any

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    ConfigurationError,
    DeadLetter,
    Decision,
    Deferred,
    Hooks,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    RetryBudget,
    RetryPolicy,
    Store,
    StoreError,
    TaskContext,
    Transition,
)
from limitpal_tasks.core.decisions import AdmitRequest
from limitpal_tasks.core.events import HookRunner, StoreOperation, hook_errors_total
from limitpal_tasks.core.store import AdmitResult
from limitpal_tasks.integrations._runtime import Runtime, Settings, dead_letter

KEY = "tenant:{tenant}"
SECRET = "4242-4242-4242-4242"  # an argument value no log line may show


class Recorder(Hooks):
    """Keeps what it is told."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self.store_calls: list[tuple[StoreOperation, float, bool]] = []
        self.decisions: list[Decision] = []

    def on_dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)

    def on_store_call(self, operation: StoreOperation, seconds: float, ok: bool) -> None:
        self.store_calls.append((operation, seconds, ok))

    def on_decision(self, policy: str, decision: Decision) -> None:
        self.decisions.append(decision)


class Raising(Hooks):
    """Raises from every hook."""

    def on_transition(self, transition: Transition) -> None:
        raise RuntimeError("hook bug")

    def on_decision(self, policy: str, decision: Decision) -> None:
        raise RuntimeError("hook bug")

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        raise RuntimeError("hook bug")

    def on_store_call(self, operation: StoreOperation, seconds: float, ok: bool) -> None:
        raise RuntimeError("hook bug")

    def on_dead_letter(self, letter: DeadLetter) -> None:
        raise RuntimeError("hook bug")


class RaisingOnDecision(Hooks):
    """Raises from ``on_decision`` only."""

    def on_decision(self, policy: str, decision: Decision) -> None:
        raise RuntimeError("hook bug")


class Timer:
    """A fake ``perf_counter`` that advances by ``step`` on every read."""

    def __init__(self, step: float = 0.002) -> None:
        self.step = step
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.reads * self.step


class FlakyStore(MemoryStore):
    """A MemoryStore whose next ``failures`` admissions and dead letters fail, as a Redis outage would."""

    def __init__(self, clock: MockClock, failures: int = 0) -> None:
        super().__init__(clock=clock)
        self.failures = failures

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("connection refused")

    def admit(self, request: AdmitRequest) -> AdmitResult:
        self._maybe_fail()
        return super().admit(request)

    async def admit_async(self, request: AdmitRequest) -> AdmitResult:
        return self.admit(request)

    def put_dead(self, letter: DeadLetter) -> None:
        self._maybe_fail()
        super().put_dead(letter)


def context(tenant: str = "acme") -> TaskContext:
    return TaskContext("charge", kwargs={"tenant": tenant, "card": SECRET})


def bury(store: Store, hooks: HookRunner | None, reason: str = "max_attempts") -> DeadLetter:
    """Dead-letter one execution of ``charge`` under policy ``payments``."""
    return dead_letter(
        store,
        Policy("payments", key=KEY),
        context(),
        reason=reason,
        headers={"trace": "t-1"},
        attempts=5,
        error="RuntimeError: upstream 500",
        letter_id="letter-1",
        hooks=hooks,
    )


# -- dead letters -----------------------------------------------------------------------


def test_on_dead_letter_fires_once_with_the_stored_letter(clock: MockClock) -> None:
    """``on_dead_letter`` receives the very letter the store kept, once."""
    recorder = Recorder()
    store = MemoryStore(clock=clock)

    letter = bury(store, HookRunner([recorder]))

    assert recorder.letters == [letter]
    assert store.list_dead() == [letter]


def test_dead_letter_reaches_the_runtimes_hooks(clock: MockClock) -> None:
    """Hooks given to the integration's runtime hear of dead letters through its pipeline's runner."""
    recorder = Recorder()
    runtime = Runtime(Settings(), store=MemoryStore(clock=clock), hooks=[recorder])

    letter = bury(runtime.store, runtime.pipeline.hooks)

    assert recorder.letters == [letter]


def test_dead_letter_writes_one_warning_without_the_arguments(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING on ``limitpal_tasks.deadletter`` names task, policy, key, reason, counts, id; no args."""
    caplog.set_level(logging.DEBUG, logger="limitpal_tasks")

    bury(MemoryStore(clock=clock), HookRunner())

    [record] = [r for r in caplog.records if r.name == "limitpal_tasks.deadletter"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "dead-lettered charge [payments] key=tenant:acme: max_attempts after 5 attempt(s) "
        "and 0 deferral(s) (id letter-1)"
    )
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_dead_letter_is_reported_even_when_the_store_fails(clock: MockClock) -> None:
    """A dead letter the store could not keep still reaches the hooks (the task is dead either way)."""
    recorder = Recorder()

    letter = bury(FlakyStore(clock, failures=1), HookRunner([recorder]))

    assert recorder.letters == [letter]


def test_dead_letter_is_logged_without_a_runner(clock: MockClock, caplog: pytest.LogCaptureFixture) -> None:
    """A caller passing no runner still gets the WARNING line."""
    caplog.set_level(logging.WARNING, logger="limitpal_tasks.deadletter")

    bury(MemoryStore(clock=clock), None)

    assert [r.name for r in caplog.records] == ["limitpal_tasks.deadletter"]


# -- detail objects ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Transition, Admitted, Deferred, DeadLetter, TaskContext])
def test_every_detail_object_a_hook_receives_is_frozen_and_slotted(cls: type[Any]) -> None:
    """Hooks receive frozen, slotted dataclasses: they cannot change what the pipeline decided."""
    params = cls.__dataclass_params__
    assert params.frozen
    assert "__slots__" in cls.__dict__
    assert dataclasses.is_dataclass(cls)


def test_dead_letter_cannot_be_changed_by_a_hook(clock: MockClock) -> None:
    """Assigning to a dead letter's field raises."""
    letter = bury(MemoryStore(clock=clock), None)

    with pytest.raises(dataclasses.FrozenInstanceError):
        letter.reason = "other"  # type: ignore[misc]


def test_dead_letter_round_trips_through_json(clock: MockClock) -> None:
    """``DeadLetter.from_json(letter.to_json())`` gives back an equal letter."""
    letter = bury(MemoryStore(clock=clock), None)

    assert DeadLetter.from_json(letter.to_json()) == letter


# -- failing hooks ----------------------------------------------------------------------


def test_a_raising_dead_letter_hook_is_logged_and_counted(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising ``on_dead_letter`` is counted and logged at ERROR; the letter is stored, later hooks run."""
    caplog.set_level(logging.ERROR, logger="limitpal_tasks.events")
    recorder = Recorder()
    runner = HookRunner([Raising(), recorder])
    store = MemoryStore(clock=clock)
    before = hook_errors_total()

    letter = bury(store, runner)

    assert runner.errors == 1
    assert hook_errors_total() == before + 1
    assert store.list_dead() == [letter]
    assert recorder.letters == [letter]
    [record] = caplog.records
    assert "on_dead_letter" in record.getMessage()
    assert record.exc_info is not None


def test_raising_hooks_leave_every_pipeline_decision_unchanged(clock: MockClock) -> None:
    """With a hook raising from every method, the pipeline decides exactly as without hooks."""

    def run(hooks: list[Hooks]) -> list[tuple[bool, str]]:
        store = MemoryStore(clock=MockClock(clock.now()))
        pipeline = Pipeline(store, clock=MockClock(clock.now()), rng=random.Random(0), hooks=hooks)
        policy = Policy("api", key=KEY, rate="1/s", breaker=Breaker(minimum_calls=1, window=1))
        first = pipeline.admit(policy, context())
        second = pipeline.admit(policy, context())
        assert isinstance(first, Admitted)
        pipeline.record(first.ticket, Outcome.failure())  # opens the breaker
        third = pipeline.admit(policy, context())
        return [(d.admitted, "" if isinstance(d, Admitted) else d.reason) for d in (first, second, third)]

    assert run([Raising()]) == run([]) == [(True, ""), (False, "rate_limited"), (False, "breaker_open")]


def test_a_hook_raising_for_every_task_is_logged_once_per_interval(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook broken for every decision writes one traceback per interval and event, and counts them all."""
    caplog.set_level(logging.ERROR, logger="limitpal_tasks.events")
    runner = HookRunner([RaisingOnDecision()], clock=clock, summary_interval=10)
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, hooks=runner)
    policy = Policy("api", key=KEY)

    for _ in range(100):
        pipeline.admit(policy, context())
    clock.advance(10)
    pipeline.admit(policy, context())

    assert runner.errors == 101
    assert len(caplog.records) == 2


# -- the deferral summary ---------------------------------------------------------------


def deferral(reason: str = "rate_limited") -> Deferred:
    return Deferred(1.0, reason, 1, 0.0)  # type: ignore[arg-type]


def summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "limitpal_tasks.events" and r.levelno == logging.INFO
    ]


def test_deferrals_are_logged_at_debug_one_line_each(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each deferral writes one DEBUG line naming the task, policy, delay and reason."""
    caplog.set_level(logging.DEBUG, logger="limitpal_tasks.events")
    runner = HookRunner(clock=clock)

    for _ in range(3):
        runner.defer("payments", deferral(), context())

    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == ["deferred charge [payments] by 1.000s: rate_limited (deferral 1)"] * 3


def test_deferral_summary_is_written_at_most_once_per_interval(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A thousand deferrals a second for 30 s write one INFO summary every 10 s, not one per deferral."""
    caplog.set_level(logging.INFO, logger="limitpal_tasks.events")
    runner = HookRunner(clock=clock, summary_interval=10)

    for _ in range(30):
        for _ in range(1000):
            runner.defer("payments", deferral("breaker_open"), context())
        clock.advance(1)

    assert len(summaries(caplog)) == 2  # at 10 s and at 20 s; the third window is still open


def test_deferral_summary_sums_each_policy_and_reason(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The summary gives the total and the count per policy/reason, largest first, over the window."""
    caplog.set_level(logging.INFO, logger="limitpal_tasks.events")
    runner = HookRunner(clock=clock, summary_interval=10)

    for _ in range(1200):
        runner.defer("payments", deferral("breaker_open"), context())
    for _ in range(33):
        runner.defer("payments", deferral("rate_limited"), context())
    clock.advance(10)
    runner.defer("payments", deferral("rate_limited"), context())

    assert summaries(caplog) == [
        "deferred 1234 tasks in the last 10.0s: payments/breaker_open=1200, payments/rate_limited=34"
    ]


def test_deferral_summary_names_the_top_pairs_and_sums_the_rest(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond the five largest policy/reason pairs, the summary gives how many others and their total."""
    caplog.set_level(logging.INFO, logger="limitpal_tasks.events")
    runner = HookRunner(clock=clock, summary_interval=10)

    for n in range(1, 8):  # policy p1 deferred once, ..., p7 seven times
        for _ in range(n):
            runner.defer(f"p{n}", deferral(), context())
    clock.advance(12.5)
    runner.defer("p7", deferral(), context())

    assert summaries(caplog) == [
        "deferred 29 tasks in the last 12.5s: p7/rate_limited=8, p6/rate_limited=6, "
        "p5/rate_limited=5, p4/rate_limited=4, p3/rate_limited=3, 2 others=3"
    ]


def test_deferral_summary_starts_a_fresh_window_after_each_line(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Deferrals counted in one summary are not counted again in the next."""
    caplog.set_level(logging.INFO, logger="limitpal_tasks.events")
    runner = HookRunner(clock=clock, summary_interval=10)

    for _ in range(2):
        runner.defer("api", deferral(), context())
        clock.advance(10)
        runner.defer("api", deferral(), context())
        clock.advance(1)

    assert summaries(caplog) == ["deferred 2 tasks in the last 10.0s: api/rate_limited=2"] * 2


def test_pipeline_paces_the_summary_with_its_clock(
    clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipeline given a ``MockClock`` counts its deferrals into summaries paced by that clock."""
    caplog.set_level(logging.INFO, logger="limitpal_tasks.events")
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(0))
    policy = Policy("api", key=KEY, rate="1/min")

    pipeline.admit(policy, context())
    pipeline.admit(policy, context())
    clock.advance(10)
    pipeline.admit(policy, context())

    assert summaries(caplog) == ["deferred 2 tasks in the last 10.0s: api/rate_limited=2"]


@pytest.mark.parametrize("interval", [0, -1.0, True])
def test_summary_interval_must_be_positive_seconds(interval: float) -> None:
    """``summary_interval`` rejects zero, negative numbers and booleans, naming the field."""
    with pytest.raises(ConfigurationError, match="summary_interval"):
        HookRunner(summary_interval=interval)


# -- store-call timing ------------------------------------------------------------------


def budget_policy() -> Policy:
    return Policy(
        "api",
        key=KEY,
        retry=RetryPolicy(max_attempts=3, backoff=1, budget=RetryBudget(ratio=1, min_per_second=1)),
    )


def test_store_calls_are_timed_per_operation_when_a_hook_listens(clock: MockClock) -> None:
    """``on_store_call`` gets admit, record and retry, each with the timer's elapsed seconds and ok=True."""
    recorder = Recorder()
    runner = HookRunner([recorder], clock=clock, timer=Timer(0.002))
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, hooks=runner)
    policy = budget_policy()

    decision = pipeline.admit(policy, context())
    assert isinstance(decision, Admitted)
    pipeline.record(decision.ticket, Outcome.failure())
    pipeline.retry(policy, RuntimeError("boom"), 1, context())

    assert [(op, ok) for op, _, ok in recorder.store_calls] == [
        ("admit", True),
        ("record", True),
        ("retry", True),
    ]
    assert [seconds for _, seconds, _ in recorder.store_calls] == pytest.approx([0.002] * 3)


def test_async_store_calls_are_timed_like_sync_ones(clock: MockClock) -> None:
    """``admit_async``, ``record_async`` and ``retry_async`` report the operations the sync methods do."""
    recorder = Recorder()
    runner = HookRunner([recorder], clock=clock, timer=Timer(0.002))
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, hooks=runner)
    policy = budget_policy()

    async def scenario() -> None:
        decision = await pipeline.admit_async(policy, context())
        assert isinstance(decision, Admitted)
        await pipeline.record_async(decision.ticket, Outcome.failure())
        await pipeline.retry_async(policy, RuntimeError("boom"), 1, context())

    asyncio.run(scenario())

    assert [(op, ok) for op, _, ok in recorder.store_calls] == [
        ("admit", True),
        ("record", True),
        ("retry", True),
    ]


def test_a_failed_store_call_is_timed_with_ok_false(clock: MockClock) -> None:
    """A store call that raises is still reported, with ``ok=False``, and the fail mode still applies."""
    recorder = Recorder()
    pipeline = Pipeline(
        FlakyStore(clock, failures=1), clock=clock, hooks=HookRunner([recorder], timer=Timer())
    )

    decision = pipeline.admit(Policy("api", key=KEY, fail_mode="closed"), context())

    assert isinstance(decision, Deferred)
    assert decision.reason == "store_unavailable"
    assert [(op, ok) for op, _, ok in recorder.store_calls] == [("admit", False)]


def test_fallback_store_calls_are_not_timed(clock: MockClock) -> None:
    """With ``fail_mode="open"``, the per-process fallback's admit and record are not store calls."""
    recorder = Recorder()
    pipeline = Pipeline(
        FlakyStore(clock, failures=1), clock=clock, hooks=HookRunner([recorder], timer=Timer())
    )

    decision = pipeline.admit(Policy("api", key=KEY, fail_mode="open"), context())
    assert isinstance(decision, Admitted)
    pipeline.record(decision.ticket, Outcome.success())

    assert [(op, ok) for op, _, ok in recorder.store_calls] == [("admit", False)]


def test_store_calls_are_not_timed_when_no_hook_overrides_on_store_call(clock: MockClock) -> None:
    """Without an ``on_store_call`` override the timer is never read."""

    class DecisionsOnly(Hooks):
        def on_decision(self, policy: str, decision: Decision) -> None:
            pass

    timer = Timer()
    runner = HookRunner([Hooks(), DecisionsOnly()], clock=clock, timer=timer)
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, hooks=runner)
    policy = budget_policy()

    decision = pipeline.admit(policy, context())
    assert isinstance(decision, Admitted)
    pipeline.record(decision.ticket, Outcome.failure())
    pipeline.retry(policy, RuntimeError("boom"), 1, context())

    assert not runner.times_store_calls
    assert timer.reads == 0


def test_a_raising_store_call_hook_leaves_the_decision_alone(clock: MockClock) -> None:
    """An ``on_store_call`` that raises is counted; the admission stands."""
    runner = HookRunner([Raising()], clock=clock, timer=Timer())
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, hooks=runner)

    decision = pipeline.admit(Policy("api", key=KEY), context())

    assert decision.admitted
    assert runner.errors == 2  # on_store_call, on_decision
