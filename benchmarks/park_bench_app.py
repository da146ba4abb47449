"""The Celery app of bench_park.py, imported by the worker processes it starts.

One no-op task behind one policy; the bench pauses the policy's key to simulate an
outage. Every delivery (``task_prerun``, which also sees the deliveries that are only
deferred) and every execution (the task body) is counted per task id in a stats Redis,
so the bench can tell duplicates, redeliveries and lost tasks apart.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, Task, signals

from limitpal_tasks import Breaker, DeferPolicy, Policy, RateLimit
from limitpal_tasks.celery import ResilientTask

BROKER = os.environ.get("PARK_BENCH_BROKER", "redis://127.0.0.1:6379/2")
STORE = os.environ.get("PARK_BENCH_STORE", "redis://127.0.0.1:6379/14")
STATS = os.environ.get("PARK_BENCH_STATS", "redis://127.0.0.1:6379/14")
TRANSPORT = os.environ.get("PARK_BENCH_TRANSPORT", "broker")
VISIBILITY = float(os.environ.get("PARK_BENCH_VISIBILITY", "3600"))
RATE = os.environ.get("PARK_BENCH_RATE", "")
PARK_LIMIT = int(os.environ.get("PARK_BENCH_PARK_LIMIT", "10000"))
PREFETCH = int(os.environ.get("PARK_BENCH_PREFETCH", "16"))
MAX_DELAY = float(os.environ.get("PARK_BENCH_MAX_DELAY", "300"))
JITTER = float(os.environ.get("PARK_BENCH_JITTER", "0.1"))

QUEUE = "park-bench"
KEY = "upstream"
PREFIX = "park-bench"
STATS_PREFIX = "park-bench-stats"  # the stats may share a database with the store

app = Celery("park_bench_app", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=PREFETCH,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": VISIBILITY},
    limitpal_store_url=STORE,
    limitpal_key_prefix=PREFIX,
)
stats = redis.Redis.from_url(STATS)

POLICY = Policy(
    "upstream",
    key=KEY,
    breaker=Breaker(),
    rate=RateLimit(RATE) if RATE else None,
    defer=DeferPolicy(
        transport="park" if TRANSPORT == "park" else "broker",
        park_limit=PARK_LIMIT,
        max_delay=MAX_DELAY,
        jitter=JITTER,
    ),
)


def stat(name: str) -> str:
    return f"{STATS_PREFIX}:{name}"


@signals.task_prerun.connect  # type: ignore[untyped-decorator]  # celery ships no types
def _delivered(task_id: str = "", task: Task | None = None, **_: Any) -> None:
    """One delivery of ``task_id`` reached a pool process (deferred or run: not yet known)."""
    info = (task.request.delivery_info if task is not None else None) or {}
    pipe = stats.pipeline(transaction=False)
    pipe.hincrby(stat("deliveries"), task_id, 1)
    pipe.zadd(stat("first-delivery"), {task_id: time.time()}, nx=True)
    if info.get("redelivered"):
        pipe.hincrby(stat("redelivered"), task_id, 1)
    pipe.execute()


@app.task(name="park_bench.noop", base=ResilientTask, policy=POLICY, bind=True)  # type: ignore[untyped-decorator]
def noop(self: Task, i: int) -> None:
    """The task: count this execution of its id, and when its first one finished."""
    pipe = stats.pipeline(transaction=False)
    pipe.hincrby(stat("executions"), self.request.id, 1)
    pipe.zadd(stat("done"), {self.request.id: time.time()}, nx=True)
    pipe.execute()
