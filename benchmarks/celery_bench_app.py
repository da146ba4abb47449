"""Tasks for bench_celery.py, imported by the worker processes it starts."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from limitpal_tasks import Breaker, Policy, RateLimit
from limitpal_tasks.celery import ResilientTask

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1")
STATS = os.environ.get("BENCH_STATS", "redis://127.0.0.1:6379/2")

app = Celery("celery_bench_app", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=16,
    broker_connection_retry_on_startup=True,
    limitpal_store_url=os.environ.get("BENCH_STORE", "redis://127.0.0.1:6379/3"),
    limitpal_key_prefix="bench",
)
stats = redis.Redis.from_url(STATS)

OPEN = Policy(
    "bench-open",
    key="tenant:{tenant}",
    breaker=Breaker(minimum_calls=100, window=100),
    rate=RateLimit("1000000/s", burst=1_000_000),
)
LIMITED = Policy("bench-limited", key="one-key", rate=RateLimit("100/s", burst=10))


def _done(name: str) -> None:
    pipe = stats.pipeline()
    pipe.incr(f"{name}:count")
    pipe.set(f"{name}:last", repr(time.time()))
    pipe.execute()


@app.task(name="bench.plain")  # type: ignore[untyped-decorator]  # celery ships no types
def plain(tenant: str) -> None:
    _done("plain")


@app.task(name="bench.protected", base=ResilientTask, policy=OPEN)  # type: ignore[untyped-decorator]
def protected(tenant: str) -> None:
    _done("protected")


@app.task(name="bench.limited", base=ResilientTask, policy=LIMITED)  # type: ignore[untyped-decorator]
def limited(tenant: str) -> None:
    stats.rpush("limited:times", repr(time.time()))
    _done("limited")
