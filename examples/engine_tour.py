"""A tour of the engine on the embedded store, with simulated time: run ``python examples/engine_tour.py``.

Three tenants call a flaky upstream through one policy. Tenant "noisy" floods; the
upstream goes down for a while; nobody sleeps: every execution that may not run now
is deferred to a time computed from the shared state, and "comes back" then.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter

from limitpal_tasks import (
    Breaker,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    TaskContext,
)

POLICY = Policy(
    "partner-api",
    key="tenant:{tenant}",
    breaker=Breaker(
        failure_rate_threshold=50,
        minimum_calls=10,
        window=20,
        open_for=2,
        half_open_probes=2,
        key="service:partner",
    ),
    rate=RateLimit("20/s", burst=5),
)


def upstream_ok(now: float, start: float) -> bool:
    """The upstream is down between the 3rd and the 6th simulated second."""
    return not 3.0 <= now - start < 6.0


def main() -> None:
    clock = MockClock()
    pipeline = Pipeline(MemoryStore(clock=clock), clock=clock, rng=random.Random(7))
    start = clock.now()
    # (due time, sequence, tenant, context) — the "broker": deferred work waits here, not in a worker.
    queue: list[tuple[float, int, str, TaskContext]] = []
    arrivals = [("noisy", 0.005 * i) for i in range(300)] + [
        (tenant, 0.25 * i) for tenant in ("quiet-a", "quiet-b") for i in range(20)
    ]
    for seq, (tenant, at) in enumerate(arrivals):
        heapq.heappush(queue, (start + at, seq, tenant, TaskContext("call", kwargs={"tenant": tenant})))
    seq = len(arrivals)
    stats: dict[str, Counter[str]] = {t: Counter() for t in ("noisy", "quiet-a", "quiet-b")}
    latency: dict[str, list[float]] = {t: [] for t in stats}
    while queue:
        due, _, tenant, context = heapq.heappop(queue)
        clock.set(max(clock.now(), due))
        decision = pipeline.admit(POLICY, context)
        if not decision.admitted:
            stats[tenant][f"deferred:{decision.reason}"] += 1
            if decision.exhausted:
                stats[tenant]["dead-lettered"] += 1
                continue
            again = TaskContext(
                "call",
                kwargs={"tenant": tenant},
                deferrals=decision.deferrals,
                first_seen=decision.first_seen,
                reservations=decision.reservations,
            )
            seq += 1
            heapq.heappush(queue, (clock.now() + decision.delay, seq, tenant, again))
            continue
        ok = upstream_ok(clock.now(), start)
        pipeline.record(decision.ticket, Outcome.success() if ok else Outcome.failure())
        stats[tenant]["succeeded" if ok else "failed"] += 1
        latency[tenant].append(clock.now() - (context.first_seen or due))

    breaker = pipeline.store.status("service:partner").breaker
    print(f"simulated {clock.now() - start:.1f}s; breaker now {breaker}\n")
    for tenant, counts in stats.items():
        waits = sorted(latency[tenant])
        p95 = waits[int(0.95 * (len(waits) - 1))] if waits else 0.0
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        print(f"{tenant:8s} p95 wait {p95:5.2f}s  {detail}")


if __name__ == "__main__":
    main()
