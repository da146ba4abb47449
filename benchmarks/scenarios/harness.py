"""Runs one scenario variant (or several side by side) on real workers and collects what happened.

A run: flush Redis db 13 (broker) and db 15 (store, upstream, rate-limiter state), start
the workers, wait until every worker process reported ``ready``, write the upstream's
script, play the load (a function that publishes tasks at the scenario's times), and wait
until every published task reached a final state (``ok`` or ``fail``) or the run's hard
timeout passed. Then the workers are stopped (process groups, SIGTERM then SIGKILL), and
the events, the upstream's arrivals and the store's dead letters are read back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import dramatiq
import redis
from celery import Celery
from dramatiq.brokers.redis import RedisBroker

from limitpal_tasks import DeadLetter
from limitpal_tasks.stores.redis import RedisStore

from .recorder import CELERY_TASK, DRAMATIQ_ACTOR, EventTail, Recorder, WorkerSpec
from .upstream import Arrival, Upstream
from .workers import WorkerGroup

__all__ = [
    "BROKER_URL",
    "STORE_URL",
    "Accounting",
    "Load",
    "RunData",
    "RunPlan",
    "Send",
    "flush",
    "run_side_by_side",
]

BROKER_URL = "redis://127.0.0.1:6379/13"
STORE_URL = "redis://127.0.0.1:6379/15"
READY_TIMEOUT = 60.0
POLL = 0.25


class Send(Protocol):
    """Publishes one task; also what a load that reacts to the run may ask."""

    spec: WorkerSpec

    def __call__(self, tenant: str, task_id: str) -> None: ...

    def finished(self) -> int:
        """How many published tasks reached a final state (``ok`` or ``fail``) so far."""
        ...

    def note(self, event: str, **fields: Any) -> None:
        """Record an event of the load's own (e.g. a sample of the store) with the run's events."""
        ...


Load = Callable[[Send, float], None]
"""Publishes a scenario's tasks: ``load(send, t0)``, with ``t0`` the run's start (epoch seconds)."""


def flush() -> None:
    for url in (BROKER_URL, STORE_URL):
        redis.Redis.from_url(url).flushdb()


def sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


@dataclass(frozen=True)
class RunPlan:
    """One variant of a scenario: who runs it, with what, under which load."""

    scenario: str
    spec: WorkerSpec
    processes: int
    threads: int
    load: Load
    timeout: float
    quota: int | None = None
    outage: tuple[float, float] | None = None  # (start, end) seconds after t0
    preload: bool = False  # publish everything before the workers start (throughput runs)
    steps: tuple[tuple[float, int], ...] = ()  # capacity schedule: (seconds after t0, quota)

    @property
    def name(self) -> str:
        return f"{self.spec.framework}/{self.spec.name}"


@dataclass
class Accounting:
    """enqueued = succeeded + failed (by policy) + dead-lettered, each task in exactly one."""

    enqueued: int
    succeeded: int
    failed: int
    dead_lettered: int
    unfinished: int
    conflicting: int  # in two final states (e.g. succeeded and dead-lettered)
    unknown: int  # a final state for a task never published
    duplicate_runs: int  # extra successful executions of a task

    @property
    def balanced(self) -> bool:
        return (
            self.enqueued == self.succeeded + self.failed + self.dead_lettered
            and self.unfinished == 0
            and self.conflicting == 0
            and self.unknown == 0
        )

    def summary(self) -> str:
        verdict = "exact" if self.balanced else "NOT exact"
        extra = ""
        if self.unfinished:
            extra += f", {self.unfinished} unfinished"
        if self.conflicting:
            extra += f", {self.conflicting} in two states"
        if self.unknown:
            extra += f", {self.unknown} unknown"
        if self.duplicate_runs:
            extra += f", {self.duplicate_runs} duplicate runs"
        return f"{self.enqueued} = {self.succeeded} + {self.failed} + {self.dead_lettered} ({verdict}{extra})"


@dataclass
class RunData:
    """Everything one variant's run produced."""

    plan: RunPlan
    t0: float
    events: list[dict[str, Any]]
    arrivals: list[Arrival]
    dead: list[DeadLetter]
    timed_out: bool
    worker_exits: list[int]
    accounting: Accounting
    enqueued: dict[str, tuple[float, str]] = field(default_factory=dict)  # id -> (t, tenant)
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (ok|fail, t)

    @property
    def name(self) -> str:
        return self.plan.name

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["e"] == kind]

    @property
    def outage_window(self) -> tuple[float, float] | None:
        if self.plan.outage is None:
            return None
        return self.t0 + self.plan.outage[0], self.t0 + self.plan.outage[1]


