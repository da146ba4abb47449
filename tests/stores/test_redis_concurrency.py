"""Fleet-wide limits hold when 8 processes × 4 threads race on one Redis.

Each worker process (``spawn``) builds its own RedisStore without a clock, so every
script reads the server's ``TIME``; every admission and record reports that time
(``ticket.admitted_at``, ``RecordResult.now``). Because scripts run one at a time on the
server, those timestamps order the events exactly, and the limits are checked on them.
Workers run for a fixed time, report their events through a queue and exit by themselves.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import queue
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    Bulkhead,
    DeferPolicy,
    Deferred,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    TaskContext,
)
from limitpal_tasks.stores.redis import RedisStore

from .redis_support import ServerCheck, fresh_db, max_overlap

pytestmark = [pytest.mark.redis, pytest.mark.slow]

DB = 11
PROCESSES = 8
THREADS = 4
RUN_FOR = 2.0  # seconds each worker keeps going once all have started
BOUND = 15.0  # no test may take longer than this, process start-up included

PROBES = Policy(
    "probes",
    key="service:x",
    # One failure opens it for 0.1 s; three successful probes close it: it cycles all the time.
    breaker=Breaker(
        minimum_calls=1,
        failure_rate_threshold=100,
        window=1,
        open_for=0.1,
        multiplier=1,
        half_open_probes=3,
        busy_delay=0.01,
    ),
    lease=30,
)
POOL = Policy("pool", key="pool", bulkhead=Bulkhead(5, retry_delay=0.01), lease=30)
NO_JITTER = DeferPolicy(jitter=0.0, max_deferrals=100_000)
# reserve_ahead=0: a deferral books nothing, so every admission takes a fresh token.
FRESH = Policy("fresh", key="api", rate=RateLimit("200/s", burst=10, reserve_ahead=0), defer=NO_JITTER)
BOOKED = Policy("booked", key="api", rate=RateLimit("200/s", burst=10), defer=NO_JITTER)

Event = tuple[str, float, float, int]  # kind, start, end, breaker generation


@dataclass(frozen=True)
class Job:
    """What one worker process does."""

    scenario: str
    url: str
    seed: int


def _work(seconds: float) -> None:
    """The task's own work: a few milliseconds during which it holds what it was admitted with."""
    time.sleep(seconds)


def _probe_thread(store: RedisStore, rng: random.Random, deadline: float) -> list[Event]:
    pipeline = Pipeline(store, rng=rng)
    events: list[Event] = []
    while time.monotonic() < deadline:
        decision = pipeline.admit(PROBES, TaskContext("task"))
        if isinstance(decision, Deferred):
            events.append((f"deferred:{decision.reason}", 0.0, 0.0, 0))
            continue
        ticket = decision.ticket
        _work(rng.uniform(0, 0.003))
        fail = rng.random() < (0.3 if ticket.probe else 0.05)
        result = store.record(ticket, Outcome.failure() if fail else Outcome.success(), None, rng.random())
        kind = "probe" if ticket.probe else "closed"
        events.append((kind, ticket.admitted_at, result.now, ticket.generations[0]))
    return events


def _pool_thread(store: RedisStore, rng: random.Random, deadline: float) -> list[Event]:
    pipeline = Pipeline(store, rng=rng)
    events: list[Event] = []
    while time.monotonic() < deadline:
        decision = pipeline.admit(POOL, TaskContext("task"))
        if isinstance(decision, Deferred):
            events.append((f"deferred:{decision.reason}", 0.0, 0.0, 0))
            continue
        _work(rng.uniform(0, 0.003))
        result = store.record(decision.ticket, Outcome.success(), None, rng.random())
        events.append(("run", decision.ticket.admitted_at, result.now, 0))
    return events


def _rate_thread(store: RedisStore, rng: random.Random, deadline: float, policy: Policy) -> list[Event]:
    """Admit until the deadline; a deferral is waited out like a broker countdown, carrying its slot."""
    pipeline = Pipeline(store, rng=rng)
    events: list[Event] = []
    carried: dict[str, float] = {}
    deferrals = 0
    while time.monotonic() < deadline:
        context = TaskContext("task", deferrals=deferrals, reservations=carried)
        decision = pipeline.admit(policy, context)
        if isinstance(decision, Admitted):
            slot = next(iter(carried.values()), 0.0)
            events.append(("fresh" if not slot else "booked", decision.ticket.admitted_at, slot, 0))
            pipeline.record(decision.ticket, Outcome.success())
            carried, deferrals = {}, 0
            continue
        events.append((f"deferred:{decision.reason}", 0.0, 0.0, 0))
        carried, deferrals = dict(decision.reservations), decision.deferrals
        time.sleep(decision.delay)  # the countdown the message is requeued with
    return events


def _thread_body(job: Job, store: RedisStore, k: int, deadline: float) -> list[Event]:
    rng = random.Random(job.seed * 100 + k)
    if job.scenario == "probes":
        return _probe_thread(store, rng, deadline)
    if job.scenario == "pool":
        return _pool_thread(store, rng, deadline)
    return _rate_thread(store, rng, deadline, FRESH if job.scenario == "fresh" else BOOKED)


