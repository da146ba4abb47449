"""Specification of the Prometheus hooks, read the way Prometheus reads them: over HTTP.

A pipeline on a ``MemoryStore`` (with one simulated store outage) goes through
admissions, a rate deferral, a breaker open/half-open/closed cycle, a store failure and
a dead letter; ``/metrics`` is then scraped from a real ``prometheus_client`` endpoint.
"""

from __future__ import annotations

import random
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from limitpal_tasks import (
    Admitted,
    Breaker,
    DeadLetter,
    Decision,
    Hooks,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    StoreError,
    TaskContext,
    Transition,
)
from limitpal_tasks.core.decisions import AdmitRequest, BreakerState
from limitpal_tasks.core.events import HookRunner, hook_errors_total
from limitpal_tasks.core.store import AdmitResult
from limitpal_tasks.integrations._runtime import dead_letter
from limitpal_tasks.metrics import PrometheusHooks

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
STEP = 0.002  # every timed store call takes this long on the fake timer


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of sample ``name{labels}`` (exactly those labels), or ``None`` when absent."""
    return samples.get((name, frozenset(labels.items())))


class Timer:
    """A fake ``perf_counter`` that advances by ``STEP`` on every read."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.reads * STEP


class FlakyStore(MemoryStore):
    """A MemoryStore whose next ``failures`` admissions fail, as an unreachable Redis would."""

    failures = 0

    def admit(self, request: AdmitRequest) -> AdmitResult:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("connection refused")
        return super().admit(request)


class RaisingOnDecision(Hooks):
    """A broken user hook."""

    def on_decision(self, policy: str, decision: Decision) -> None:
        raise RuntimeError("hook bug")


class World:
    """A pipeline reporting to ``PrometheusHooks`` on a private registry, and the steps of the scenario."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.clock = MockClock()
        self.store = FlakyStore(clock=self.clock)
        self.runner = HookRunner(
            [PrometheusHooks(registry), RaisingOnDecision()], clock=self.clock, timer=Timer()
        )
        self.pipeline = Pipeline(self.store, clock=self.clock, rng=random.Random(0), hooks=self.runner)
        self.payments = Policy(
            "payments",
            key="tenant:{tenant}",
            rate="1/s",
            breaker=Breaker(minimum_calls=1, window=1, open_for=10, half_open_probes=1),
        )
        self.context = TaskContext("charge", kwargs={"tenant": "acme"})

    def admitted(self) -> Admitted:
        decision = self.pipeline.admit(self.payments, self.context)
        assert isinstance(decision, Admitted)
        return decision

    def admit_then_rate_limit(self) -> Admitted:
        """One admission and one rate-limited deferral."""
        first = self.admitted()
        assert self.pipeline.admit(self.payments, self.context).reason == "rate_limited"  # type: ignore[union-attr]
        return first

    def open_breaker(self, ticket: Admitted) -> None:
        self.pipeline.record(ticket.ticket, Outcome.failure())

    def close_breaker(self) -> None:
        """After the break, a probe (open → half_open) succeeds (half_open → closed)."""
        self.clock.advance(10)
        self.pipeline.record(self.admitted().ticket, Outcome.success())

    def fail_the_store(self) -> None:
        """One admission of a fail-closed policy while the store is down."""
        self.store.failures = 1
        decision = self.pipeline.admit(
            Policy("reports", key="tenant:{tenant}", fail_mode="closed"), self.context
        )
        assert decision.reason == "store_unavailable"  # type: ignore[union-attr]

    def dead_letter(self) -> DeadLetter:
        return dead_letter(
            self.store,
            self.payments,
            self.context,
            reason="max_attempts",
            headers={},
            attempts=5,
            error="RuntimeError: upstream 500",
            hooks=self.runner,
        )


@contextmanager
def serving(registry: CollectorRegistry) -> Iterator[Callable[[], Samples]]:
    """A real ``/metrics`` endpoint for ``registry`` on a free port, and a function scraping it."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    def scrape() -> Samples:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            text = response.read().decode("utf-8")
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    try:
        yield scrape
    finally:
        server.shutdown()  # waits for the server's poll (0.5 s): one server per scenario, not per test
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def scraped() -> Samples:
    """``/metrics`` after the whole scenario, run once for the tests that only read it."""
    registry = CollectorRegistry()
    world = World(registry)
    with serving(registry) as scrape:
        first = world.admit_then_rate_limit()
        world.open_breaker(first)
        world.close_breaker()
        world.fail_the_store()
        world.dead_letter()
        return scrape()


def test_decisions_are_counted_by_policy_and_reason(scraped: Samples) -> None:
    """``limitpal_decisions_total`` counts admissions as ``admitted`` and deferrals by reason."""
    assert sample(scraped, "limitpal_decisions_total", policy="payments", reason="admitted") == 2
    assert sample(scraped, "limitpal_decisions_total", policy="payments", reason="rate_limited") == 1
    assert sample(scraped, "limitpal_decisions_total", policy="reports", reason="store_unavailable") == 1


def test_deferral_delays_are_a_histogram_by_policy_and_reason(scraped: Samples) -> None:
    """``limitpal_defer_delay_seconds`` observes the rate-limited deferral's delay (under a second)."""
    labels = {"policy": "payments", "reason": "rate_limited"}
    assert sample(scraped, "limitpal_defer_delay_seconds_count", **labels) == 1
    assert sample(scraped, "limitpal_defer_delay_seconds_bucket", le="1.0", **labels) == 1