class _Sender:
    def __init__(self, plan: RunPlan, record: Recorder) -> None:
        self.spec = plan.spec
        self.framework = plan.spec.framework
        self.queue = plan.spec.queue
        self.record = record
        self._tail: EventTail | None = None
        self._final: set[str] = set()
        self.celery: Celery | None = None
        self.dramatiq: RedisBroker | None = None
        if self.framework == "celery":
            self.celery = Celery("scenario-producer", broker=BROKER_URL)
            self.celery.conf.update(broker_connection_retry_on_startup=True, task_ignore_result=True)
        else:
            self.dramatiq = RedisBroker(url=BROKER_URL, middleware=[])  # type: ignore[no-untyped-call]
            self.dramatiq.declare_queue(self.queue)

    def __call__(self, tenant: str, task_id: str) -> None:
        self.record("enq", id=task_id, k=tenant)
        if self.celery is not None:
            self.celery.send_task(CELERY_TASK, args=(tenant, task_id), task_id=task_id, queue=self.queue)
        else:
            assert self.dramatiq is not None
            message: dramatiq.Message[Any] = dramatiq.Message(
                queue_name=self.queue,
                actor_name=DRAMATIQ_ACTOR,
                args=(tenant, task_id),
                kwargs={},
                options={},
                message_id=task_id,
            )
            self.dramatiq.enqueue(message)

    def finished(self) -> int:
        if self._tail is None:
            self._tail = EventTail(Path(self.spec.events_dir))
        for event in self._tail.read():
            if event["e"] in ("ok", "fail"):
                self._final.add(event["id"])
        return len(self._final)

    def note(self, event: str, **fields: Any) -> None:
        self.record(event, **fields)

    def close(self) -> None:
        if self.celery is not None:
            self.celery.close()
        if self.dramatiq is not None:
            self.dramatiq.close()


