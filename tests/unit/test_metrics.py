"""Prometheus hooks count what the pipeline decides, with bounded labels."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from limitpal_tasks import Breaker, MemoryStore, MockClock, Outcome, Pipeline, Policy, TaskContext
from limitpal_tasks.metrics import PrometheusHooks


def test_decisions_deferral_delays_and_transitions_are_counted_per_policy() -> None:
    """One admission, one rate deferral and a breaker opening show up under the policy's labels."""
    registry = CollectorRegistry()
    clock = MockClock()
    pipeline = Pipeline(
        MemoryStore(clock=clock), clock=clock, rng=random.Random(0), hooks=[PrometheusHooks(registry)]
    )
    policy = Policy("api", key="tenant:{tenant}", rate="1/s", breaker=Breaker(minimum_calls=1, window=1))
    context = TaskContext("t", kwargs={"tenant": "acme"})

    first = pipeline.admit(policy, context)
    assert first.admitted
    assert not pipeline.admit(policy, context).admitted  # rate-limited
    pipeline.record(first.ticket, Outcome.failure())  # opens the breaker

    def value(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    assert value("limitpal_decisions_total", policy="api", reason="admitted") == 1
    assert value("limitpal_decisions_total", policy="api", reason="rate_limited") == 1
    assert value("limitpal_defer_delay_seconds_count", policy="api", reason="rate_limited") == 1
    assert (
        value("limitpal_breaker_transitions_total", policy="api", from_state="closed", to_state="open") == 1
    )
    labels = {s.labels.get("tenant") for m in registry.collect() for s in m.samples}
    assert labels == {None}, "no metric may carry a tenant label"
