"""Fault 1: the store's ``redis-server`` is killed for 10 s while Celery and Dramatiq workers run.

One scenario (a module fixture) drives both frameworks and both fail modes at once: jobs
flow before the outage, during it and after the server is restarted (empty) on the same
port. The tests then read what the workers recorded. ``fail_mode="open"`` must run every
job once, on the per-process fallback while Redis is gone, and go back to the shared
store after; ``fail_mode="closed"`` must defer every job it cannot admit and run them all
after the recovery. No worker may crash, no job may be lost or run twice. The in-process
tests at the end measure what an outage costs one ``admit``: the local store breaker
must keep it from paying ``store_timeout`` per task.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from limitpal_tasks import Admitted, Breaker, Deferred, Hooks, Outcome, Pipeline, Policy, TaskContext
from limitpal_tasks.core.policy import FailMode
from limitpal_tasks.stores.redis import RedisStore

from .chaos_common import POLICIES
from .harness import FRAMEWORKS, Chaos, LogLines, RecordProperty, Sent, quiet
from .servers import RedisServer, wait_for

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.redis,
    pytest.mark.celery,
    pytest.mark.dramatiq,
    pytest.mark.slow,
]

OUTAGE = 10.0
"""How long the store's server stays down (the fault, not a wait for a race)."""
STORE_TIMEOUT = 0.25
RECOVERY_TIMEOUT = 30.0
"""The guard's pause grows to at most 10 s, so workers must be back on Redis well within this."""


@dataclass
class Outage:
    """What the scenario did and when (``time.time()``, the clock the records use)."""

    chaos: Chaos
    killed_at: float
    restarted_at: float
    before: list[Sent] = field(default_factory=list)
    during: list[Sent] = field(default_factory=list)
    after: list[Sent] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    store_calls: int = 0

    def jobs(self, kind: str, phase: list[Sent], framework: str | None = None) -> list[Sent]:
        return [s for s in phase if s.kind == kind and framework in (None, s.framework)]


def _until(moment: float) -> None:
    """Wait for a point of the fault's timeline (a scheduled step, not a guess at a race)."""
    wait_for(lambda: time.monotonic() >= moment, moment - time.monotonic() + 5, "the fault timeline")


