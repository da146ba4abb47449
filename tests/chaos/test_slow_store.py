"""Fault 5: the store answers, but late: a loopback proxy holds back every Redis reply.

``store_timeout`` must bound each call (a reply later than that is a store error, not a
slow task), the policy's fail mode must apply (open: the per-process fallback admits;
closed: ``store_unavailable`` deferral), the local store breaker must stop the paying of
the timeout after a few calls, and once the replies are fast again the store must be
used again with no reply landing on the wrong request (a timed-out connection is dropped,
not reused). In-process on the sync and asyncio clients, then in real workers whose
``limitpal_store_timeout`` setting is what bounds the call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    Deferred,
    Hooks,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    TaskContext,
)
from limitpal_tasks.core.policy import FailMode
from limitpal_tasks.stores.redis import RedisStore

from .harness import FRAMEWORKS, Chaos, RecordProperty
from .proxy import DelayProxy
from .servers import RedisServer, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.redis]

STORE_TIMEOUT = 0.2
SLOW = 3.0
"""The injected reply delay: fifteen times the store timeout, so a call that waited for the
late reply cannot pass for one slowed down by a busy machine."""
SLACK = 1.0
"""What a busy machine may add to a call's latency."""


class _StoreErrors(Hooks):
    """Keeps the text of every store error: a guard refusal says "failing fast"."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        self.errors.append(str(error))


@pytest.fixture
def proxy() -> Iterator[DelayProxy]:
    with RedisServer.running_server() as server:
        proxy = DelayProxy(server.port)
        try:
            yield proxy
        finally:
            proxy.close()


def _policy(mode: FailMode) -> Policy:
    return Policy("slow", key="tenant:{tenant}", breaker=Breaker(minimum_calls=1000), fail_mode=mode)


def _context(tenant: str = "slow") -> TaskContext:
    return TaskContext("slow", kwargs={"tenant": tenant})


def _timed_admit(pipeline: Pipeline, policy: Policy, context: TaskContext) -> tuple[float, object]:
    start = time.perf_counter()
    decision = pipeline.admit(policy, context)
    elapsed = time.perf_counter() - start
    if isinstance(decision, Admitted):
        pipeline.record(decision.ticket, Outcome.success(0.0))
    return elapsed, decision


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_store_timeout_bounds_each_call_and_the_fail_mode_applies(
    proxy: DelayProxy, mode: FailMode, record_property: RecordProperty
) -> None:
    """Replies 3 s late with store_timeout=0.2: a call gives up after ~0.2 s, then the guard fails fast."""
    policy = _policy(mode)
    store = RedisStore.from_url(proxy.url(), prefix="slow", store_timeout=STORE_TIMEOUT)
    hooks = _StoreErrors()
    pipeline = Pipeline(store, hooks=[hooks])
    try:
        _, decision = _timed_admit(pipeline, policy, _context())
        assert isinstance(decision, Admitted)
        assert not decision.ticket.fallback

        proxy.delay = SLOW
        calls = [_timed_admit(pipeline, policy, _context()) for _ in range(40)]

        latencies = [elapsed for elapsed, _ in calls]
        reached = [e for e in hooks.errors if "failing fast" not in e]  # the calls that went to Redis
        record_property(
            "latency",
            {
                "fault": f"replies {SLOW:g}s late",
                "mode": mode,
                "reached_redis": len(reached),
                "max_ms": round(1000 * max(latencies), 1),
            },
        )
        first = latencies[0]
        assert STORE_TIMEOUT * 0.75 <= first <= STORE_TIMEOUT + SLACK, (
            "the first call did not wait store_timeout"
        )
        assert max(latencies) <= STORE_TIMEOUT + SLACK, "a call waited for the late reply"
        assert all("imeout" in e for e in reached), reached
        assert 1 <= len(reached) <= 3 + 2, "the guard did not start failing fast"
        for _, decision in calls:
            if mode == "open":
                assert isinstance(decision, Admitted)
                assert decision.ticket.fallback
            else:
                assert isinstance(decision, Deferred)
                assert decision.reason == "store_unavailable"
    finally:
        proxy.delay = 0.0
        store.close()


def test_fast_replies_again_bring_the_store_back_with_no_reply_out_of_step(proxy: DelayProxy) -> None:
    """After the slow spell, decisions come from Redis again, each reply matching its request."""
    policy = _policy("open")
    limited = Policy("slow-rate", key="tenant:{tenant}", rate=RateLimit("1/m"), fail_mode="closed")
    store = RedisStore.from_url(proxy.url(), prefix="slow", store_timeout=STORE_TIMEOUT)
    pipeline = Pipeline(store)
    try:
        proxy.delay = SLOW
        for _ in range(5):
            _timed_admit(pipeline, policy, _context())
        proxy.delay = 0.0
        errors = pipeline.store_errors

        def shared() -> bool:
            _, decision = _timed_admit(pipeline, policy, _context())
            assert isinstance(decision, Admitted)
            return not decision.ticket.fallback

        wait_for(shared, 12.0, "an admit on the shared store once replies are fast again", interval=0.05)
        errors = pipeline.store_errors
        # Replies of the abandoned requests must not answer these ones.
        first = pipeline.admit(limited, _context("fresh"))
        second = pipeline.admit(limited, _context("fresh"))
        assert isinstance(first, Admitted)
        assert isinstance(second, Deferred)
        assert second.reason == "rate_limited"
        assert 55 < second.delay <= 60
        status = store.status("tenant:fresh")
        assert (status.breaker, status.in_flight) == ("closed", 1)
        assert pipeline.store_errors == errors
    finally:
        store.close()


def test_the_asyncio_client_honours_store_timeout_too(proxy: DelayProxy) -> None:
    """``admit_async`` gives up after store_timeout and the fail mode applies, as the sync path does."""
    store = RedisStore.from_url(proxy.url(), prefix="slow-async", store_timeout=STORE_TIMEOUT)
    pipeline = Pipeline(store)

    async def scenario() -> list[tuple[float, object]]:
        warm = await pipeline.admit_async(_policy("closed"), _context())
        assert isinstance(warm, Admitted)
        await pipeline.record_async(warm.ticket, Outcome.success(0.0))
        proxy.delay = SLOW
        out: list[tuple[float, object]] = []
        for _ in range(10):
            start = time.perf_counter()
            decision = await pipeline.admit_async(_policy("closed"), _context())
            out.append((time.perf_counter() - start, decision))
        return out

    try:
        calls = asyncio.run(scenario())
    finally:
        proxy.delay = 0.0
        store.close()
    assert max(elapsed for elapsed, _ in calls) <= STORE_TIMEOUT + SLACK
    assert all(isinstance(d, Deferred) and d.reason == "store_unavailable" for _, d in calls)


def test_a_reply_slower_than_usual_but_within_store_timeout_is_no_error(proxy: DelayProxy) -> None:
    """Replies 50 ms late with store_timeout=0.2 are just slow: every decision comes from Redis."""
    store = RedisStore.from_url(proxy.url(), prefix="slow", store_timeout=STORE_TIMEOUT)
    pipeline = Pipeline(store)
    try:
        proxy.delay = 0.05
        calls = [_timed_admit(pipeline, _policy("closed"), _context()) for _ in range(5)]
    finally:
        proxy.delay = 0.0
        store.close()
    assert all(isinstance(d, Admitted) and not d.ticket.fallback for _, d in calls)
    assert pipeline.store_errors == 0


# -- in real workers --------------------------------------------------------------------------


@pytest.mark.celery
@pytest.mark.dramatiq
@pytest.mark.slow
def test_workers_honour_their_store_timeout_setting_behind_a_slow_store(
    recorder: RedisServer, tmp_path: Path, record_property: RecordProperty
) -> None:
    """Workers with a 0.2 s store timeout behind 3 s replies: fail-open runs, fail-closed waits, none lost."""
    with RedisServer.running_server() as broker, RedisServer.running_server() as store:
        proxy = DelayProxy(store.port)
        chaos = Chaos(tmp_path, broker_url=broker.url(), store_url=proxy.url(), recorder_url=recorder.url())
        try:
            chaos.start_both(env={"LPC_STORE_TIMEOUT": str(STORE_TIMEOUT)})
            warm = chaos.send_many("open", "warm", 2)
            chaos.wait_finished(warm, 30, "the jobs sent while the store is fast")
            proxy.delay = SLOW
            slow_since = time.time()
            slow_open = chaos.send_many("open", "acme", 5)
            slow_closed = chaos.send_many("closed", "acme", 5)
            chaos.wait_finished(slow_open, 30, "the fail-open jobs behind the slow store")
            chaos.wait_until(
                lambda: (
                    {d["job"] for d in chaos.records("defers") if d["reason"] == "store_unavailable"}
                    >= {s.job for s in slow_closed}
                ),
                30,
                "every fail-closed job to be deferred",
            )
            proxy.delay = 0.0
            fast_since = time.time()
            chaos.wait_finished(slow_closed, 45, "the fail-closed jobs once the store is fast again")

            calls = [c for c in chaos.records("store_calls") if slow_since <= c["t"] <= fast_since]
            errors = [e["error"] for e in chaos.records("store_errors") if slow_since <= e["t"] <= fast_since]
            ledger = chaos.ledger(f"store replies {SLOW:g}s late, store_timeout {STORE_TIMEOUT:g}s")
            ledger.notes = {
                "store_calls_while_slow": len(calls),
                "max_call_ms": round(1000 * max(c["seconds"] for c in calls), 1),
                "timed_out": sum(1 for e in errors if "imeout" in e),
                "failing_fast": sum(1 for e in errors if "failing fast" in e),
            }
            record_property("ledger", ledger.as_dict())
            open_runs = chaos.runs(slow_open)
            closed_runs = chaos.runs(slow_closed)
            crashes = chaos.crashes()
        finally:
            chaos.close()
            proxy.close()

    assert crashes == []
    assert (ledger.lost, ledger.duplicates, ledger.failed, ledger.dead_lettered) == (0, 0, 0, 0), ledger
    assert {r["fallback"] for r in open_runs} == {True}
    assert {r["fw"] for r in open_runs} == set(FRAMEWORKS)
    assert min(r["t"] for r in closed_runs) >= fast_since
    assert calls, "no store call was timed while the store was slow"
    assert max(c["seconds"] for c in calls) <= STORE_TIMEOUT + SLACK, "a worker waited for a late reply"
    assert not any(c["ok"] for c in calls if c["seconds"] >= STORE_TIMEOUT * 0.75)
    assert ledger.notes["failing_fast"] > 0, "the workers' store breakers never opened"
