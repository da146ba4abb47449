"""RedisStore round trips against the physical floor (PING) and other Redis limiters, side by side.

Run with ``make bench`` or ``python benchmarks/bench_redis.py [--seconds S] [--url URL]``.
Every figure comes from the same run against the same server; ratios are to PING.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from dramatiq.rate_limits import BucketRateLimiter
from dramatiq.rate_limits.backends import RedisBackend
from limits import RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from _table import report
from limitpal_tasks import Breaker, Outcome, Pipeline, Policy, RateLimit, TaskContext, Ticket
from limitpal_tasks.stores.redis import RedisStore

POLICY = Policy(
    "bench",
    key="tenant:{tenant_id}",
    breaker=Breaker(failure_rate_threshold=50, minimum_calls=100, window=100),
    rate=RateLimit("1000000000/s", burst=1_000_000),
)
CONTEXT = TaskContext("bench.task", kwargs={"tenant_id": "acme"})


def rate(seconds: float, op: Callable[[], object]) -> float:
    """Operations per second of ``op`` over ``seconds`` (after a short warm-up)."""
    for _ in range(200):
        op()
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            op()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.url)
    client.flushdb()
    store = RedisStore.from_url(args.url, prefix="bench", batch_delay=0)  # every record written at once
    pipeline = Pipeline(store)
    batching = Pipeline(RedisStore.from_url(args.url, prefix="bench"))  # successes ride along
    success = Outcome.success()
    tickets: list[Ticket] = []

    def admit() -> None:
        decision = pipeline.admit(POLICY, CONTEXT)
        if decision.admitted:
            tickets.append(decision.ticket)

    def record() -> None:
        if tickets:
            pipeline.record(tickets.pop(), success)
        else:
            admit()

    def admit_record() -> None:
        decision = pipeline.admit(POLICY, CONTEXT)
        if decision.admitted:
            pipeline.record(decision.ticket, success)

    def admit_record_batched() -> None:
        decision = batching.admit(POLICY, CONTEXT)
        if decision.admitted:
            batching.record(decision.ticket, success)

    rows: list[list[object]] = []
    ping = rate(args.seconds, client.ping)
    rows.append(["redis-py PING (floor)", ping, 1.0])
    # The floor for any script: an EVALSHA that does nothing, with admit's own KEYS and ARGV.
    # The gap between it and PING is the price of calling a script at all on this machine.
    ((admit_keys, admit_args),) = store._admit_calls(pipeline._request(POLICY, CONTEXT), [])
    empty = client.script_load("return 1")
    ops = rate(args.seconds, lambda: client.evalsha(empty, len(admit_keys), *admit_keys, *admit_args))
    rows.append(["EVALSHA 'return 1' with admit's arguments", ops, ops / ping])
    for name, op in (
        ("limitpal admit", admit),
        ("limitpal record", record),
        ("limitpal admit+record", admit_record),
        ("limitpal admit+record, successes batched", admit_record_batched),
    ):
        ops = rate(args.seconds, op)
        rows.append([name, ops, ops / ping])

    limiter = MovingWindowRateLimiter(RedisStorage(args.url))
    item = RateLimitItemPerSecond(1_000_000_000)
    ops = rate(args.seconds, lambda: limiter.hit(item, "bench"))
    rows.append(["limits moving-window hit", ops, ops / ping])

    bucket = BucketRateLimiter(  # type: ignore[no-untyped-call]  # dramatiq ships no annotations here
        RedisBackend(client=client), "bench", limit=1_000_000_000, bucket=1000
    )

    def acquire() -> None:
        with bucket.acquire(raise_on_failure=False):
            pass

    ops = rate(args.seconds, acquire)
    rows.append(["dramatiq BucketRateLimiter.acquire", ops, ops / ping])

    report(
        "bench_redis",
        ["operation", "ops/s", "ratio to PING"],
        rows,
        notes=(
            "one client, one connection, sequential calls against the same server in one run; "
            "targets: admit >= 0.8x PING, admit+record >= 0.45x PING, batched >= 0.7x PING"
        ),
    )
    client.flushdb()


if __name__ == "__main__":
    main()
