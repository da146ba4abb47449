"""The testing switch users turn on in their own suites."""

from __future__ import annotations

import random

from limitpal_tasks import MemoryStore, MockClock, Pipeline, Policy, RetryPolicy, TaskContext, set_testing


def test_set_testing_zeroes_deferral_delays_but_keeps_the_decision() -> None:
    """Under set_testing a rate-limited task is still deferred, with its reason, after 0 s."""
    clock = MockClock()
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(0))
    policy = Policy("p", rate="1/m")
    pipeline.admit(policy, TaskContext("t"))

    with set_testing():
        decision = pipeline.admit(policy, TaskContext("t"))

    assert not decision.admitted
    assert (decision.reason, decision.delay, decision.deferrals) == ("rate_limited", 0.0, 1)


def test_set_testing_zeroes_retry_backoff_and_restores_the_previous_setting() -> None:
    """Retries wait 0 s inside the block and their real backoff after it."""
    pipeline = Pipeline(MemoryStore(), rng=random.Random(0))
    policy = Policy("p", retry=RetryPolicy(max_attempts=5, backoff=10, jitter="none"))

    with set_testing():
        inside = pipeline.retry(policy, RuntimeError(), 1, TaskContext("t"))
    outside = pipeline.retry(policy, RuntimeError(), 1, TaskContext("t"))

    assert (inside.retry, inside.delay) == (True, 0.0)
    assert (outside.retry, outside.delay) == (True, 10.0)
