"""Specification of retries: backoff with jitter, the retry decision, the retry budget, and outcomes."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from limitpal_tasks import (
    Cooldown,
    FailurePolicy,
    MemoryStore,
    MockClock,
    Pipeline,
    Policy,
    RetryBudget,
    RetryPolicy,
    TaskContext,
)
from limitpal_tasks.core.policy import JitterKind

JITTERS: list[JitterKind] = ["full", "equal", "decorrelated", "none"]


class UpstreamDown(Exception):
    """A retryable failure."""


class BadRequest(Exception):
    """A failure that is the caller's fault."""


class Throttled(Exception):
    """A failure that carries the upstream's own delay, like an HTTP ``Retry-After``."""

    def __init__(self, retry_after: object) -> None:
        super().__init__("throttled")
        self.retry_after = retry_after


@pytest.fixture
def pipeline(clock: MockClock) -> Pipeline:
    """A pipeline over a ``MemoryStore``, driven by the test's ``MockClock`` and a seeded RNG."""
    return Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(1234))


def context(**kwargs: object) -> TaskContext:
    """The context of one call of ``task`` with keyword arguments ``kwargs``."""
    return TaskContext("task", kwargs=kwargs)


# -- RetryPolicy.delay ---------------------------------------------------------------------

backoffs = st.floats(min_value=0.0, max_value=100.0)
multipliers = st.floats(min_value=1.0, max_value=4.0)
attempts = st.integers(min_value=1, max_value=40)
rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@st.composite
def retry_policies(draw: st.DrawFn, jitter: JitterKind) -> RetryPolicy:
    """Retry policies with ``jitter`` and random backoff, cap and multiplier."""
    backoff = draw(backoffs)
    cap = backoff + draw(st.floats(min_value=0.0, max_value=1000.0))
    return RetryPolicy(backoff=backoff, backoff_max=cap, multiplier=draw(multipliers), jitter=jitter)


def exponential(policy: RetryPolicy, attempt: int) -> float:
    """The un-jittered, uncapped backoff before retry ``attempt``."""
    return float(policy.backoff * policy.multiplier ** (attempt - 1))


@given(data=st.data(), attempt=attempts, rand=rands, jitter=st.sampled_from(JITTERS))
def test_delay_never_exceeds_backoff_max(
    data: st.DataObject, attempt: int, rand: float, jitter: JitterKind
) -> None:
    """Whatever the jitter kind, attempt and draw, the delay lies in ``[0, backoff_max]``."""
    policy = data.draw(retry_policies(jitter))
    previous = data.draw(st.none() | st.floats(min_value=0.0, max_value=10_000.0))
    delay = policy.delay(attempt, rand, previous)
    assert 0.0 <= delay <= policy.backoff_max


@given(data=st.data(), attempt=attempts, rand=rands)
def test_full_jitter_is_a_fraction_of_the_exponential_then_capped(
    data: st.DataObject, attempt: int, rand: float
) -> None:
    """Full jitter is ``min(cap, exp × rand)``: jitter first, then the cap."""
    policy = data.draw(retry_policies("full"))
    expected = min(policy.backoff_max, exponential(policy, attempt) * rand)
    assert policy.delay(attempt, rand) == pytest.approx(expected)


@given(data=st.data(), attempt=attempts, rand=rands)
def test_equal_jitter_is_between_half_and_all_of_the_exponential(
    data: st.DataObject, attempt: int, rand: float
) -> None:
    """Equal jitter lies in ``[min(cap, exp/2), min(cap, exp)]``."""
    policy = data.draw(retry_policies("equal"))
    exp = exponential(policy, attempt)
    delay = policy.delay(attempt, rand)
    assert min(policy.backoff_max, exp / 2) * (1 - 1e-9) <= delay <= min(policy.backoff_max, exp) * (1 + 1e-9)


