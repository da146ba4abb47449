"""Parity: the same policy and workload through Celery and Dramatiq give the same per-tenant counts."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from limitpal_tasks import (
    Breaker,
    DeadLetter,
    DeferPolicy,
    Deferred,
    Hooks,
    Policy,
    RateLimit,
    TaskContext,
)

pytestmark = [pytest.mark.celery, pytest.mark.dramatiq]

# Tenant "a": its breaker is forced open, so each of its tasks is deferred twice (0.2 s
# apart) and then dead-lettered. Tenant "b": 3 tasks within the burst, all run at once.
# Tenant "c": 4 tasks, 3 within the burst, the fourth deferred once to a booked slot.
POLICY = Policy(
    "parity",
    key="tenant:{tenant}",
    breaker=Breaker(open_for=0.2, minimum_calls=50, window=50),
    rate=RateLimit("1/s", burst=3),
    defer=DeferPolicy(max_deferrals=2, jitter=0, open_spread=0),
)
WORKLOAD = [("a", 3), ("b", 3), ("c", 4)]
EXPECTED = {
    "a": Counter({"deferred:breaker_open": 6, "dead:max_deferrals": 3, "hooked:max_deferrals": 3}),
    "b": Counter({"ran": 3}),
    "c": Counter({"ran": 4, "deferred:rate_limited": 1}),
}


class Tally(Hooks):
    """Counts what happened per tenant: runs (from the task body), deferrals and dead letters (hooks)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, Counter[str]] = {tenant: Counter() for tenant, _ in WORKLOAD}

    def add(self, tenant: str, what: str) -> None:
        with self.lock:
            self.counts[tenant][what] += 1

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        if not decision.exhausted:
            self.add(str(context.argument("tenant")), f"deferred:{decision.reason}")

    def on_dead_letter(self, letter: DeadLetter) -> None:
        self.add(letter.key.removeprefix("tenant:"), f"hooked:{letter.reason}")


def wait_until(done: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the workload did not finish in time"
        time.sleep(0.02)


def finished(tally: Tally, dead: Callable[[], list[Any]]) -> bool:
    with tally.lock:
        ran = sum(c["ran"] for c in tally.counts.values())
        hooked = sum(tally.counts["a"].values()) - tally.counts["a"]["deferred:breaker_open"]
    return ran == 7 and hooked == 3 and len(dead()) == 3


@contextmanager
def celery_run(tally: Tally) -> Iterator[Callable[[], dict[str, Counter[str]]]]:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    from limitpal_tasks.celery import resilient_task, runtime

    app = Celery("parity", broker="memory://", backend="cache+memory://")
    app.conf.update(
        limitpal_policies={"parity": POLICY},
        limitpal_hooks=[tally],
        broker_transport_options={"polling_interval": 0.02},
        task_acks_late=True,
    )

    @resilient_task(app=app, policy="parity", name="parity.call")
    def call(tenant: str, n: int) -> None:
        tally.add(tenant, "ran")

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"):
        store = runtime(app).store
        store.force("tenant:a", "forced_open")
        for tenant, count in WORKLOAD:
            for n in range(count):
                call.delay(tenant, n)
        wait_until(lambda: finished(tally, store.list_dead))
        yield lambda: _with_dead(tally, store.list_dead())


@contextmanager
def dramatiq_run(tally: Tally) -> Iterator[Callable[[], dict[str, Counter[str]]]]:
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    from limitpal_tasks.dramatiq import LimitpalMiddleware, install

    broker = StubBroker()
    middleware = install(broker, LimitpalMiddleware(policies={"parity": POLICY}, hooks=(tally,)))

    def call(tenant: str, n: int) -> None:
        tally.add(tenant, "ran")

    actor = dramatiq.actor(broker=broker, actor_name="parity.call", limitpal_policy="parity")(call)
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=20)
    worker.start()
    try:
        store = middleware.runtime.store
        store.force("tenant:a", "forced_open")
        for tenant, count in WORKLOAD:
            for n in range(count):
                actor.send(tenant, n)
        wait_until(lambda: finished(tally, store.list_dead))
        yield lambda: _with_dead(tally, store.list_dead())
    finally:
        worker.stop()


def _with_dead(tally: Tally, dead: list[Any]) -> dict[str, Counter[str]]:
    counts = {tenant: Counter(c) for tenant, c in tally.counts.items()}
    for letter in dead:
        counts[letter.key.removeprefix("tenant:")][f"dead:{letter.reason}"] += 1
    return counts


def test_celery_and_dramatiq_count_the_same_admissions_deferrals_and_dead_letters() -> None:
    """The same policy and workload give the same per-tenant runs, deferrals by reason and dead letters."""
    celery_tally, dramatiq_tally = Tally(), Tally()
    with celery_run(celery_tally) as celery_counts:
        from_celery = celery_counts()
    with dramatiq_run(dramatiq_tally) as dramatiq_counts:
        from_dramatiq = dramatiq_counts()

    assert from_celery == EXPECTED
    assert from_dramatiq == from_celery
