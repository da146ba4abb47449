"""Hosts whose clocks disagree by minutes still share one breaker and one rate limit.

Two worker processes (``spawn``) patch ``time.time`` and ``time.monotonic`` to run 300 s
fast and 300 s slow. Their stores have no clock, so every script reads the Redis
server's ``TIME``: what one process writes, the other reads on the same timeline. Had
either used its own clock, the breaker would look expired, or ten minutes away, to the
other, and the rate limit would hand out a second burst.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import queue
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier, Event

import pytest
import redis

from limitpal_tasks import (
    Admitted,
    Breaker,
    DeferPolicy,
    Deferred,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    TaskContext,
)
from limitpal_tasks.stores.redis import RedisStore

from .redis_support import ServerCheck, fresh_db

pytestmark = pytest.mark.redis

DB = 12
SKEW = 300.0
BOUND = 15.0  # seconds the whole exchange may take, process start-up included
OPEN_FOR = 30.0

BREAKER = Policy(
    "skew-breaker",
    key="service:x",
    breaker=Breaker(minimum_calls=1, open_for=OPEN_FOR),
    defer=DeferPolicy(jitter=0.0, open_spread=0.0),
)
RATE = Policy("skew-rate", key="api", rate=RateLimit("5/s", burst=5), defer=DeferPolicy(jitter=0.0))
ATTEMPTS = 5  # admissions each process tries at once


@dataclass
class Report:
    """What one process saw."""

    role: str
    local_minus_server: float = 0.0
    breaker: tuple[str, float] = ("", 0.0)  # (reason or "admitted", delay)
    admitted_at: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    error: str = ""


def _skew_clocks(offset: float) -> None:
    """Make this process's wall and monotonic clocks run ``offset`` seconds off."""
    real_time, real_monotonic = time.time, time.monotonic
    time.time = lambda: real_time() + offset
    time.monotonic = lambda: real_monotonic() + offset


def _worker(
    role: str,
    url: str,
    opened: Event,
    together: Barrier,
    reports: multiprocessing.queues.Queue[Report],
) -> None:
    """Process A (+300 s) opens the breaker; B (−300 s) meets it; then both take from one rate limit."""
    _skew_clocks(SKEW if role == "A" else -SKEW)
    report = Report(role)
    store = RedisStore.from_url(url, prefix="skew", store_timeout=2.0)
    try:
        seconds, micros = redis.Redis.from_url(url).time()
        report.local_minus_server = time.time() - (seconds + micros / 1_000_000)
        pipeline = Pipeline(store)
        if role == "A":
            decision = pipeline.admit(BREAKER, TaskContext("task"))
            assert isinstance(decision, Admitted)
            pipeline.record(decision.ticket, Outcome.failure())
            opened.set()
        else:
            opened.wait(BOUND)
            met = pipeline.admit(BREAKER, TaskContext("task"))
            report.breaker = (met.reason, met.delay) if isinstance(met, Deferred) else ("admitted", 0.0)
        together.wait(BOUND)
        for _ in range(ATTEMPTS):
            decision = pipeline.admit(RATE, TaskContext("task"))
            if isinstance(decision, Admitted):
                report.admitted_at.append(decision.ticket.admitted_at)
            else:
                report.delays.append(decision.delay)
    except Exception as exc:  # reported to the test, which fails on it
        report.error = repr(exc)
    finally:
        store.close()
        reports.put(report)


@pytest.fixture
def reports(require_server: ServerCheck) -> dict[str, Report]:
    """Run processes A and B against database 12 and return what each saw."""
    url = fresh_db(require_server, DB)
    context = multiprocessing.get_context("spawn")
    opened, together = context.Event(), context.Barrier(2)
    results: multiprocessing.queues.Queue[Report] = context.Queue()
    processes = [
        context.Process(target=_worker, args=(role, url, opened, together, results), daemon=True)
        for role in ("A", "B")
    ]
    began = time.monotonic()
    for process in processes:
        process.start()
    seen: dict[str, Report] = {}
    try:
        for _ in processes:
            report = results.get(timeout=max(0.1, began + BOUND - time.monotonic()))
            seen[report.role] = report
    except queue.Empty:
        pytest.fail(f"the two processes did not both report within {BOUND:g}s")
    finally:
        for process in processes:
            process.join(max(0.1, began + BOUND - time.monotonic()))
            if process.is_alive():
                process.terminate()  # our own worker, by its handle
    errors = {report.role: report.error for report in seen.values() if report.error}
    assert not errors, errors
    return seen


def test_processes_clocks_really_disagree(reports: dict[str, Report]) -> None:
    """The two processes' clocks run about 300 s fast and 300 s slow against the server's."""
    assert reports["A"].local_minus_server == pytest.approx(SKEW, abs=5)
    assert reports["B"].local_minus_server == pytest.approx(-SKEW, abs=5)


def test_breaker_opened_by_one_process_defers_the_other(reports: dict[str, Report]) -> None:
    """B, ten minutes behind A, is deferred by A's open breaker for the break's length, not minutes more."""
    reason, delay = reports["B"].breaker

    assert reason == "breaker_open"
    assert OPEN_FOR - 5 < delay <= OPEN_FOR


def test_rate_limit_gives_one_burst_across_skewed_processes(reports: dict[str, Report]) -> None:
    """Both processes together get at most one burst (5) in the first instant, and short deferrals."""
    admitted = sorted(reports["A"].admitted_at + reports["B"].admitted_at)
    delays = reports["A"].delays + reports["B"].delays
    first_instant = [t for t in admitted if t < admitted[0] + 0.2]  # before a sixth token (1/5 s)

    assert len(first_instant) <= 5
    assert len(admitted) >= 5
    assert all(delay < 2.0 for delay in delays), delays
