"""Dramatiq with and without the limitpal middleware, side by side: no-op actor throughput.

One in-process ``dramatiq.Worker`` (8 threads) on the Redis broker with a ``RedisStore``.
Run with ``make bench`` or ``python benchmarks/bench_dramatiq.py [-n N]``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from _table import report
from limitpal_tasks import Breaker, Policy, RateLimit
from limitpal_tasks.dramatiq import LimitpalMiddleware, install

BROKER = "redis://127.0.0.1:6379/1"
STORE = "redis://127.0.0.1:6379/3"
OPEN = Policy(
    "bench-open",
    key="tenant:{tenant}",
    breaker=Breaker(minimum_calls=100, window=100),
    rate=RateLimit("1000000/s", burst=1_000_000),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    for url in (BROKER, STORE):
        redis.Redis.from_url(url).flushdb()
    broker = RedisBroker(url=BROKER)  # type: ignore[no-untyped-call]  # untyped in dramatiq
    install(broker, LimitpalMiddleware(store=STORE, key_prefix="bench", policies={"open": OPEN}))
    dramatiq.set_broker(broker)
    done = {"plain": 0, "protected": 0}
    lock = threading.Lock()

    @dramatiq.actor(queue_name="bench-plain", max_retries=0)
    def plain(tenant: str) -> None:
        with lock:
            done["plain"] += 1

    @dramatiq.actor(queue_name="bench-protected", max_retries=0, limitpal_policy="open")
    def protected(tenant: str) -> None:
        with lock:
            done["protected"] += 1

    rows: list[list[object]] = []
    rates: dict[str, float] = {}
    for name, actor in (("plain", plain), ("protected", protected)):
        for i in range(args.n):
            actor.send(f"t{i % 16}")
        worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=50, queues={actor.queue_name})
        start = time.time()
        worker.start()
        try:
            while done[name] < args.n and time.time() - start < 120:
                time.sleep(0.01)
            rates[name] = done[name] / (time.time() - start)
        finally:
            worker.stop()
    rows.append(["no-op messages/s, plain Dramatiq", rates["plain"], 1.0])
    rows.append(
        [
            "no-op messages/s, limitpal (breaker + rate, RedisStore)",
            rates["protected"],
            rates["protected"] / rates["plain"],
        ]
    )
    report(
        "bench_dramatiq",
        ["measure", "value", "ratio"],
        rows,
        notes=f"{args.n} messages each, queued first; Redis broker, one worker with 8 threads, same run.",
    )


if __name__ == "__main__":
    main()
