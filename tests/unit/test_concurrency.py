"""Specification of ``MemoryStore`` under threads: fleet-wide limits hold when callers race.

Threads start together on a ``threading.Barrier``; time never moves (``MockClock``), so no
lease expires and every limit is tested at its tightest. No test sleeps.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    Bulkhead,
    Decision,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    TaskContext,
)

TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def frequent_thread_switches() -> Iterator[None]:
    """Let the interpreter switch threads every microsecond, so races happen in tiny critical sections."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def run_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` on ``count`` threads released at once; re-raise the first failure."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def main(i: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


def context(tenant: str = "a") -> TaskContext:
    return TaskContext("task", kwargs={"tenant_id": tenant})


def test_half_open_breaker_admits_at_most_half_open_probes_under_a_race() -> None:
    """32 threads racing on a breaker whose break just ended get at most ``half_open_probes`` admissions."""
    clock = MockClock()
    store = MemoryStore(clock=clock)
    policy = Policy("api", key="service:x", breaker=Breaker(minimum_calls=1, open_for=10, half_open_probes=3))
    setup = Pipeline(store, clock=clock)
    first = setup.admit(policy, context())
    assert isinstance(first, Admitted)
    setup.record(first.ticket, Outcome.failure())
    assert store.status("service:x").breaker == "open"
    clock.advance(10)

    decisions: list[Decision] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        pipeline = Pipeline(store, clock=clock, rng=random.Random(i))  # one worker each
        for _ in range(4):
            decision = pipeline.admit(policy, context(str(i)))
            with lock:
                decisions.append(decision)

    run_threads(32, work)

    probes = [d for d in decisions if isinstance(d, Admitted)]
    assert len(probes) == 3
    assert all(d.ticket.probe for d in probes)
    assert sum(len(d.transitions) for d in decisions) == 1  # open -> half_open, reported once
    assert {d.reason for d in decisions if not isinstance(d, Admitted)} == {"half_open_busy"}
    assert store.status("service:x").probes_in_flight == 3


def test_bulkhead_never_exceeds_max_concurrent_under_threads() -> None:
    """16 threads looping admit → run → record never hold more than ``max_concurrent`` slots at once."""
    clock = MockClock()
    store = MemoryStore(clock=clock)
    policy = Policy("api", key="tenant:{tenant_id}", bulkhead=Bulkhead(3))
    live = 0
    peak = 0
    runs = 0
    lock = threading.Lock()

    def work(i: int) -> None:
        nonlocal live, peak, runs
        pipeline = Pipeline(store, clock=clock, rng=random.Random(i))
        for _ in range(300):
            decision = pipeline.admit(policy, context())
            if not isinstance(decision, Admitted):
                assert decision.reason == "concurrency"
                continue
            with lock:  # counted after the store granted the slot ...
                live += 1
                peak = max(peak, live)
                runs += 1
            with lock:  # ... and uncounted before the record gives it back
                live -= 1
            pipeline.record(decision.ticket, Outcome.success())

    run_threads(16, work)

    assert peak <= 3
    assert runs > 0
    assert store.status("tenant:a").in_flight == 0


def test_memory_store_stays_consistent_under_mixed_threads() -> None:
    """After racing admits and records on shared and private keys, nothing is left held or lost."""
    clock = MockClock(1000.0)  # small times: the limiter's sums stay exact to well under an interval
    store = MemoryStore(clock=clock)
    policy = Policy(
        "api",
        key="tenant:{tenant_id}",
        breaker=Breaker(key="service:x", minimum_calls=5000, window=5000),
        bulkhead=Bulkhead(2),
        rate=RateLimit("1000/s", burst=1000, key="global", reserve_ahead=0),
    )
    admissions = [0] * 16

    def work(i: int) -> None:
        pipeline = Pipeline(store, clock=clock, rng=random.Random(i))
        for n in range(100):
            decision = pipeline.admit(policy, context(str(i % 4)))
            if isinstance(decision, Admitted):
                admissions[i] += 1
                outcome = Outcome.failure() if n % 10 == 0 else Outcome.success()
                pipeline.record(decision.ticket, outcome)

    run_threads(16, work)

    total = sum(admissions)
    assert total > 0
    breaker = store.status("service:x")
    assert breaker.breaker == "closed"
    assert breaker.calls == total  # every admitted execution was counted exactly once
    assert (breaker.in_flight, breaker.probes_in_flight) == (0, 0)
    assert all(store.status(f"tenant:{t}").in_flight == 0 for t in range(4))
    # Only admitted executions took a token (no slot is booked ahead): one interval each
    (tat,) = store.status("global").rates.values()
    assert abs(tat - (clock.now() + total * 0.001)) < 1e-6
