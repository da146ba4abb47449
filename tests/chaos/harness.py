"""The test side of the chaos suite: spawn workers, enqueue jobs, read what workers recorded.

A :class:`Chaos` is one scenario's world: a broker, a store and a recorder (three Redis
servers, or a RabbitMQ node as the broker), a key prefix and queues of its own, and the
Celery and Dramatiq worker processes it started. Jobs are enqueued with a unique id each;
the :class:`Ledger` of a scenario counts, from the workers' records, how many were
enqueued, ran, were deferred, dead-lettered, failed, lost or ran twice.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import dramatiq
import pytest
import redis
from celery import Celery

from .chaos_common import celery_task_name, dramatiq_actor_name, hold_key, record_key, release_key

__all__ = [
    "FRAMEWORKS",
    "Chaos",
    "Framework",
    "Ledger",
    "LogLines",
    "RecordProperty",
    "Sent",
    "Worker",
    "quiet",
]

Framework = Literal["celery", "dramatiq"]
RecordProperty = Callable[[str, object], None]
"""pytest's ``record_property`` fixture."""
FRAMEWORKS: tuple[Framework, ...] = ("celery", "dramatiq")
ROOT = Path(__file__).resolve().parents[2]
WORKER_START_TIMEOUT = 45.0
WORKER_STOP_TIMEOUT = 20.0
DRAMATIQ_READY = "Worker process is ready for action."
CRASH_MARKERS = (
    "Unrecoverable error",  # Celery gave up
    "WorkerLostError",  # a Celery pool process died
    "died unexpectedly",
    "exited unexpectedly",  # a Dramatiq worker process died
)


