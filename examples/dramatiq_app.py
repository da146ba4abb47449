"""Dramatiq with limitpal on the local Redis: ``python examples/dramatiq_app.py``.

Sends 30 messages for a noisy tenant and 5 for a quiet one through an actor limited to
5/s per tenant, runs a worker in this process, and prints when each ran: the quiet
tenant is not stuck behind the noisy one, and no worker thread sleeps. Set
``REDIS_URL`` to use another server (default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from limitpal_tasks import Policy, RateLimit
from limitpal_tasks.dramatiq import LimitpalMiddleware, install

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
broker = RedisBroker(url=URL, namespace="limitpal-example")  # type: ignore[no-untyped-call]  # untyped in dramatiq
install(
    broker,
    LimitpalMiddleware(
        store=URL,
        key_prefix="limitpal-example",
        policies={"api": Policy("api", key="tenant:{tenant}", rate=RateLimit("5/s", burst=2))},
    ),
)
dramatiq.set_broker(broker)
runs: dict[str, list[float]] = defaultdict(list)


@dramatiq.actor(limitpal_policy="api", queue_name="limitpal-example")
def call_partner(tenant: str, n: int) -> None:
    """One call to a partner API on behalf of ``tenant``."""
    runs[tenant].append(time.monotonic())


def main() -> None:
    broker.flush_all()
    start = time.monotonic()
    for n in range(30):
        call_partner.send("noisy", n)
    for n in range(5):
        call_partner.send("quiet", n)
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        while sum(len(v) for v in runs.values()) < 35 and time.monotonic() - start < 30:
            time.sleep(0.1)
    finally:
        worker.stop()
    for tenant, times in sorted(runs.items()):
        offsets = ", ".join(f"{t - start:.1f}" for t in times)
        print(f"{tenant:6} ran {len(times):2} times at [{offsets}] s")


if __name__ == "__main__":
    main()