@pytest.fixture(scope="module")
def outage(recorder: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """Run the scenario once for the module: jobs before, during and after a 10 s store outage."""
    logs: Path = tmp_path_factory.mktemp("store-outage")
    with RedisServer.running_server() as broker, RedisServer.running_server() as store:
        chaos = Chaos(logs, broker_url=broker.url(), store_url=store.url(), recorder_url=recorder.url())
        try:
            chaos.start_both(env={"LPC_STORE_TIMEOUT": str(STORE_TIMEOUT)})
            before = [s for kind in ("open", "closed") for s in chaos.send_many(kind, "acme", 5)]
            chaos.wait_finished(before, 30, "the jobs sent before the outage")

            store.kill()
            killed_at, killed_mono = time.time(), time.monotonic()
            during = [s for kind in ("open", "closed") for s in chaos.send_many(kind, "acme", 10)]
            _until(killed_mono + OUTAGE / 2)
            during += [s for kind in ("open", "closed") for s in chaos.send_many(kind, "acme", 5)]
            open_during = [s for s in during if s.kind == "open"]
            wait_for(
                lambda: (
                    len(chaos.finished(open_during)) == len(open_during)
                    or time.monotonic() >= killed_mono + OUTAGE
                ),
                OUTAGE + 5,
                "the fail-open jobs to run while the store is down",
            )
            _until(killed_mono + OUTAGE)
            store.start()
            restarted_at = time.time()

            # Keep work flowing (a job per framework every half second) until each framework
            # has run a fail-open job on the shared store again.
            after: list[Sent] = []
            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while True:
                batch = chaos.send_many("open", "acme", 1)
                after += batch
                chaos.wait_finished(batch, 20, "a fail-open job sent after the restart")
                shared = {r["fw"] for r in chaos.runs(after) if r["fallback"] is False}
                if shared == set(FRAMEWORKS):
                    break
                if time.monotonic() > deadline:
                    output = chaos.worker_logs()
                    pytest.fail(f"still on the fallback {RECOVERY_TIMEOUT:g}s after the restart\n{output}")
                _until(time.monotonic() + 0.5)
            after += [s for kind in ("open", "closed") for s in chaos.send_many(kind, "acme", 5)]
            everything = before + during + after
            chaos.wait_finished(everything, RECOVERY_TIMEOUT, "every job to run after the recovery")
            status = RedisStore.from_url(store.url(), prefix=chaos.prefix)
            try:
                store_calls = status.status("tenant:acme").calls
            finally:
                status.close()
            yield Outage(chaos, killed_at, restarted_at, before, during, after, chaos.crashes(), store_calls)
        finally:
            chaos.close()


def test_fail_open_runs_every_job_once_on_the_fallback_while_redis_is_down(outage: Outage) -> None:
    """With fail_mode="open", each job sent during the outage runs once, on the per-process fallback."""
    jobs = outage.jobs("open", outage.during)

    runs = outage.chaos.runs(jobs)

    assert sorted(r["job"] for r in runs) == sorted(s.job for s in jobs)
    during = [r for r in runs if r["t"] < outage.restarted_at]
    assert during, "no fail-open job ran while the store was down"
    assert {r["fallback"] for r in during} == {True}, "a job admitted by a dead store"
    assert {r["fw"] for r in during} == set(FRAMEWORKS)
    unavailable = [
        d
        for d in outage.chaos.records("defers")
        if d["kind"] == "open" and d["reason"] == "store_unavailable"
    ]
    assert not unavailable, f"fail-open deferred {len(unavailable)} times for the outage: {unavailable[:3]}"


def test_fail_open_returns_to_the_shared_store_after_redis_comes_back(outage: Outage) -> None:
    """After the restart, fail-open jobs are admitted by Redis again, and their outcomes land in it."""
    runs = outage.chaos.runs(outage.jobs("open", outage.after))

    for framework in FRAMEWORKS:
        flags = [r["fallback"] for r in runs if r["fw"] == framework]
        assert False in flags, f"{framework} never went back to the shared store"
        first_shared = flags.index(False)
        assert True not in flags[first_shared:], f"{framework} fell back again after recovering: {flags}"
    assert outage.store_calls > 0, "no outcome reached the restarted store's breaker window"


def test_fail_closed_defers_during_the_outage_and_runs_every_job_after_it(outage: Outage) -> None:
    """With fail_mode="closed", nothing runs while the store is down; every deferred job runs once after."""
    jobs = outage.jobs("closed", outage.during)

    runs = outage.chaos.runs(jobs)

    assert sorted(r["job"] for r in runs) == sorted(s.job for s in jobs)
    assert min(r["t"] for r in runs) >= outage.restarted_at, "a fail-closed job ran while the store was down"
    assert {r["fallback"] for r in runs} == {False}
    deferred = {d["job"] for d in outage.chaos.records("defers") if d["reason"] == "store_unavailable"}
    assert {s.job for s in jobs} <= deferred, "a fail-closed job was not deferred as store_unavailable"


def test_no_worker_crashed_and_no_job_was_lost_or_run_twice(
    outage: Outage, record_property: RecordProperty
) -> None:
    """Across the outage every worker survives, and each job of either fail mode ran exactly once."""
    chaos = outage.chaos
    ledgers = []
    for mode in ("open", "closed"):
        for framework in FRAMEWORKS:
            jobs = [s for s in chaos.sent if s.kind == mode and s.framework == framework]
            ledger = chaos.ledger(f"store killed {OUTAGE:g}s, fail_mode={mode}, {framework}", jobs)
            ledger.notes = {
                "during": len(outage.jobs(mode, outage.during, framework)),
                "on_fallback": sum(1 for r in chaos.runs(jobs) if r["fallback"]),
                "store_errors": chaos.counter(f"store_errors:{framework}:{mode}"),
            }
            record_property("ledger", ledger.as_dict())
            ledgers.append(ledger)

    assert outage.crashes == []
    for ledger in ledgers:
        assert (ledger.lost, ledger.duplicates, ledger.dead_lettered, ledger.failed) == (0, 0, 0, 0), ledger
        assert ledger.ran == ledger.enqueued


def test_workers_pay_no_store_timeout_per_task_while_redis_is_down(
    outage: Outage, record_property: RecordProperty
) -> None:
    """No store call a worker made during the outage waited for a timeout: each failed at once."""
    window = (outage.killed_at, outage.restarted_at)
    calls = [c for c in outage.chaos.records("store_calls") if window[0] <= c["t"] < window[1]]
    errors = [e["error"] for e in outage.chaos.records("store_errors") if window[0] <= e["t"] < window[1]]
    latencies = sorted(c["seconds"] for c in calls)
    record_property(
        "latency",
        {
            "fault": "store killed, in the workers",
            "calls": len(calls),
            "failing_fast": sum(1 for e in errors if "failing fast" in e),
            "refused": sum(1 for e in errors if "failing fast" not in e),
            "median_ms": round(1000 * latencies[len(latencies) // 2], 3),
            "max_ms": round(1000 * latencies[-1], 1),
        },
    )

    assert {c["fw"] for c in calls} == set(FRAMEWORKS)
    assert not any(c["ok"] for c in calls)
    assert errors
    assert not [e for e in errors if "imeout" in e], "a worker waited for a store timeout"
    assert latencies[len(latencies) // 2] < 0.05


# -- one admit during an outage, in-process -----------------------------------------------


class _StoreErrors(Hooks):
    """Keeps the text of every store error: a guard refusal says "failing fast"."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        self.errors.append(str(error))


def _admit_latencies(pipeline: Pipeline, policy: Policy, seconds: float) -> list[tuple[float, Any]]:
    """Admit (and record) as fast as possible for ``seconds``: each call's latency and decision."""
    out: list[tuple[float, Any]] = []
    end = time.monotonic() + seconds
    context = TaskContext("probe", kwargs={"tenant": "latency"})
    while time.monotonic() < end:
        start = time.perf_counter()
        decision = pipeline.admit(policy, context)
        out.append((time.perf_counter() - start, decision))
        if isinstance(decision, Admitted):
            pipeline.record(decision.ticket, Outcome.success(0.0))
    return out


@pytest.mark.parametrize("fault", ["killed", "frozen"])
@pytest.mark.parametrize("mode", ["open", "closed"])
def test_an_outage_costs_an_admit_one_store_timeout_only_now_and_then(
    fault: str, mode: FailMode, record_property: RecordProperty
) -> None:
    """During an outage the local store breaker fails fast: only its probes reach (and wait for) Redis."""
    policy = Policy("latency", key="tenant:{tenant}", breaker=Breaker(minimum_calls=1000), fail_mode=mode)
    hooks = _StoreErrors()
    with RedisServer.running_server() as server:
        store = RedisStore.from_url(server.url(), prefix="latency", store_timeout=STORE_TIMEOUT)
        pipeline = Pipeline(store, hooks=[hooks])
        try:
            assert isinstance(
                pipeline.admit(policy, TaskContext("probe", kwargs={"tenant": "latency"})), Admitted
            )
            if fault == "killed":
                server.kill()
            else:
                server.freeze()

            with quiet("limitpal_tasks", logging.ERROR):  # a warning per admit (see the test below)
                calls = _admit_latencies(pipeline, policy, 3.0)

            latencies = [seconds for seconds, _ in calls]
            reached = [e for e in hooks.errors if "failing fast" not in e]  # the calls that went to Redis
            waited = sorted(latencies, reverse=True)[: len(reached)]
            record_property(
                "latency",
                {
                    "fault": fault,
                    "mode": mode,
                    "calls": len(calls),
                    "reached_redis": len(reached),
                    "median_ms": round(1000 * statistics.median(latencies), 3),
                    "max_ms": round(1000 * max(latencies), 1),
                },
            )
            # Three failures trip the guard; then one probe per pause (0.5 s, 1 s, 2 s, ...).
            assert len(reached) <= 3 + 3, f"{len(reached)} of {len(calls)} admits went to the dead store"
            assert len(hooks.errors) == len(calls)
            assert statistics.median(latencies) < 0.01
            if fault == "frozen":  # each call that reached Redis waited store_timeout, and no more
                assert all("imeout" in e for e in reached), reached
                assert all(STORE_TIMEOUT * 0.8 <= s <= STORE_TIMEOUT + 1.0 for s in waited), waited
            decisions = [d for _, d in calls]
            if mode == "open":
                assert all(isinstance(d, Admitted) and d.ticket.fallback for d in decisions)
            else:
                assert all(isinstance(d, Deferred) and d.reason == "store_unavailable" for d in decisions)
        finally:
            if fault == "frozen":
                server.thaw()
            store.close()


def test_an_outage_writes_a_bounded_number_of_log_lines() -> None:
    """A thousand admits against a dead store log a handful of lines, not one per task."""
    policy = Policy("noisy", key="tenant:{tenant}", breaker=Breaker(minimum_calls=1000), fail_mode="open")
    with RedisServer.running_server() as server:
        store = RedisStore.from_url(server.url(), prefix="noisy", store_timeout=STORE_TIMEOUT)
        pipeline = Pipeline(store)
        server.kill()
        try:
            with LogLines("limitpal_tasks") as log:
                for _ in range(1000):
                    decision = pipeline.admit(policy, TaskContext("noisy", kwargs={"tenant": "t"}))
                    assert isinstance(decision, Admitted)
                    pipeline.record(decision.ticket, Outcome.success(0.0))
        finally:
            store.close()

    lines = log.records
    assert len(lines) <= 20, f"{len(lines)} log lines for 1000 admits, e.g. {lines[-1].getMessage()!r}"


def test_admits_go_back_to_redis_once_it_answers_again() -> None:
    """After a frozen store thaws, the guard's next probe succeeds and admits are shared again."""
    policy = Policy.from_dict(POLICIES["open"], name="open")
    context = TaskContext("probe", kwargs={"tenant": "thaw"})
    with RedisServer.running_server() as server:
        store = RedisStore.from_url(server.url(), prefix="thaw", store_timeout=STORE_TIMEOUT)
        pipeline = Pipeline(store)
        try:
            server.freeze()
            with quiet("limitpal_tasks", logging.ERROR):
                _admit_latencies(pipeline, policy, 1.5)
            server.thaw()

            def shared() -> bool:
                decision = pipeline.admit(policy, context)
                assert isinstance(decision, Admitted)
                pipeline.record(decision.ticket, Outcome.success(0.0))
                return not decision.ticket.fallback

            wait_for(shared, 12.0, "an admit on the shared store", interval=0.05)
            assert store.status("tenant:thaw").calls >= 1
        finally:
            store.close()