@contextmanager
def quiet(name: str, level: int = logging.CRITICAL + 1) -> Iterator[None]:
    """Raise logger ``name``'s level for a while (a test that logs a line per call on purpose)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


class LogLines(logging.Handler):
    """Collects the records of a logger and its children while installed (``with LogLines(name) as log``)."""

    def __init__(self, name: str, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.name_ = name
        self.records: list[logging.LogRecord] = []
        self._before = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> LogLines:
        logger = logging.getLogger(self.name_)
        self._before = logger.level
        logger.setLevel(self.level)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(self.name_)
        logger.removeHandler(self)
        logger.setLevel(self._before)


class Worker:
    """One spawned worker command (its own process group), output going to a log file."""

    def __init__(
        self, framework: Framework, process: subprocess.Popen[bytes], log: Path, processes: int
    ) -> None:
        self.framework = framework
        self.process = process
        self.log = log
        self.processes = processes

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def ready(self) -> bool:
        if self.framework == "celery":
            return " ready." in self.output()
        return self.output().count(DRAMATIQ_READY) >= self.processes

    def started(self) -> bool:
        """Whether it is ready, or already gone (nothing to wait for either way)."""
        return self.ready or not self.alive

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole worker (main process and pool children): no cleanup at all."""
        if self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WORKER_STOP_TIMEOUT)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the process group if it hangs."""
        if not self.alive:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=WORKER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=WORKER_STOP_TIMEOUT)


@dataclass(frozen=True)
class Sent:
    """One enqueued job."""

    framework: Framework
    kind: str
    job: str
    tenant: str


@dataclass
class Ledger:
    """What became of a scenario's jobs, from the workers' records (one line of the report)."""

    fault: str
    enqueued: int = 0
    ran: int = 0
    deferred: int = 0
    deferrals: int = 0
    dead_lettered: int = 0
    failed: int = 0
    lost: int = 0
    duplicates: int = 0
    redelivered: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Chaos:
    """A scenario's broker, store, recorder, queues, prefix and workers; cleaned up by :meth:`close`."""

    def __init__(self, logs: Path, *, broker_url: str, store_url: str, recorder_url: str) -> None:
        token = uuid.uuid4().hex[:10]
        self.logs = logs
        self.broker_url = broker_url
        self.store_url = store_url
        self.recorder_url = recorder_url
        self.prefix = f"lpc-{token}"
        self.queues: dict[Framework, str] = {"celery": f"lpc-{token}-c", "dramatiq": f"lpc-{token}-d"}
        self.recorder = redis.Redis.from_url(recorder_url)
        self.workers: list[Worker] = []
        self.sent: list[Sent] = []
        self._celery: Celery | None = None
        self._dramatiq: dramatiq.Broker | None = None

    # -- clients ------------------------------------------------------------------------

    @property
    def celery(self) -> Celery:
        """A client app that only publishes, as an application would."""
        if self._celery is None:
            self._celery = Celery("limitpal-chaos-client", broker=self.broker_url)
            self._celery.conf.update(
                task_default_queue=self.queues["celery"], broker_connection_retry_on_startup=True
            )
        return self._celery

    @property
    def dramatiq(self) -> dramatiq.Broker:
        """A client broker without middleware: it only enqueues."""
        if self._dramatiq is None:
            if self.broker_url.startswith("amqp"):
                from dramatiq.brokers.rabbitmq import RabbitmqBroker

                rabbit = RabbitmqBroker(url=self.broker_url, middleware=[])
                rabbit.declare_queue(self.queues["dramatiq"], ensure=True)
                self._dramatiq = rabbit
            else:
                from dramatiq.brokers.redis import RedisBroker

                self._dramatiq = RedisBroker(url=self.broker_url, middleware=[])  # type: ignore[no-untyped-call]
                self._dramatiq.declare_queue(self.queues["dramatiq"])
        return self._dramatiq

    def send(
        self, framework: Framework, kind: str, tenant: str, header: object = None, *, job: str | None = None
    ) -> Sent:
        """Enqueue one job of ``kind`` for ``tenant``, optionally with a (forged) ``limitpal`` header."""
        sent = Sent(framework, kind, job or uuid.uuid4().hex, tenant)
        headers = {} if header is None else {"limitpal": header}
        if framework == "celery":
            self.celery.send_task(celery_task_name(kind), args=[sent.job, tenant], headers=headers)
        else:
            message: dramatiq.Message[Any] = dramatiq.Message(
                queue_name=self.queues["dramatiq"],
                actor_name=dramatiq_actor_name(kind),
                args=(sent.job, tenant),
                kwargs={},
                options=dict(headers),
            )
            self.dramatiq.enqueue(message)
        self.sent.append(sent)
        return sent

    def send_many(self, kind: str, tenant: str, count: int) -> list[Sent]:
        """``count`` jobs of ``kind`` for ``tenant`` on each framework."""
        return [self.send(fw, kind, tenant) for _ in range(count) for fw in FRAMEWORKS]

    def hold(self, job: str) -> None:
        """Make ``job``'s body hold its slots, once started, until :meth:`release`."""
        self.recorder.sadd(hold_key(self.prefix), job)

    def release(self, job: str) -> None:
        self.recorder.set(release_key(self.prefix, job), 1)

    # -- workers ------------------------------------------------------------------------

    def _env(self, framework: Framework, overrides: Mapping[str, str]) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "LPC_BROKER": self.broker_url,
            "LPC_STORE": self.store_url,
            "LPC_RECORDER": self.recorder_url,
            "LPC_PREFIX": self.prefix,
            "LPC_QUEUE": self.queues[framework],
            **overrides,
        }

    def start(
        self,
        framework: Framework,
        *,
        concurrency: int = 4,
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
    ) -> Worker:
        """Spawn a worker of ``framework`` on its queue: a threads pool (Celery) or one process
        (Dramatiq), with ``concurrency`` threads."""
        index = len(self.workers)
        log = self.logs / f"{framework}-{index}.log"
        if framework == "celery":
            command = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.chaos.chaos_celery",
                "worker",
                "--pool=threads",
                f"--concurrency={concurrency}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-Q",
                self.queues["celery"],
                "-n",
                f"{self.queues['celery']}-{index}@%h",
                "--loglevel=INFO",
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "dramatiq",
                "tests.chaos.chaos_dramatiq:broker",
                "--processes",
                "1",
                "--threads",
                str(concurrency),
                "--queues",
                self.queues["dramatiq"],
            ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self._env(framework, env or {}),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(framework, process, log, processes=1)
        self.workers.append(worker)
        if wait_ready:
            self.wait_until(
                lambda: worker.ready or not worker.alive,
                WORKER_START_TIMEOUT,
                f"the {framework} worker to start",
            )
            assert worker.ready, (
                f"the {framework} worker exited with {worker.process.poll()}:\n{worker.output()}"
            )
        return worker

    def start_both(
        self, *, concurrency: int = 4, env: Mapping[str, str] | None = None
    ) -> dict[Framework, Worker]:
        """One worker of each framework, started side by side."""
        workers = {
            fw: self.start(fw, concurrency=concurrency, env=env, wait_ready=False) for fw in FRAMEWORKS
        }
        for fw, worker in workers.items():
            self.wait_until(worker.started, WORKER_START_TIMEOUT, f"the {fw} worker to start")
            assert worker.ready, f"the {fw} worker exited with {worker.process.poll()}:\n{worker.output()}"
        return workers

    def worker_logs(self, tail: int = 5000) -> str:
        return "\n".join(
            f"--- {w.framework} worker {i} ---\n{w.output()[-tail:]}" for i, w in enumerate(self.workers)
        )

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` until it holds; fail with the workers' output after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{self.worker_logs()}")
            time.sleep(0.02)

    def crashes(self, since: int = 0) -> list[str]:
        """Workers (the ``since``-th started and later ones) that exited on their own, and
        signs in their logs of a lost worker process."""
        workers = list(enumerate(self.workers))[since:]
        problems = [
            f"{w.framework} worker {i} exited with {w.process.poll()}" for i, w in workers if not w.alive
        ]
        for i, worker in workers:
            text = worker.output()
            problems += [
                f"{worker.framework} worker {i} logged {marker!r}"
                for marker in CRASH_MARKERS
                if marker in text
            ]
        return problems

    # -- records ------------------------------------------------------------------------

    def records(self, kind: str) -> list[dict[str, Any]]:
        raw = cast(list[bytes], self.recorder.lrange(record_key(self.prefix, kind), 0, -1))
        return [json.loads(item) for item in raw]

    def counter(self, name: str) -> int:
        return int(cast(bytes | None, self.recorder.get(record_key(self.prefix, name))) or 0)

    def runs(self, jobs: Iterable[Sent] | None = None) -> list[dict[str, Any]]:
        """Finished bodies (of ``jobs``, if given), in the order they finished."""
        records = self.records("runs")
        if jobs is None:
            return records
        wanted = {s.job for s in jobs}
        return [r for r in records if r["job"] in wanted]

    def ran(self, jobs: Iterable[Sent]) -> Counter[str]:
        """How many times each of ``jobs`` finished its body."""
        return Counter(r["job"] for r in self.runs(jobs))

    def finished(self, jobs: Iterable[Sent]) -> set[str]:
        """Jobs that ran, were dead-lettered or failed: nothing more will happen to them."""
        wanted = {s.job for s in jobs}
        done = {r["job"] for r in self.records("runs")}
        done |= {r["job"] for r in self.records("deads")}
        done |= {r["job"] for r in self.records("failures")}
        return done & wanted

    def wait_finished(self, jobs: list[Sent], timeout: float, what: str = "") -> None:
        self.wait_until(
            lambda: len(self.finished(jobs)) == len({s.job for s in jobs}),
            timeout,
            what or f"{len(jobs)} jobs to finish",
        )

    def ledger(self, fault: str, jobs: list[Sent] | None = None) -> Ledger:
        """Count what became of ``jobs`` (default: everything this scenario sent)."""
        jobs = self.sent if jobs is None else jobs
        wanted = {s.job for s in jobs}
        runs = Counter(r["job"] for r in self.records("runs") if r["job"] in wanted)
        starts = Counter(r["job"] for r in self.records("starts") if r["job"] in wanted)
        defers = [r for r in self.records("defers") if r["job"] in wanted]
        deads = {r["job"] for r in self.records("deads") if r["job"] in wanted}
        failed = {r["job"] for r in self.records("failures") if r["job"] in wanted}
        return Ledger(
            fault=fault,
            enqueued=len(wanted),
            ran=len(runs),
            deferred=len({r["job"] for r in defers}),
            deferrals=len(defers),
            dead_lettered=len(deads),
            failed=len(failed),
            lost=len(wanted - set(runs) - deads - failed),
            duplicates=sum(n - 1 for n in runs.values()),
            redelivered=sum(n - 1 for n in starts.values()),
        )

    # -- cleanup ------------------------------------------------------------------------

    def close(self) -> None:
        try:
            for worker in self.workers:
                worker.stop()
        finally:
            if self._celery is not None:
                self._celery.close()
            if self._dramatiq is not None:
                self._dramatiq.close()
            keys = list(self.recorder.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                self.recorder.delete(*keys)
            self.recorder.close()