def _worker(job: Job, start: Barrier, results: multiprocessing.queues.Queue[list[Event]]) -> None:
    """One process: wait for all, run ``THREADS`` threads for ``RUN_FOR`` seconds, report, exit."""
    store = RedisStore.from_url(job.url, prefix="conc", store_timeout=2.0)
    events: list[Event] = []
    try:
        start.wait(timeout=BOUND)
        deadline = time.monotonic() + RUN_FOR
        outputs: list[list[Event]] = [[] for _ in range(THREADS)]

        def run(k: int) -> None:
            try:
                outputs[k] = _thread_body(job, store, k, deadline)
            except Exception as exc:  # reported to the test, which fails on it
                outputs[k] = [(f"error: {exc!r}", 0.0, 0.0, 0)]

        threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND)
        events = [event for output in outputs for event in output]
    finally:
        store.close()
        results.put(events)


def run_fleet(url: str, scenario: str) -> list[Event]:
    """Run ``PROCESSES`` workers on ``scenario``; every event they saw, once all have exited."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results: multiprocessing.queues.Queue[list[Event]] = context.Queue()
    processes = [
        context.Process(target=_worker, args=(Job(scenario, url, seed), start, results), daemon=True)
        for seed in range(PROCESSES)
    ]
    began = time.monotonic()
    for process in processes:
        process.start()
    events: list[Event] = []
    try:
        for _ in processes:
            events += results.get(timeout=max(0.1, began + BOUND - time.monotonic()))
    except queue.Empty:
        pytest.fail(f"the workers did not all report within {BOUND:g}s")
    finally:
        for process in processes:
            process.join(max(0.1, began + BOUND - time.monotonic()))
        hung = [process for process in processes if process.is_alive()]
        for process in hung:
            process.terminate()  # only our own workers, by their handle
    assert not hung, f"{len(hung)} worker processes did not exit by themselves"
    errors = [kind for kind, *_ in events if kind.startswith("error")]
    assert not errors, errors[:3]
    return events


def reasons(events: list[Event]) -> Counter[str]:
    return Counter(kind for kind, *_ in events)


@pytest.fixture
def url(require_server: ServerCheck) -> str:
    """Database 11 of the shared server, emptied."""
    return fresh_db(require_server, DB)


def test_half_open_breaker_never_runs_more_than_its_probes_at_once(url: str) -> None:
    """Across the fleet, at most ``half_open_probes`` probes of one half-open period are in flight at once."""
    setup = RedisStore.from_url(url, prefix="conc")
    pipeline = Pipeline(setup)
    first = pipeline.admit(PROBES, TaskContext("task"))
    assert isinstance(first, Admitted)
    pipeline.record(first.ticket, Outcome.failure())  # open for 0.1 s (server time); workers start later
    assert setup.status("service:x").breaker in ("open", "half_open")
    setup.close()

    events = run_fleet(url, "probes")

    by_generation: defaultdict[int, list[tuple[float, float]]] = defaultdict(list)
    for kind, start, end, generation in events:
        if kind == "probe":
            by_generation[generation].append((start, end))
    peaks = {generation: max_overlap(spans) for generation, spans in by_generation.items()}
    assert len(peaks) >= 3, f"too few half-open periods to mean anything: {reasons(events)}"
    assert max(peaks.values()) <= 3, peaks


def test_bulkhead_never_runs_more_than_max_concurrent(url: str) -> None:
    """Across the fleet, at most ``max_concurrent`` executions of a bulkhead are in flight at once."""
    events = run_fleet(url, "pool")

    spans = [(start, end) for kind, start, end, _ in events if kind == "run"]
    assert reasons(events)["deferred:concurrency"] > 0, reasons(events)
    assert 1 <= max_overlap(spans) <= 5


def window_excess(times: list[float], rate: float, burst: int) -> list[tuple[float, float, int]]:
    """Every window [times[i], times[j]] holding more than ``rate`` × its length + ``burst`` events."""
    times = sorted(times)
    excess = []
    for i, start in enumerate(times):
        for j in range(i + burst, len(times)):  # fewer than burst + 1 events always fit
            if j - i + 1 > rate * (times[j] - start) + burst + 1e-6:
                excess.append((start, times[j], j - i + 1))
    return excess


def test_rate_limit_never_admits_more_than_rate_times_window_plus_burst(url: str) -> None:
    """Across the fleet, no window of length T holds more than 200 × T + 10 admissions (by admission time)."""
    events = run_fleet(url, "fresh")

    admitted_at = [start for kind, start, _, _ in events if kind == "fresh"]
    assert len(admitted_at) >= 200, reasons(events)
    assert window_excess(admitted_at, 200.0, 10) == []


def test_booked_slots_and_fresh_tokens_never_exceed_the_rate(url: str) -> None:
    """With reservations honoured, the slots used (booked or fresh) stay within 200 × T + 10 per window."""
    events = run_fleet(url, "booked")

    used = [
        slot if kind == "booked" else start for kind, start, slot, _ in events if kind in ("fresh", "booked")
    ]
    assert reasons(events)["booked"] >= 100, reasons(events)
    assert window_excess(used, 200.0, 10) == []
