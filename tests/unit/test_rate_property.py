"""Property: a rate limit never lets more than ``rate × T + burst`` executions start in any window T.

Random rates, bursts and reservation horizons; random arrival times on a ``MockClock``;
every deferred task comes back after exactly its delay carrying its reservations (as a
broker countdown would bring it back). Only ``Admitted`` decisions count.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from limitpal_tasks import (
    Admitted,
    DeferPolicy,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    Rate,
    RateLimit,
    TaskContext,
)

EPSILON = 1e-6  # seconds of float rounding allowed on admission times

limits = st.builds(
    lambda n, per, burst, ahead: RateLimit(Rate(n, per), burst=burst, reserve_ahead=ahead),
    n=st.integers(1, 20),
    per=st.sampled_from([1.0, 2.0, 10.0, 60.0]),
    burst=st.integers(1, 6),
    ahead=st.sampled_from([0.0, 0.5, 3.0, 60.0]),
)


def simulate(policy: Policy, arrivals: list[float], seed: int) -> list[float]:
    """Admission times of tasks arriving at ``arrivals`` (seconds from the start), retried as deferred."""
    clock = MockClock(1000.0)
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(seed))
    order = itertools.count()
    start = clock.now()
    queue: list[tuple[float, int, TaskContext]] = [
        (start + at, next(order), TaskContext("task", kwargs={"tenant_id": "a"})) for at in arrivals
    ]
    heapq.heapify(queue)
    admissions: list[float] = []
    for _ in range(len(arrivals) * 200):
        if not queue:
            break
        at, _, task = heapq.heappop(queue)
        clock.set(max(at, clock.now()))
        decision = pipeline.admit(policy, task)
        if isinstance(decision, Admitted):
            admissions.append(clock.now())
            pipeline.record(decision.ticket, Outcome.success())
            continue
        assert decision.reason == "rate_limited"
        back = TaskContext(
            "task",
            kwargs={"tenant_id": "a"},
            deferrals=decision.deferrals,
            first_seen=decision.first_seen,
            reservations=decision.reservations,
        )
        heapq.heappush(queue, (clock.now() + decision.delay, next(order), back))
    assert not queue, "the simulated backlog did not drain"
    return admissions


def most_in_a_window(admissions: list[float], length: float) -> int:
    """The largest number of admissions in any closed window [t, t + length] starting at an admission."""
    return max(
        bisect.bisect_right(admissions, start + length + EPSILON) - i for i, start in enumerate(admissions)
    )


@settings(max_examples=150, deadline=None)
@given(
    chosen=st.lists(limits, min_size=1, max_size=2, unique_by=lambda limit: limit.slot_id),
    arrivals=st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=60).map(sorted),
    window=st.floats(0.01, 120),
    seed=st.integers(0, 2**32 - 1),
)
def test_no_window_admits_more_than_rate_times_length_plus_burst(
    chosen: list[RateLimit], arrivals: list[float], window: float, seed: int
) -> None:
    """In every window of length T, admissions ≤ rate × T + burst, for each of the policy's limits."""
    policy = Policy(
        "api",
        key="tenant:{tenant_id}",
        rate=chosen,
        defer=DeferPolicy(max_deferrals=100_000, max_delay=3600),
    )

    admissions = simulate(policy, arrivals, seed)

    assert len(admissions) == len(arrivals)  # every task ran in the end
    for limit in chosen:
        for length in (limit.rate.interval, limit.rate.per, 2.5 * limit.rate.interval, window):
            bound = length / limit.rate.interval + limit.burst
            assert most_in_a_window(admissions, length) <= bound + EPSILON, (limit, length)
