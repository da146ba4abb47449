"""Parking needs a shared store: with memory:// a deferral goes through the broker instead."""

from __future__ import annotations

import pytest

from limitpal_tasks import DeferPolicy, Policy

pytestmark = pytest.mark.dramatiq


def test_memory_store_deferrals_go_through_the_broker_not_a_per_process_park() -> None:
    """A process's own MemoryStore cannot be the park another process releases from: no task is parked."""
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    from limitpal_tasks.dramatiq import LimitpalMiddleware, install

    broker = StubBroker()
    policy = Policy("p", key="tenant:{tenant}", rate="1/s", defer=DeferPolicy(transport="park"))
    middleware = install(broker, LimitpalMiddleware(policies={"p": policy}))
    ran: list[int] = []
    actor = dramatiq.actor(broker=broker, actor_name="call", limitpal_policy="p")(
        lambda tenant, n: ran.append(n)
    )
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        for n in range(3):
            actor.send("a", n)
        broker.join(actor.queue_name, timeout=20_000)
        worker.join()
    finally:
        worker.stop()

    assert sorted(ran) == [0, 1, 2]
    assert middleware.runtime.store.parked("dramatiq") == []
    assert middleware.releaser is None