@given(data=st.data(), attempt=attempts, rand=rands)
def test_decorrelated_jitter_is_between_backoff_and_three_times_previous(
    data: st.DataObject, attempt: int, rand: float
) -> None:
    """Decorrelated jitter lies in ``[backoff, max(backoff, 3 × previous)]``, capped."""
    policy = data.draw(retry_policies("decorrelated"))
    previous = data.draw(st.floats(min_value=0.0, max_value=10_000.0))
    delay = policy.delay(attempt, rand, previous)
    low = min(policy.backoff_max, policy.backoff)
    high = min(policy.backoff_max, max(policy.backoff, 3 * previous))
    assert low * (1 - 1e-9) <= delay <= high * (1 + 1e-9)


@given(data=st.data(), attempt=attempts, rand=rands)
def test_no_jitter_is_the_capped_exponential(data: st.DataObject, attempt: int, rand: float) -> None:
    """Without jitter the delay is ``min(cap, backoff × multiplier^(attempt-1))`` whatever the draw."""
    policy = data.draw(retry_policies("none"))
    expected = min(policy.backoff_max, exponential(policy, attempt))
    assert policy.delay(attempt, rand) == pytest.approx(expected)


def test_full_jitter_is_applied_before_the_cap() -> None:
    """Beyond the cap, a small draw still gives a delay below the cap: ``min(10, 512 × 0.01) = 5.12``."""
    policy = RetryPolicy(backoff=1, backoff_max=10, multiplier=2, jitter="full", max_attempts=20)
    assert policy.delay(10, 0.01) == pytest.approx(5.12)


def test_equal_jitter_beyond_the_cap_is_the_cap() -> None:
    """Once half the exponential exceeds the cap, equal jitter returns exactly the cap."""
    policy = RetryPolicy(backoff=1, backoff_max=10, multiplier=2, jitter="equal", max_attempts=20)
    assert policy.delay(10, 0.0) == 10.0


def test_decorrelated_jitter_without_previous_starts_from_backoff() -> None:
    """The first decorrelated delay lies in ``[backoff, 3 × backoff]``."""
    policy = RetryPolicy(backoff=2, backoff_max=100, jitter="decorrelated")
    assert policy.delay(1, 0.0) == 2.0
    assert policy.delay(1, 0.999999) == pytest.approx(6.0, rel=1e-5)


@pytest.mark.parametrize("jitter", JITTERS)
def test_delay_of_a_very_late_attempt_is_the_cap(jitter: JitterKind) -> None:
    """Attempt 2000 of a long retry policy still gets a finite delay at most ``backoff_max`` (no overflow)."""
    policy = RetryPolicy(max_attempts=100_000, backoff=1, backoff_max=300, multiplier=2, jitter=jitter)
    delay = policy.delay(2000, 0.5, 300.0)
    assert math.isfinite(delay)
    assert delay <= 300.0


# -- Pipeline.retry ------------------------------------------------------------------------


def test_retries_before_max_attempts(pipeline: Pipeline) -> None:
    """Attempts before ``max_attempts`` that raised a retryable error are retried."""
    policy = Policy("p", retry=RetryPolicy(max_attempts=3))
    assert pipeline.retry(policy, UpstreamDown(), 1, context()).retry
    assert pipeline.retry(policy, UpstreamDown(), 2, context()).retry


def test_gives_up_at_max_attempts(pipeline: Pipeline) -> None:
    """The attempt numbered ``max_attempts`` is not retried, with reason ``max_attempts``."""
    policy = Policy("p", retry=RetryPolicy(max_attempts=3))
    decision = pipeline.retry(policy, UpstreamDown(), 3, context())
    assert (decision.retry, decision.reason) == (False, "max_attempts")


def test_single_attempt_policy_never_retries(pipeline: Pipeline) -> None:
    """With ``max_attempts=1`` the first failure is final."""
    policy = Policy("p", retry=RetryPolicy(max_attempts=1))
    assert pipeline.retry(policy, UpstreamDown(), 1, context()).reason == "max_attempts"


