"""Store contract: adaptive rate limits find an upstream's capacity and follow it as it changes.

A simulated upstream accepts calls at its capacity (a token bucket) and answers the rest
with HTTP 429. A backlog of tasks tries every 2 ms of the shared ``MockClock``; each
admitted one calls the upstream and records the outcome the pipeline classifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from limitpal_tasks import (
    AdaptiveRate,
    Cooldown,
    DeferPolicy,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    Rate,
    RateChange,
    RateLimit,
    Store,
    TaskContext,
)

from .support import admitted

STEP = 0.002
ADAPTIVE = AdaptiveRate(floor="5/s", ceiling="200/s", decrease=0.5, increase=7, cooldown=0.25)
POLICY = Policy(
    "partner",
    key="partner:{name}",
    rate=RateLimit("100/s", reserve_ahead=0, adaptive=ADAPTIVE),
    defer=DeferPolicy(jitter=0, open_spread=0),
)
LIMIT = POLICY.rates[0].slot_id
KEY = "partner:acme"
CONTEXT = TaskContext("call", kwargs={"name": "acme"})


class TooManyRequests(Exception):
    """What an HTTP client raises for a 429 answer."""

    status_code = 429


@dataclass
class Upstream:
    """A token bucket of ``capacity`` calls per second, with a burst of 50 ms of capacity."""

    clock: MockClock
    capacity: float
    tokens: float = math.inf  # a full bucket to begin with
    at: float = 0.0
    log: list[tuple[float, bool]] = field(default_factory=list)

    def call(self) -> None:
        now = self.clock.now()
        burst = max(1.0, self.capacity / 20)
        self.tokens = min(burst, self.tokens + (now - self.at) * self.capacity)
        self.at = now
        accepted = self.tokens >= 1.0
        self.log.append((now, accepted))
        if not accepted:
            raise TooManyRequests("slow down")
        self.tokens -= 1.0

    def rejected_share(self, start: float, end: float) -> float:
        calls = [ok for t, ok in self.log if start <= t < end]
        return calls.count(False) / len(calls)

    def throughput(self, start: float, end: float) -> float:
        return sum(1 for t, ok in self.log if start <= t < end and ok) / (end - start)


def drive(
    pipeline: Pipeline, upstream: Upstream, clock: MockClock, seconds: float
) -> list[tuple[float, float]]:
    """Run an endless backlog for ``seconds``; the limiter's rate sampled every 100 ms (time, calls/s).

    Each deferral is waited out exactly (the task comes back when its slot is due); each
    admitted task calls the upstream and records what the pipeline makes of the answer.
    """
    store = pipeline.store
    samples: list[tuple[float, float]] = []
    end = clock.now() + seconds
    next_sample = clock.now()
    while clock.now() < end:
        if clock.now() >= next_sample:
            state = store.status(KEY).adaptive.get(LIMIT)
            samples.append((clock.now(), state.rate if state else 100.0))
            next_sample += 0.1
        decision = pipeline.admit(POLICY, CONTEXT)
        if not decision.admitted:
            clock.advance(max(decision.delay, 1e-6))
            continue
        try:
            upstream.call()
            error: BaseException | None = None
        except TooManyRequests as exc:
            error = exc
        pipeline.record(decision.ticket, pipeline.outcome_of(POLICY, error, 0.0))
    return samples


def rate_at(samples: list[tuple[float, float]], t: float) -> float:
    return next(rate for at, rate in samples if at >= t)


def test_rate_follows_capacity_down_and_up(pipeline: Pipeline, clock: MockClock) -> None:
    """Capacity 100/s → 30/s → 100/s: within 10 s of each step the rate is within 15% of it,
    and once converged under 5% of the calls are rejected."""
    upstream = Upstream(clock, capacity=100, at=clock.now())
    samples = []
    for capacity in (100, 30, 100):
        upstream.capacity = capacity
        step = clock.now()
        samples += drive(pipeline, upstream, clock, 20.0)
        settled = [rate for t, rate in samples if step + 10 <= t < step + 20]
        assert all(abs(rate - capacity) <= 0.15 * capacity for rate in settled), (
            capacity,
            min(settled),
            max(settled),
        )
        assert upstream.rejected_share(step + 10, step + 20) < 0.05


def test_a_burst_of_overload_answers_is_one_cut(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """Fifty 429s recorded at once cut the rate once (by at most ``decrease``), not fifty times."""
    bursty = POLICY.evolve(rate=RateLimit("100/s", burst=60, adaptive=ADAPTIVE))
    tickets = [admitted(pipeline.admit(bursty, CONTEXT)) for _ in range(50)]
    clock.advance(1.0)
    for ticket in tickets:
        pipeline.record(ticket, Outcome.failure(overload=True))
    rate = store.status(KEY).adaptive[bursty.rates[0].slot_id].rate
    assert rate == pytest.approx(100 * ADAPTIVE.decrease)


def test_a_cooldown_is_an_overload_signal(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A task raising Cooldown cuts the rate like a 429 does."""
    ticket = admitted(pipeline.admit(POLICY, CONTEXT))
    clock.advance(1.0)
    pipeline.record(ticket, pipeline.outcome_of(POLICY, Cooldown(retry_after=0), 0.0))
    assert store.status(KEY).adaptive[LIMIT].rate < 100


