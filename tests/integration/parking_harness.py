"""The harness of ``test_parking.py``: spawned workers, a broker queue, the park, the records.

One :class:`ParkingHarness` per test: a queue and a key prefix of its own on the broker,
the store on database 3 of the shared Redis (database 3 is the broker too, for the Redis
broker runs, unless the test brings its own ``redis-server``: :class:`OwnRedis`), and the
worker processes it started, stopped (or killed) and cleaned up after it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, cast

import pytest
import redis

from limitpal_tasks.core.parking import ParkSummary
from limitpal_tasks.stores.redis import RedisStore

from .parking_common import CELERY_TASK, DRAMATIQ_ACTOR, WorkerConfig, record_key

Framework = Literal["celery", "dramatiq"]

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
DB = 3
"""The one database of the shared Redis these tests use (store, records, Redis broker)."""
SHARED_REDIS = f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"
RABBITMQ = {
    "celery": f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}//",
    "dramatiq": f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/",
}
OWN_PORTS = range(7200, 7300)
"""The loopback ports a test's own ``redis-server`` may listen on."""
ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "dramatiq"  # the Dramatiq RedisBroker's default key namespace

WORKER_START_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 20.0
READY = {"celery": " ready.", "dramatiq": "Worker process is ready for action."}
# A releaser's failed publish, and its traceback up to the next log record ("[2026-...").
_FAILED_PUBLISH = re.compile(r"could not publish parked[^\n]*\n((?:(?!\[\d{4}-)[^\n]*\n)*)")
_CONNECTION_ERROR = re.compile(r"Connection|OperationalError|Timeout")


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str] = str
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` (and showing ``logs()``) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{logs()}")
        time.sleep(0.02)


# -- a redis-server of the test's own ---------------------------------------------------------


class OwnRedis:
    """A ``redis-server`` child process on a free loopback port of :data:`OWN_PORTS`, no persistence.

    Killed (SIGKILL) and started again on the same port it comes back empty, as a broker
    that lost everything it held.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = self._free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _free_port() -> int:
        for port in OWN_PORTS:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        pytest.skip(f"SKIPPED ON PURPOSE - no free loopback port in {OWN_PORTS.start}-{OWN_PORTS.stop - 1}")

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _answers(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        assert self._process is None, "already running"
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = self._process
        wait_until(
            lambda: process.poll() is not None or self._answers(), 15, f"redis-server on port {self.port}"
        )
        assert process.poll() is None, f"redis-server on port {self.port} exited with {process.returncode}"

    def kill(self) -> None:
        """SIGKILL: gone at once, with everything it held."""
        if self._process is None:
            return
        with suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=15)
        self._process = None

    @classmethod
    @contextmanager
    def running(cls, directory: Path) -> Iterator[OwnRedis]:
        if shutil.which("redis-server") is None:
            if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
                pytest.fail("redis-server is not on PATH; CI must run the parking broker-restart tests")
            pytest.skip("SKIPPED ON PURPOSE - redis-server is not on PATH; install it to run this test")
        server = cls(directory)
        server.start()
        try:
            yield server
        finally:
            server.kill()


# -- worker processes -----------------------------------------------------------------------------


class WorkerProcess:
    """One spawned ``celery worker`` or ``dramatiq`` command, in a process group of its own."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, ready_line: str, processes: int) -> None:
        self.process = process
        self.log = log
        self.ready_line = ready_line
        self.processes = processes

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def ready(self) -> bool:
        return self.output().count(self.ready_line) >= self.processes

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the process group if it hangs."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL to the whole process group (the main process and its children)."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WORKER_STOP_TIMEOUT)

    def _reap_group(self) -> None:
        with suppress(ProcessLookupError):  # children left behind by a main process that died
            os.killpg(self.process.pid, signal.SIGKILL)


# -- the harness ----------------------------------------------------------------------------------


class ParkingHarness:
    """A test's queue, key prefix, store, client and workers, for one framework and broker."""

    def __init__(self, framework: Framework, broker_url: str, logs: Path) -> None:
        token = uuid.uuid4().hex[:12]
        self.framework: Framework = framework
        self.broker_url = broker_url
        self.logs = logs
        self.queue = f"limitpal-park-{token}"
        self.prefix = f"lpk-{token}"
        self.store_url = SHARED_REDIS
        self.redis = redis.Redis.from_url(self.store_url)
        self.store = RedisStore.from_url(self.store_url, prefix=self.prefix, store_timeout=2.0)
        self.workers: list[WorkerProcess] = []
        self.broker_outage = False
        """Whether a failed publish for want of a broker connection is part of the test."""
        self._client: Any = None
        self._checked_at = 0.0

    @property
    def rabbitmq(self) -> bool:
        return self.broker_url.startswith("amqp")

    @property
    def task_name(self) -> str:
        return CELERY_TASK if self.framework == "celery" else DRAMATIQ_ACTOR

    @property
    def park(self) -> str:
        """The park name the integration uses by default."""
        return self.framework

    def config(self, **changes: Any) -> WorkerConfig:
        base = WorkerConfig(self.broker_url, self.store_url, self.prefix, self.queue)
        return replace(base, **changes)

    # -- client ------------------------------------------------------------------

    def client(self) -> Any:
        """A client of the broker that only publishes (a Celery app, or a Dramatiq broker)."""
        if self._client is None:
            if self.framework == "celery":
                from celery import Celery

                app = Celery("limitpal-park-client", broker=self.broker_url)
                app.conf.update(
                    task_default_queue=self.queue,
                    task_ignore_result=True,
                    broker_connection_retry_on_startup=True,
                )
                self._client = app
            elif self.rabbitmq:
                from dramatiq.brokers.rabbitmq import RabbitmqBroker

                self._client = RabbitmqBroker(url=self.broker_url, middleware=[])
            else:
                from dramatiq.brokers.redis import RedisBroker

                self._client = RedisBroker(url=self.broker_url, middleware=[])  # type: ignore[no-untyped-call]
        return self._client

    def prepare_queue(self) -> None:
        """Declare the test's queue on the broker (nothing sent before a worker starts is dropped)."""
        client = self.client()
        if self.framework == "celery":
            with client.connection_for_write() as connection:
                queue = client.amqp.queues[self.queue].bind(connection.default_channel)
                queue.declare()
        elif self.rabbitmq:
            client.declare_queue(self.queue, ensure=True)
        else:
            client.declare_queue(self.queue)

    def send(self, tenant: str, n: int, hold: float = 0.0) -> str:
        """Enqueue one task for ``tenant`` (its body takes ``hold`` seconds); its task (message) id."""
        client = self.client()
        if self.framework == "celery":
            return str(client.send_task(CELERY_TASK, args=(tenant, n, hold)).id)
        import dramatiq

        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=self.queue, actor_name=DRAMATIQ_ACTOR, args=(tenant, n, hold), kwargs={}, options={}
        )
        client.enqueue(message)
        return str(message.message_id)

    def send_many(self, tenant: str, count: int, start: int = 0) -> list[str]:
        return [self.send(tenant, n) for n in range(start, start + count)]

    # -- workers -----------------------------------------------------------------

    def start_worker(
        self,
        config: WorkerConfig | None = None,
        *,
        concurrency: int = 4,
        processes: int = 1,
        consume: bool = True,
        wait_ready: bool = True,
    ) -> WorkerProcess:
        """Spawn a worker (``consume=False``: it listens on an idle queue, so it only releases)."""
        config = config or self.config()
        index = len(self.workers)
        log = self.logs / f"{self.framework}-worker-{index}.log"
        queue = self.queue if consume else f"{self.queue}-idle"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "LIMITPAL_PARK_CONFIG": config.to_env(),
        }
        if self.framework == "celery":
            command = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.integration.parking_celery_app",
                "worker",
                "--pool=threads",
                f"--concurrency={concurrency}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-Q",
                queue,
                "-n",
                f"{self.queue}-{index}@%h",
                "--loglevel=INFO",
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "dramatiq",
                "tests.integration.parking_dramatiq_app:broker",
                "--processes",
                str(processes),
                "--threads",
                str(concurrency),
                "--queues",
                queue,
            ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = WorkerProcess(process, log, READY[self.framework], processes)
        self.workers.append(worker)
        if wait_ready:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, *workers: WorkerProcess) -> None:
        for worker in workers:
            self.wait_until(
                lambda w=worker: w.ready or not w.alive,  # type: ignore[misc]
                WORKER_START_TIMEOUT,
                f"worker {worker.log.name} to start",
            )
            assert worker.ready, f"the worker exited with {worker.process.poll()}:\n{worker.output()}"

    def stop_workers(self) -> None:
        """Warm shutdown of every worker still running."""
        for worker in self.workers:
            worker.stop()

    def kill_workers(self) -> None:
        """SIGKILL every worker still running: what they held stays where it was (the broker, the park)."""
        for worker in self.workers:
            if worker.alive:
                worker.kill()

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.log.name} ---\n{w.output()[-5000:]}" for w in self.workers)

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition``; fail at once when a releaser could not publish a task (see below)."""

        def holds() -> bool:
            self.check_publishes()
            return condition()

        wait_until(holds, timeout, what, self.worker_logs)

    def publish_failures(self) -> list[str]:
        """The exception (last traceback line) of every publish the workers' releasers logged as failed."""
        found = []
        for worker in self.workers:
            for match in _FAILED_PUBLISH.finditer(worker.output()):
                lines = [line for line in match.group(1).splitlines() if line.strip()]
                found.append(lines[-1] if lines else "(no traceback)")
        return found

    def check_publishes(self, every: float = 0.5) -> None:
        """Fail (an ``AssertionError``) once a releaser logged a publish that failed for another
        reason than a broker outage the test caused: the parked task would never be released."""
        if time.monotonic() - self._checked_at < every:
            return
        self._checked_at = time.monotonic()
        for failure in self.publish_failures():
            if not (self.broker_outage and _CONNECTION_ERROR.search(failure)):
                raise AssertionError(
                    f"a releaser could not publish a parked task: {failure}\n{self.worker_logs()}"
                )

    # -- what the workers recorded ----------------------------------------------------------

    def records(self, kind: str) -> list[dict[str, Any]]:
        raw = cast(list[bytes], self.redis.lrange(record_key(self.prefix, kind), 0, -1))
        return [json.loads(item) for item in raw]

    def runs(self) -> list[dict[str, Any]]:
        """Executions of the task body, in the order they started."""
        return sorted(self.records("runs"), key=lambda r: float(r["t"]))

    def run_counts(self) -> Counter[str]:
        return Counter(str(r["id"]) for r in self.records("runs"))

    def outcomes(self, outcome: str) -> Counter[str]:
        """How many deliveries of each task id ended in ``outcome`` (deferred, done, failed)."""
        return Counter(str(o["id"]) for o in self.records("outcomes") if o["outcome"] == outcome)

    def wait_ran(self, ids: Iterable[str], timeout: float) -> None:
        """Wait until every task of ``ids`` ran (at least once)."""
        wanted = set(ids)
        self.wait_until(
            lambda: wanted <= set(self.run_counts()),
            timeout,
            f"all {len(wanted)} tasks to run ({len(wanted & set(self.run_counts()))} did)",
        )

    # -- the park ------------------------------------------------------------------------------

    def parked(self) -> list[ParkSummary]:
        return self.store.parked(self.park)

    def parked_count(self) -> int:
        return sum(s.count for s in self.parked())

    def parked_ids(self) -> list[str]:
        """The task (message) ids in the park, in parking order (the store's entry sequence)."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(f"{self.prefix}:{{park:{self.park}}}:msg"))
        out = []
        for _, entry in sorted(raw.items()):
            payload = json.loads(entry)["payload"]
            if self.framework == "celery":
                out.append(str(json.loads(payload["signature"])["options"]["task_id"]))
            else:
                out.append(str(json.loads(base64.b64decode(payload["message"]))["message_id"]))
        return out

    def wait_parked(self, ids: Iterable[str], timeout: float = 20.0) -> None:
        """Wait until exactly ``ids`` are parked, each after one deferral."""
        wanted = sorted(ids)
        self.wait_until(
            lambda: sorted(self.parked_ids()) == wanted and sorted(self.outcomes("deferred")) == wanted,
            timeout,
            f"the {len(wanted)} tasks to be parked",
        )

    # -- the broker ----------------------------------------------------------------------------

    def broker_messages(self) -> int:
        """Messages of the test's queue still in the broker: ready, unacknowledged or delayed.

        Meaningful once the workers stopped (RabbitMQ counts only messages not delivered).
        """
        if self.framework == "celery":
            if not self.rabbitmq:
                broker = redis.Redis.from_url(self.broker_url)
                try:
                    count = sum(
                        int(broker.llen(name))
                        for name in broker.scan_iter(match=f"{self.queue}*")
                        if broker.type(name) == b"list"
                    )
                    unacked = cast(list[bytes], broker.hvals("unacked"))
                    return count + sum(1 for u in unacked if json.loads(u)[2] == self.queue)
                finally:
                    broker.close()
            with self.client().connection_for_write() as connection:
                _, count, _ = connection.default_channel.queue_declare(queue=self.queue, passive=True)
                return int(count)
        if self.rabbitmq:
            ready, delayed, _ = self.client().get_queue_message_counts(self.queue)
            return int(ready) + int(delayed)
        broker = self.client().client
        return int(broker.hlen(f"{NAMESPACE}:{self.queue}.msgs")) + int(
            broker.hlen(f"{NAMESPACE}:{self.queue}.DQ.msgs")
        )

    def dramatiq_dead(self) -> int:
        """Messages in Dramatiq's own dead-letter queue of the test's queue."""
        client = self.client()
        if self.rabbitmq:
            _, _, dead = client.get_queue_message_counts(self.queue)
            return int(dead)
        return int(client.client.zcard(f"{NAMESPACE}:{self.queue}.XQ"))

    # -- cleanup -------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.kill_workers()
            self._delete_queues()
        finally:
            keys = list(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                self.redis.delete(*keys)
            self.store.close()
            self.redis.close()
            if self._client is not None:
                self._client.close()

    def _redis_broker_answers(self) -> bool:
        broker = redis.Redis.from_url(self.broker_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            return bool(broker.ping())
        except redis.RedisError:
            return False
        finally:
            broker.close()

    def _delete_queues(self) -> None:
        if not self.rabbitmq and not self._redis_broker_answers():
            return  # a test's own broker, left dead by a failure: it takes its queues with it
        names = [self.queue, f"{self.queue}-idle"]
        client = self.client()
        if self.framework == "celery":
            with client.connection_for_write() as connection:
                channel = connection.default_channel
                for name in names:
                    queue = client.amqp.queues[name].bind(channel)  # created if missing (-idle)
                    with suppress(Exception):
                        queue.declare()  # kombu's Redis transport deletes only bindings its connection knows
                        queue.delete()
                        queue.exchange.delete()
            if not self.rabbitmq:  # deliveries a killed worker held: kombu's shared unacked hash
                broker = redis.Redis.from_url(self.broker_url)
                try:
                    for tag, raw in cast(dict[bytes, bytes], broker.hgetall("unacked")).items():
                        if json.loads(raw)[2] in names:
                            broker.hdel("unacked", tag)
                            broker.zrem("unacked_index", tag)
                finally:
                    broker.close()
            return
        dramatiq_names = [f"{n}{suffix}" for n in names for suffix in ("", ".DQ", ".XQ")]
        if self.rabbitmq:
            for name in dramatiq_names:
                with suppress(Exception):
                    client.channel.queue_delete(queue=name)
            return
        broker = client.client
        keys = [f"{NAMESPACE}:{n}{suffix}" for n in dramatiq_names for suffix in ("", ".msgs")]
        # Every broker leaves a heartbeat (the client's too); the workers may leave acks.
        broker_ids = [str(w["broker_id"]) for w in self.records("workers")] + [client.broker_id]
        for broker_id in broker_ids:
            keys.extend(broker.scan_iter(match=f"{NAMESPACE}:__acks__.{broker_id}.*"))
            broker.zrem(f"{NAMESPACE}:__heartbeats__", broker_id)
        broker.delete(*keys)


@contextmanager
def parking_harness(framework: Framework, broker_url: str, logs: Path) -> Iterator[ParkingHarness]:
    harness = ParkingHarness(framework, broker_url, logs)
    try:
        harness.prepare_queue()
        yield harness
    finally:
        harness.close()