def test_retry_delay_follows_the_backoff(pipeline: Pipeline) -> None:
    """Without jitter the retry's delay is the policy's exponential backoff."""
    policy = Policy("p", retry=RetryPolicy(max_attempts=5, backoff=2, multiplier=3, jitter="none"))
    assert pipeline.retry(policy, UpstreamDown(), 3, context()).delay == 18.0


def test_retry_delay_with_full_jitter_stays_within_backoff(pipeline: Pipeline) -> None:
    """With full jitter each retry's delay lies in ``[0, backoff × multiplier^(attempt-1)]``."""
    policy = Policy("p", retry=RetryPolicy(max_attempts=10, backoff=1, multiplier=2))
    delays = [pipeline.retry(policy, UpstreamDown(), 4, context()).delay for _ in range(50)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 1


def test_same_seed_gives_same_delays(clock: MockClock) -> None:
    """Two pipelines seeded alike draw the same jittered delays."""
    policy = Policy("p", retry=RetryPolicy(max_attempts=10))
    first, second = (Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(7)) for _ in range(2))
    assert [first.retry(policy, UpstreamDown(), 2, context()).delay for _ in range(5)] == [
        second.retry(policy, UpstreamDown(), 2, context()).delay for _ in range(5)
    ]


def test_non_retryable_exception_is_not_retried(pipeline: Pipeline) -> None:
    """An exception outside ``retry_on`` is not retried and the reason says ``fail``."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[UpstreamDown]))
    decision = pipeline.retry(policy, BadRequest(), 1, context())
    assert (decision.retry, decision.reason) == (False, "fail")


def test_give_up_on_exception_is_not_retried(pipeline: Pipeline) -> None:
    """An exception in ``give_up_on`` is not retried."""
    policy = Policy("p", retry=RetryPolicy(give_up_on=[BadRequest]))
    assert not pipeline.retry(policy, BadRequest(), 1, context()).retry


def test_ignored_exception_is_not_retried(pipeline: Pipeline) -> None:
    """An ignored exception (the caller's fault) is never retried; the reason says ``ignore``."""
    policy = Policy("p", retry=RetryPolicy(), failure=FailurePolicy(ignore=[BadRequest]))
    decision = pipeline.retry(policy, BadRequest(), 1, context())
    assert (decision.retry, decision.reason) == (False, "ignore")


def test_no_retry_policy_means_no_retry(pipeline: Pipeline) -> None:
    """A policy without a retry policy never retries."""
    decision = pipeline.retry(Policy("p"), UpstreamDown(), 1, context())
    assert (decision.retry, decision.reason) == (False, "no_retry_policy")


def test_exception_retry_after_is_the_delay(pipeline: Pipeline) -> None:
    """An exception carrying ``retry_after`` seconds is retried after exactly that delay."""
    policy = Policy("p", retry=RetryPolicy(backoff=1, backoff_max=300))
    decision = pipeline.retry(policy, Throttled(42.5), 1, context())
    assert (decision.retry, decision.delay) == (True, 42.5)


def test_exception_retry_after_is_capped(pipeline: Pipeline) -> None:
    """An exception's ``retry_after`` beyond ``backoff_max`` is capped to it."""
    policy = Policy("p", retry=RetryPolicy(backoff=1, backoff_max=60))
    assert pipeline.retry(policy, Throttled(3600), 1, context()).delay == 60.0


@pytest.mark.parametrize("carried", [-5, "soon", None, True, math.nan])
def test_unusable_retry_after_falls_back_to_backoff(pipeline: Pipeline, carried: object) -> None:
    """A ``retry_after`` that is not seconds >= 0 is ignored in favour of the backoff."""
    policy = Policy("p", retry=RetryPolicy(backoff=4, backoff_max=60, jitter="none"))
    assert pipeline.retry(policy, Throttled(carried), 1, context()).delay == 4.0


def test_cooldown_is_retried_after_its_retry_after(pipeline: Pipeline) -> None:
    """A ``Cooldown`` is retried after the upstream's delay, even when ``retry_on`` excludes it."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[UpstreamDown], backoff_max=300))
    decision = pipeline.retry(policy, Cooldown(30), 1, context())
    assert (decision.retry, decision.delay) == (True, 30.0)


def test_retry_async_matches_retry(clock: MockClock) -> None:
    """``retry_async`` decides like ``retry`` for the same seed."""
    policy = Policy("p", retry=RetryPolicy(max_attempts=3, backoff=2))
    sync = Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(3))
    async_ = Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(3))
    expected = sync.retry(policy, UpstreamDown(), 2, context())
    decision = asyncio.run(async_.retry_async(policy, UpstreamDown(), 2, context()))
    assert decision == expected
    assert decision.retry


# -- retry budget -----------------------------------------------------------------------


def budget_policy(ratio: float = 0.2, min_per_second: float = 0.0, window: float = 10.0) -> Policy:
    """A per-tenant policy of three attempts under a retry budget."""
    return Policy(
        "p",
        key="tenant:{tenant}",
        retry=RetryPolicy(
            max_attempts=3, budget=RetryBudget(ratio=ratio, min_per_second=min_per_second, window=window)
        ),
    )


def admit_many(pipeline: Pipeline, policy: Policy, count: int, tenant: str = "acme") -> None:
    """Admit ``count`` executions for ``tenant`` (each must be admitted)."""
    for _ in range(count):
        assert pipeline.admit(policy, context(tenant=tenant)).admitted


def count_retries(pipeline: Pipeline, policy: Policy, tries: int, tenant: str = "acme") -> int:
    """How many of ``tries`` first-attempt failures for ``tenant`` are allowed a retry."""
    return sum(pipeline.retry(policy, UpstreamDown(), 1, context(tenant=tenant)).retry for _ in range(tries))


def test_budget_allows_ratio_times_admissions(pipeline: Pipeline) -> None:
    """With ratio 0.2 and no floor, 100 admissions allow exactly 20 retries in the window."""
    policy = budget_policy()
    admit_many(pipeline, policy, 100)
    assert count_retries(pipeline, policy, 50) == 20


def test_spent_budget_refuses_with_reason_retry_budget(pipeline: Pipeline) -> None:
    """Once the budget is spent, a retry is refused with reason ``retry_budget``."""
    policy = budget_policy()
    admit_many(pipeline, policy, 100)
    count_retries(pipeline, policy, 20)
    decision = pipeline.retry(policy, UpstreamDown(), 1, context(tenant="acme"))
    assert (decision.retry, decision.reason) == (False, "retry_budget")


def test_budget_without_admissions_or_floor_refuses(pipeline: Pipeline) -> None:
    """With no admissions and no floor there is nothing to retry from."""
    decision = pipeline.retry(budget_policy(), UpstreamDown(), 1, context(tenant="acme"))
    assert decision.reason == "retry_budget"


def test_budget_floor_allows_min_per_second_times_window(pipeline: Pipeline) -> None:
    """With ratio 0 the floor allows ``min_per_second × window`` retries."""
    policy = budget_policy(ratio=0.0, min_per_second=0.5, window=10)
    assert count_retries(pipeline, policy, 20) == 5


def test_budget_is_kept_per_key(pipeline: Pipeline) -> None:
    """One tenant spending its budget leaves another tenant's budget untouched."""
    policy = budget_policy()
    admit_many(pipeline, policy, 100, tenant="acme")
    admit_many(pipeline, policy, 10, tenant="globex")
    count_retries(pipeline, policy, 50, tenant="acme")
    assert count_retries(pipeline, policy, 10, tenant="globex") == 2


def test_budget_refills_as_the_window_moves(pipeline: Pipeline, clock: MockClock) -> None:
    """Retries spent in one window are forgotten two windows later, so the floor allows retries again."""
    policy = budget_policy(ratio=0.0, min_per_second=1.0, window=10)
    assert count_retries(pipeline, policy, 15) == 10
    assert not pipeline.retry(policy, UpstreamDown(), 1, context(tenant="acme")).retry
    clock.advance(20)
    assert count_retries(pipeline, policy, 15) == 10


def test_budget_refills_with_new_admissions_in_a_later_window(pipeline: Pipeline, clock: MockClock) -> None:
    """After the window moves on, new admissions earn new retries even though the old budget was spent."""
    policy = budget_policy()
    admit_many(pipeline, policy, 100)
    assert count_retries(pipeline, policy, 30) == 20
    clock.advance(25)
    admit_many(pipeline, policy, 50)
    assert count_retries(pipeline, policy, 30) == 10


def test_budget_is_not_spent_on_refused_retries(pipeline: Pipeline) -> None:
    """A retry refused for another reason (non-retryable, out of attempts) does not spend the budget."""
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10)  # one retry per window
    retry = RetryPolicy(max_attempts=3, give_up_on=[BadRequest], budget=budget)
    policy = Policy("p", key="tenant:{tenant}", retry=retry)
    for _ in range(5):
        assert not pipeline.retry(policy, BadRequest(), 1, context(tenant="acme")).retry
        assert not pipeline.retry(policy, UpstreamDown(), 3, context(tenant="acme")).retry
    assert pipeline.retry(policy, UpstreamDown(), 1, context(tenant="acme")).retry


