"""AsyncIO actors go through the async store, with the same decisions as threaded ones."""

from __future__ import annotations

import asyncio
import threading
import time

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO

from limitpal_tasks import MemoryStore, Policy, RateLimit
from limitpal_tasks.core.decisions import AdmitRequest, Outcome, RecordResult, Ticket
from limitpal_tasks.core.store import AdmitResult
from limitpal_tasks.dramatiq import LimitpalMiddleware, install

pytestmark = pytest.mark.dramatiq


class CountingStore(MemoryStore):
    """A MemoryStore that counts which twin (sync or async) each call used."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {"admit": 0, "admit_async": 0, "record": 0, "record_async": 0}
        self.loop_threads: set[str] = set()

    def admit(self, request: AdmitRequest) -> AdmitResult:
        self.calls["admit"] += 1
        return super().admit(request)

    async def admit_async(self, request: AdmitRequest) -> AdmitResult:
        self.calls["admit_async"] += 1
        self.loop_threads.add(threading.current_thread().name)
        return super().admit(request)

    def record(self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float) -> RecordResult:
        self.calls["record"] += 1
        return super().record(ticket, outcome, now, rand)

    async def record_async(
        self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float
    ) -> RecordResult:
        self.calls["record_async"] += 1
        return super().record(ticket, outcome, now, rand)


def test_asyncio_actor_admits_and_records_through_the_async_store() -> None:
    """A coroutine actor's admissions and records use the store's async twins, and the rate still holds."""
    broker = StubBroker()
    broker.add_middleware(AsyncIO())
    store = CountingStore()
    install(
        broker,
        LimitpalMiddleware(
            store=store, policies={"api": Policy("api", key="t:{tenant}", rate=RateLimit("5/s"))}
        ),
    )
    runs: list[float] = []

    async def call(tenant: str) -> None:
        await asyncio.sleep(0)
        runs.append(time.monotonic())

    actor = dramatiq.actor(broker=broker, actor_name="async_call", limitpal_policy="api")(call)
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=20)
    worker.start()
    try:
        for _ in range(3):
            actor.send("a")
        deadline = time.monotonic() + 10
        while len(runs) < 3:
            assert time.monotonic() < deadline, f"only {len(runs)} of 3 ran"
            time.sleep(0.02)
    finally:
        worker.stop()
        broker.emit_before("process_stop")

    assert store.calls["admit"] == store.calls["record"] == 0
    assert store.calls["admit_async"] >= 3
    assert store.calls["record_async"] == 3
    # 3 runs at 5/s: two intervals apart, less the one interval of slack a late return gets
    assert runs[-1] - runs[0] >= 0.2 - 1e-3, f"5/s admitted 3 runs within {runs[-1] - runs[0]:.3f}s"