def test_an_ordinary_failure_leaves_the_rate_alone(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A failure that is no overload signal (a 500, a bug) neither cuts nor raises the rate."""
    ticket = admitted(pipeline.admit(POLICY, CONTEXT))
    clock.advance(1.0)
    pipeline.record(ticket, pipeline.outcome_of(POLICY, ValueError("bug"), 0.0))
    assert LIMIT not in store.status(KEY).adaptive


def test_successes_raise_the_rate_additively_up_to_the_ceiling(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Each success adds increase/rate: ``increase`` calls/s per second at saturation, up to the ceiling."""
    upstream = Upstream(clock, capacity=1000, at=clock.now())
    samples = drive(pipeline, upstream, clock, 5.0)
    assert rate_at(samples, clock.now() - 0.2) == pytest.approx(100 + 7 * 5, rel=0.1)
    drive(pipeline, upstream, clock, 20.0)
    assert store.status(KEY).adaptive[LIMIT].rate == 200


def test_the_gcra_interval_follows_the_rate_at_once(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """After a cut to 50/s, admissions run at 50/s straight away."""
    ticket = admitted(pipeline.admit(POLICY, CONTEXT))
    clock.advance(1.0)
    pipeline.record(ticket, Outcome.failure(overload=True))
    assert store.status(KEY).adaptive[LIMIT].rate == 50
    count = 0
    for _ in range(500):  # one second of tries, every 2 ms; no successes recorded to raise it
        count += pipeline.admit(POLICY, CONTEXT).admitted
        clock.advance(STEP)
    assert count == pytest.approx(50, abs=1)


def test_an_override_pins_the_rate_and_suspends_adaptation(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """While an operator's override is in force, overload answers do not move the learned rate."""
    ticket = admitted(pipeline.admit(POLICY, CONTEXT))
    store.override(KEY, LIMIT, Rate.parse("10/s"), seconds=60)
    clock.advance(1.0)
    pipeline.record(ticket, Outcome.failure(overload=True))
    assert LIMIT not in store.status(KEY).adaptive


def test_rate_changes_are_reported_once(store: Store, clock: MockClock) -> None:
    """A cut is an on_rate_change event with the old and new rate; so is each 10% of increase."""
    from limitpal_tasks import Hooks

    seen: list[RateChange] = []

    class Seen(Hooks):
        def on_rate_change(self, change: RateChange) -> None:
            seen.append(change)

    pipeline = Pipeline(store, clock=clock, hooks=[Seen()])
    ticket = admitted(pipeline.admit(POLICY, CONTEXT))
    clock.advance(1.0)
    pipeline.record(ticket, Outcome.failure(overload=True))
    assert [(c.key, c.limit, c.from_rate, c.to_rate, c.reason) for c in seen] == [
        (KEY, LIMIT, 100.0, 50.0, "overload")
    ]
    upstream = Upstream(clock, capacity=1000, at=clock.now())
    drive(pipeline, upstream, clock, 2.0)
    increases = [c for c in seen if c.reason == "increase"]
    assert increases, "successes raised the rate"
    # reported as soon as the rate has grown by a tenth: within one success's step of it
    assert all(1.1 <= c.to_rate / c.from_rate < 1.1 + ADAPTIVE.increase / c.from_rate**2 for c in increases)


def test_traffic_below_the_rate_does_not_raise_it(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """Successes at 10/s under a 100/s limit say nothing about capacity above it: the rate stays."""
    for _ in range(300):  # 30 s of calls every 100 ms
        ticket = admitted(pipeline.admit(POLICY, CONTEXT))
        pipeline.record(ticket, Outcome.success())
        clock.advance(0.1)
    state = store.status(KEY).adaptive.get(LIMIT)
    assert state is None or state.rate == 100.0