def test_budget_counts_retries_across_pipelines_sharing_a_store(clock: MockClock) -> None:
    """Two workers sharing a store share one budget: retries on one are counted on the other."""
    store = MemoryStore(clock=clock)
    worker_a = Pipeline(store, clock=clock, rng=random.Random(1))
    worker_b = Pipeline(store, clock=clock, rng=random.Random(2))
    policy = budget_policy()
    admit_many(worker_a, policy, 50)
    assert count_retries(worker_a, policy, 6) + count_retries(worker_b, policy, 6) == 10


# -- Pipeline.outcome_of ---------------------------------------------------------------------


def test_outcome_of_no_exception_is_success(pipeline: Pipeline) -> None:
    """An execution that returned is a success, with its duration."""
    outcome = pipeline.outcome_of(Policy("p"), None, 0.25)
    assert (outcome.kind, outcome.duration) == ("success", 0.25)


def test_outcome_of_cooldown_is_cooldown_with_retry_after(pipeline: Pipeline) -> None:
    """A ``Cooldown`` is a cooldown outcome carrying its ``retry_after``."""
    outcome = pipeline.outcome_of(Policy("p"), Cooldown(30))
    assert (outcome.kind, outcome.retry_after) == ("cooldown", 30.0)


def test_outcome_of_ignored_exception_is_ignored(pipeline: Pipeline) -> None:
    """An exception in ``failure.ignore`` is an ignored outcome, neither success nor failure."""
    policy = Policy("p", failure=FailurePolicy(ignore=[BadRequest]))
    assert pipeline.outcome_of(policy, BadRequest()).kind == "ignored"


def test_outcome_of_predicate_ignore_is_ignored(pipeline: Pipeline) -> None:
    """An exception the predicate calls ``"ignore"`` is an ignored outcome."""
    policy = Policy("p", failure=FailurePolicy(predicate=lambda exc: "ignore"))
    assert pipeline.outcome_of(policy, UpstreamDown()).kind == "ignored"


@pytest.mark.parametrize("exc", [UpstreamDown(), BadRequest(), KeyError("k")])
def test_outcome_of_other_exceptions_is_failure(pipeline: Pipeline, exc: BaseException) -> None:
    """Every other exception, retryable or not, is a failure that counts against the breaker."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[UpstreamDown]))
    assert pipeline.outcome_of(policy, exc, 1.5).kind == "failure"
