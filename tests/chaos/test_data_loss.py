"""Fault 2: the store loses everything (``FLUSHALL`` + ``SCRIPT FLUSH``, or a restart without persistence).

Scripts must be reloaded transparently (``NOSCRIPT`` is not an outage), breakers restart
closed, leases and booked slots simply vanish, and a ``record`` for a ticket of the lost
state changes nothing and raises nothing. In-process tests check the store on both its
sync and asyncio clients; a worker scenario checks the same under running Celery and
Dramatiq workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    Bulkhead,
    DeadLetter,
    Deferred,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    TaskContext,
)
from limitpal_tasks.stores.redis import RedisStore

from .harness import FRAMEWORKS, Chaos, RecordProperty
from .servers import RedisServer

pytestmark = [pytest.mark.chaos, pytest.mark.redis]

# fail_mode="closed": a store error shows as a deferral, it never passes silently.
BREAKER = Policy(
    "lossy-breaker",
    key="tenant:{tenant}",
    breaker=Breaker(minimum_calls=2, window=2, open_for=600),
    fail_mode="closed",
)
BULKHEAD = Policy("lossy-bulkhead", key="tenant:{tenant}", bulkhead=Bulkhead(1), fail_mode="closed")
RATE = Policy("lossy-rate", key="tenant:{tenant}", rate=RateLimit("1/m"), fail_mode="closed")


def _context(tenant: str, reservations: dict[str, float] | None = None) -> TaskContext:
    return TaskContext("lossy", kwargs={"tenant": tenant}, reservations=reservations or {})


def _flush(server: RedisServer) -> None:
    client = server.client()
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()


def _restart(server: RedisServer) -> None:
    server.kill()
    server.start()


LOSSES: dict[str, Callable[[RedisServer], None]] = {"flushall+script-flush": _flush, "restart": _restart}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer.running_server() as running:
        yield running


@pytest.mark.parametrize("loss", list(LOSSES))
def test_after_losing_its_data_the_store_reloads_scripts_and_starts_from_closed(
    server: RedisServer, loss: str
) -> None:
    """After a data loss: no store error, breakers closed, leases and slots gone, stale records harmless."""
    store = RedisStore.from_url(server.url(), prefix="loss")
    pipeline = Pipeline(store)
    try:
        for _ in range(2):  # tenant a: its breaker opens
            admitted = pipeline.admit(BREAKER, _context("a"))
            assert isinstance(admitted, Admitted)
            pipeline.record(admitted.ticket, Outcome.failure(0.0))
        assert store.status("tenant:a").breaker == "open"
        holder = pipeline.admit(BULKHEAD, _context("b"))  # tenant b: its one bulkhead slot is taken
        assert isinstance(holder, Admitted)
        busy = pipeline.admit(BULKHEAD, _context("b"))
        assert isinstance(busy, Deferred)
        assert busy.reason == "concurrency"
        first = pipeline.admit(RATE, _context("c"))  # tenant c: a slot a minute away is booked
        assert isinstance(first, Admitted)
        pipeline.record(first.ticket, Outcome.success(0.0))
        later = pipeline.admit(RATE, _context("c"))
        assert isinstance(later, Deferred)
        assert later.reservations
        store.put_dead(DeadLetter(id="gone", task_name="lossy", reason="max_attempts"))

        LOSSES[loss](server)

        assert store.status("tenant:a").breaker == "closed"
        again = pipeline.admit(BREAKER, _context("a"))
        assert isinstance(again, Admitted), again
        assert not again.ticket.fallback
        pipeline.record(holder.ticket, Outcome.failure(0.0))  # a ticket of the lost state
        status = store.status("tenant:b")
        assert (status.breaker, status.in_flight, status.calls) == ("closed", 0, 0)
        assert isinstance(pipeline.admit(BULKHEAD, _context("b")), Admitted)
        assert isinstance(pipeline.admit(RATE, _context("c")), Admitted), "a booked slot survived the loss"
        early = pipeline.admit(RATE, _context("c", dict(later.reservations)))
        assert isinstance(early, Deferred)  # the message still carries its slot: it waits for it, uncounted
        assert (early.reservations, early.deferrals) == (later.reservations, 0)
        assert store.list_dead() == []
        assert pipeline.store_errors == 0, "a data loss was handled as a store outage"
    finally:
        store.close()


def test_the_asyncio_client_reloads_its_scripts_after_a_flush(server: RedisServer) -> None:
    """``admit_async``/``record_async`` work across FLUSHALL + SCRIPT FLUSH without a store error."""
    store = RedisStore.from_url(server.url(), prefix="loss-async")
    pipeline = Pipeline(store)

    async def scenario() -> None:
        first = await pipeline.admit_async(BREAKER, _context("a"))
        assert isinstance(first, Admitted)
        await pipeline.record_async(first.ticket, Outcome.success(0.0))
        _flush(server)
        second = await pipeline.admit_async(BREAKER, _context("a"))
        assert isinstance(second, Admitted), second
        assert not second.ticket.fallback
        await pipeline.record_async(second.ticket, Outcome.success(0.0))

    try:
        asyncio.run(scenario())
        assert pipeline.store_errors == 0
        assert store.status("tenant:a").calls == 1
    finally:
        store.close()


def test_the_asyncio_client_fails_one_call_at_most_after_a_restart(server: RedisServer) -> None:
    """After a restart the asyncio client's pooled connection is dead: one call may fail, the next reconnects.

    (The sync client checks a pooled connection before using it and fails none.)
    """
    store = RedisStore.from_url(server.url(), prefix="loss-async")
    pipeline = Pipeline(store)

    async def scenario() -> list[bool]:
        first = await pipeline.admit_async(BREAKER, _context("a"))
        assert isinstance(first, Admitted)
        await pipeline.record_async(first.ticket, Outcome.success(0.0))
        _restart(server)
        admitted = []
        for _ in range(3):
            decision = await pipeline.admit_async(BREAKER, _context("a"))
            admitted.append(isinstance(decision, Admitted))
            if isinstance(decision, Admitted):
                await pipeline.record_async(decision.ticket, Outcome.success(0.0))
        return admitted

    try:
        admitted = asyncio.run(scenario())
        assert admitted[1:] == [True, True], admitted
        assert pipeline.store_errors <= 1
    finally:
        store.close()


# -- under running workers ------------------------------------------------------------------


@pytest.mark.celery
@pytest.mark.dramatiq
@pytest.mark.slow
def test_workers_ride_through_a_flush_and_a_restart_of_the_store(
    recorder: RedisServer, tmp_path: Path, record_property: RecordProperty
) -> None:
    """Workers run every job once across a flush and a restart; a forced-open breaker comes back closed."""
    with RedisServer.running_server() as broker, RedisServer.running_server() as store_server:
        chaos = Chaos(
            tmp_path, broker_url=broker.url(), store_url=store_server.url(), recorder_url=recorder.url()
        )
        store = RedisStore.from_url(store_server.url(), prefix=chaos.prefix)
        try:
            chaos.start_both()
            warm = chaos.send_many("closed", "acme", 5)
            chaos.wait_finished(warm, 30, "the jobs sent before the flush")
            store.force("tenant:tripped", "forced_open")
            tripped = chaos.send_many("closed", "tripped", 3)
            chaos.wait_until(
                lambda: {d["job"] for d in chaos.records("defers")} >= {s.job for s in tripped},
                30,
                "the forced-open breaker to defer every job of its tenant",
            )

            _flush(store_server)
            flushed = chaos.send_many("closed", "acme", 5)
            chaos.wait_finished(flushed + tripped, 30, "the jobs after the flush")
            errors_after_flush = {fw: chaos.counter(f"store_errors:{fw}:closed") for fw in FRAMEWORKS}

            _restart(store_server)
            restarted = chaos.send_many("closed", "acme", 5)
            chaos.wait_finished(restarted, 30, "the jobs after the restart")

            ledger = chaos.ledger("store FLUSHALL + SCRIPT FLUSH, then restarted empty")
            ledger.notes = {
                "store_errors_after_flush": errors_after_flush,
                "store_errors_after_restart": {
                    fw: chaos.counter(f"store_errors:{fw}:closed") for fw in FRAMEWORKS
                },
            }
            record_property("ledger", ledger.as_dict())
            assert chaos.crashes() == []
            assert (ledger.lost, ledger.duplicates, ledger.failed, ledger.dead_lettered) == (0, 0, 0, 0), (
                ledger
            )
            assert errors_after_flush == {"celery": 0, "dramatiq": 0}, "a flush was handled as an outage"
            assert len(chaos.runs(tripped)) == len(tripped)
            assert {r["fallback"] for r in chaos.runs(warm + flushed + tripped)} == {False}
        finally:
            store.close()
            chaos.close()