def test_breaker_transitions_are_counted_with_from_and_to_labels(scraped: Samples) -> None:
    """``limitpal_breaker_transitions_total{policy,from,to}`` has one closed→open→half_open→closed cycle."""
    for from_state, to_state in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]:
        value = sample(
            scraped,
            "limitpal_breaker_transitions_total",
            policy="payments",
            **{"from": from_state, "to": to_state},
        )
        assert value == 1, (from_state, to_state)


def test_breaker_open_gauge_rises_when_a_breaker_opens_and_falls_when_it_closes() -> None:
    """``limitpal_breaker_open{policy}`` is 1 while the tenant's breaker is open or half-open, 0 after."""
    registry = CollectorRegistry()
    world = World(registry)
    with serving(registry) as scrape:
        world.open_breaker(world.admit_then_rate_limit())
        while_open = sample(scrape(), "limitpal_breaker_open", policy="payments")
        world.close_breaker()
        after_close = sample(scrape(), "limitpal_breaker_open", policy="payments")

    assert (while_open, after_close) == (1, 0)


def test_store_latency_is_a_histogram_per_operation(scraped: Samples) -> None:
    """Each admit (the failed one included) and record to the store is observed under its operation."""
    assert sample(scraped, "limitpal_store_latency_seconds_count", operation="admit") == 4
    assert sample(scraped, "limitpal_store_latency_seconds_sum", operation="admit") == pytest.approx(4 * STEP)
    assert sample(scraped, "limitpal_store_latency_seconds_bucket", operation="admit", le="0.001") == 0
    assert sample(scraped, "limitpal_store_latency_seconds_bucket", operation="admit", le="0.0025") == 4
    assert sample(scraped, "limitpal_store_latency_seconds_count", operation="record") == 2


def test_store_latency_buckets_span_50_microseconds_to_a_second(scraped: Samples) -> None:
    """The latency histogram's finite buckets run from 50µs to 1s."""
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in scraped
        if name == "limitpal_store_latency_seconds_bucket" and ("operation", "admit") in labels
    )
    assert (bounds[0], bounds[-2], bounds[-1]) == (0.00005, 1.0, float("inf"))


def test_store_failures_are_counted_by_the_fail_mode_that_handled_them(scraped: Samples) -> None:
    """``limitpal_store_errors_total`` counts the outage under the policy and ``closed``."""
    assert sample(scraped, "limitpal_store_errors_total", policy="reports", handled_as="closed") == 1


def test_dead_letters_are_counted_by_policy_and_reason(scraped: Samples) -> None:
    """``limitpal_dead_letters_total{policy,reason}`` counts the dead letter."""
    assert sample(scraped, "limitpal_dead_letters_total", policy="payments", reason="max_attempts") == 1


def test_hook_errors_are_served_as_the_process_count(scraped: Samples) -> None:
    """``limitpal_hook_errors_total`` is this process's count of raising hooks, which includes ours."""
    served = sample(scraped, "limitpal_hook_errors_total")
    assert served is not None
    assert 4 <= served <= hook_errors_total()  # our hook raised once for each of the 4 decisions


def test_no_metric_carries_a_tenant_label(scraped: Samples) -> None:
    """No label value anywhere is the tenant's key or name."""
    values = {value for _, labels in scraped for _, value in labels}
    assert not {"acme", "tenant:acme"} & values


@pytest.mark.parametrize(
    ("from_state", "to_state", "change"),
    [
        ("closed", "open", 1),
        ("closed", "forced_open", 1),
        ("disabled", "forced_open", 1),
        ("open", "half_open", 0),
        ("half_open", "open", 0),
        ("open", "forced_open", 0),
        ("half_open", "closed", -1),
        ("forced_open", "closed", -1),
        ("open", "disabled", -1),
        ("closed", "disabled", 0),
    ],
)
def test_breaker_open_gauge_counts_keys_leaving_or_entering_the_closed_states(
    from_state: BreakerState, to_state: BreakerState, change: int
) -> None:
    """The gauge moves +1 from closed/disabled into open/half_open/forced_open, −1 back, else stays."""
    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)

    hooks.on_transition(Transition("api", "tenant:acme", from_state, to_state, 1, 0.0))

    assert registry.get_sample_value("limitpal_breaker_open", {"policy": "api"}) == change


def test_adaptive_rate_gauge_follows_cuts_and_increases() -> None:
    """limitpal_rate_current{policy} is the rate of the last change; changes are counted by reason."""
    from limitpal_tasks import AdaptiveRate, RateLimit

    registry = CollectorRegistry()
    clock = MockClock()
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, hooks=[PrometheusHooks(registry)])
    partner = Policy(
        "partner",
        key="partner:{name}",
        rate=RateLimit("100/s", burst=200, adaptive=AdaptiveRate(floor="10/s", ceiling="200/s", increase=50)),
    )
    context = TaskContext("call", kwargs={"name": "acme"})

    def run(outcome: Outcome) -> None:
        decision = pipeline.admit(partner, context)
        assert isinstance(decision, Admitted)
        pipeline.record(decision.ticket, outcome)

    with serving(registry) as scrape:
        clock.advance(1.0)
        run(Outcome.failure(overload=True))  # cut to 50/s
        after_cut = scrape()
        clock.advance(1.0)
        for _ in range(60):  # successes at the rate: +50/rate each once they near it, past 55/s
            run(Outcome.success())
            clock.advance(0.01)
        after_increase = scrape()

    assert sample(after_cut, "limitpal_rate_current", policy="partner") == 50.0
    assert sample(after_cut, "limitpal_rate_changes_total", policy="partner", reason="overload") == 1.0
    increased = sample(after_increase, "limitpal_rate_current", policy="partner")
    assert increased is not None
    assert increased >= 55.0
    increases = sample(after_increase, "limitpal_rate_changes_total", policy="partner", reason="increase")
    assert increases is not None
    assert increases >= 1.0