class _Run:
    """The live state of one variant while it runs."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.dir = Path(plan.spec.events_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("ev-*.jsonl"):
            old.unlink()
        self.events: list[dict[str, Any]] = []
        self.tail = EventTail(self.dir)
        self.record = Recorder(self.dir)
        self.group = WorkerGroup(plan.spec, plan.processes, plan.threads, self.dir / "workers.log")
        self.group.log.write_bytes(b"")
        self.ready = 0
        self.enqueued: set[str] = set()
        self.final: set[str] = set()
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.done = False
        self.timed_out = False
        self.exits: list[int] = []

    def poll(self) -> None:
        for event in self.tail.read():
            self.events.append(event)
            kind = event["e"]
            if kind == "ready":
                self.ready += 1
            elif kind == "enq":
                self.enqueued.add(event["id"])
            elif kind in ("ok", "fail"):
                self.final.add(event["id"])

    @property
    def complete(self) -> bool:
        return self.loaded.is_set() and self.enqueued <= self.final

    def play(self, t0: float) -> None:
        sender = _Sender(self.plan, self.record)
        try:
            self.plan.load(sender, t0)
        except BaseException as exc:
            self.load_error = exc
        finally:
            sender.close()
            self.loaded.set()

    def stop(self) -> None:
        if not self.done:
            self.exits = self.group.exited()
            self.group.stop()
            self.done = True


def run_side_by_side(plans: list[RunPlan], log: Callable[[str], None] = print) -> list[RunData]:
    """Run ``plans`` at the same time (same ``t0``, same upstream script), each to completion."""
    flush()
    runs = [_Run(plan) for plan in plans]
    try:
        return _run(runs, log)
    finally:
        for run in runs:
            run.stop()
            run.record.close()


def _run(runs: list[_Run], log: Callable[[str], None]) -> list[RunData]:
    for run in runs:
        if run.plan.preload:
            run.play(time.time())
    for run in runs:
        run.group.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while any(run.ready < run.group.expected_ready for run in runs):
        for run in runs:
            run.poll()
            if run.group.exited():
                raise RuntimeError(f"{run.plan.name}: a worker exited at start; see {run.group.log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready after {READY_TIMEOUT:.0f}s: see {runs[0].group.log}")
        time.sleep(0.1)
    t0 = time.time() + 0.3
    for run in runs:
        upstream = Upstream.from_url(run.plan.spec.store_url, run.plan.spec.upstream_prefix or "noop")
        outage = run.plan.outage
        upstream.configure(
            quota=run.plan.quota,
            down_from=None if outage is None else t0 + outage[0],
            down_until=None if outage is None else t0 + outage[1],
            steps=[(t0 + at, quota) for at, quota in run.plan.steps],
        )
    if any(run.plan.preload for run in runs):
        t0 = time.time()
    threads = [
        threading.Thread(target=run.play, args=(t0,), daemon=True) for run in runs if not run.plan.preload
    ]
    for thread in threads:
        thread.start()
    while not all(run.done for run in runs):
        time.sleep(POLL)
        for run in runs:
            if run.done:
                continue
            run.poll()
            if run.load_error is not None:
                raise RuntimeError(f"{run.plan.name}: the load failed") from run.load_error
            if run.complete:
                time.sleep(0.5)  # a late duplicate would show up in the events
                run.poll()
                run.stop()
                log(f"    {run.plan.name}: done in {time.time() - t0:.1f}s")
            elif time.time() > t0 + run.plan.timeout:
                run.timed_out = True
                run.stop()
                log(
                    f"    {run.plan.name}: TIMEOUT after {run.plan.timeout:.0f}s, "
                    f"{len(run.enqueued - run.final)} of {len(run.enqueued)} unfinished"
                )
    for thread in threads:
        thread.join(10)
    return [_collect(run, t0) for run in runs]


def _collect(run: _Run, t0: float) -> RunData:
    run.poll()
    spec = run.plan.spec
    upstream = Upstream.from_url(spec.store_url, spec.upstream_prefix or "noop")
    arrivals = upstream.arrivals() if spec.upstream_prefix else []
    dead: list[DeadLetter] = []
    if spec.variant == "limitpal":
        store = RedisStore.from_url(spec.store_url, prefix=spec.key_prefix)
        dead = store.list_dead(limit=1_000_000)
        store.close()
    events = sorted(run.events, key=lambda e: float(e["t"]))
    enqueued: dict[str, tuple[float, str]] = {}
    finished: dict[str, tuple[str, float]] = {}
    oks: Counter[str] = Counter()
    fails: set[str] = set()
    for event in events:
        kind = event["e"]
        if kind == "enq":
            enqueued.setdefault(event["id"], (float(event["t"]), event["k"]))
        elif kind == "ok":
            oks[event["id"]] += 1
            finished.setdefault(event["id"], ("ok", float(event["t"])))
        elif kind == "fail":
            fails.add(event["id"])
            finished.setdefault(event["id"], ("fail", float(event["t"])))
    dead_ids = {letter.id for letter in dead}
    ids = set(enqueued)
    succeeded = set(oks) & ids
    dead_lettered = dead_ids & ids
    failed = (fails - dead_ids - set(oks)) & ids
    conflicting = (set(oks) & (dead_ids | fails)) & ids
    accounting = Accounting(
        enqueued=len(ids),
        succeeded=len(succeeded - conflicting),
        failed=len(failed),
        dead_lettered=len(dead_lettered - set(oks)),
        unfinished=len(ids - set(oks) - fails - dead_ids),
        conflicting=len(conflicting),
        unknown=len((set(oks) | fails | dead_ids) - ids),
        duplicate_runs=sum(n - 1 for n in oks.values()),
    )
    return RunData(
        plan=run.plan,
        t0=t0,
        events=events,
        arrivals=sorted(arrivals, key=lambda a: a.t),
        dead=dead,
        timed_out=run.timed_out,
        worker_exits=run.exits,
        accounting=accounting,
        enqueued=enqueued,
        finished=finished,
    )
