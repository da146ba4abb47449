"""The Celery integration in real workers, on a Redis and on a RabbitMQ broker.

Every test spawns its own ``celery worker`` processes (``tests/integration/celery_tasks.py``)
on a queue and a key prefix of its own, so nothing it leaves behind reaches another
test; the state store and the result backend are the Redis server in both cases. Tasks
record what they saw in Redis (see ``celery_tasks``), and tests wait on results and on
those records with timeouts, never on fixed sleeps.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from celery import Celery, chain, chord

from limitpal_tasks import DeadLetter, DeferralLimitExceeded
from limitpal_tasks.stores.redis import RedisStore

from . import celery_config as config

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
REDIS_BROKER = f"redis://{REDIS_HOST}:{REDIS_PORT}/4"
RABBITMQ_BROKER = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}//"
BACKEND_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/5"
STORE_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/6"
ROOT = Path(__file__).resolve().parents[2]

WORKER_START_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 20.0
RESULT_TIMEOUT = 30.0

ServerCheck = Callable[[str, str, int], None]

# The RabbitMQ runs need Redis too: it is their state store and result backend.
BROKERS = [
    pytest.param(REDIS_BROKER, id="redis", marks=pytest.mark.redis),
    pytest.param(RABBITMQ_BROKER, id="rabbitmq", marks=[pytest.mark.rabbitmq, pytest.mark.redis]),
]
REDIS_ONLY = [BROKERS[0]]

pytestmark = [pytest.mark.celery, pytest.mark.slow]


class Worker:
    """One spawned ``celery worker`` process, its output going to a log file."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def ready(self) -> bool:
        return " ready." in self.output()

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the worker's process group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=WORKER_STOP_TIMEOUT)


class Harness:
    """A test's broker queue, key prefix, client app, store and workers; cleaned up after it."""

    def __init__(self, broker_url: str, logs: Path) -> None:
        token = uuid.uuid4().hex[:12]
        self.broker_url = broker_url
        self.logs = logs
        self.queue = f"limitpal-it-{token}"
        self.prefix = f"lpt-{token}"
        self.client = Celery("limitpal-it-client", broker=broker_url, backend=BACKEND_URL)
        self.client.conf.update(
            task_default_queue=self.queue, broker_connection_retry_on_startup=True, result_expires=3600
        )
        self.redis = redis.Redis.from_url(STORE_URL)
        self.results = redis.Redis.from_url(BACKEND_URL)
        self.store = RedisStore.from_url(STORE_URL, prefix=self.prefix)
        self.workers: list[Worker] = []

    # -- broker -----------------------------------------------------------------

    def _bound_queue(self, connection: Any) -> Any:
        # The queue exactly as Celery declares it: the client's default queue.
        return self.client.amqp.queues[self.queue].bind(connection.default_channel)

    def prepare_queue(self) -> None:
        """Declare the test's queue (so nothing sent before a worker starts is dropped) and purge it."""
        with self.client.connection_for_write() as connection:
            queue = self._bound_queue(connection)
            queue.declare()
            queue.purge()

    def queue_size(self) -> int:
        """Messages waiting in the test's queue (after the workers stopped: unacknowledged ones too)."""
        if self.broker_url.startswith("redis"):
            # Kombu keeps a Redis queue as a list, gone once empty (a passive declare would fail).
            broker = redis.Redis.from_url(self.broker_url)
            try:
                return int(broker.llen(self.queue))
            finally:
                broker.close()
        with self.client.connection_for_write() as connection:
            _, count, _ = connection.default_channel.queue_declare(queue=self.queue, passive=True)
            return int(count)

    def send(self, name: str, *args: Any) -> Any:
        """Enqueue task ``name``; its ``AsyncResult``."""
        return self.client.send_task(name, args=args)

    def sig(self, name: str, *args: Any) -> Any:
        """A signature of task ``name`` on the client app (for chains and chords)."""
        return self.client.signature(name, args=args)

    # -- workers ----------------------------------------------------------------

    def start_worker(
        self,
        pool: str,
        concurrency: int = 1,
        overrides: Mapping[str, Any] | None = None,
        wait_ready: bool = True,
    ) -> Worker:
        """Spawn a worker consuming the test's queue; by default wait until it says it is ready."""
        index = len(self.workers)
        log = self.logs / f"worker-{index}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "LIMITPAL_TEST_BROKER": self.broker_url,
            "LIMITPAL_TEST_BACKEND": BACKEND_URL,
            "LIMITPAL_TEST_STORE": STORE_URL,
            "LIMITPAL_TEST_PREFIX": self.prefix,
            "LIMITPAL_TEST_QUEUE": self.queue,
            "LIMITPAL_TEST_POLICY_OVERRIDES": json.dumps(overrides or {}),
        }
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.integration.celery_tasks",
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            self.queue,
            "-n",
            f"{self.queue}-{index}@%h",
            "--loglevel=INFO",
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = Worker(process, log)
        self.workers.append(worker)
        if wait_ready:
            self.wait_until(
                lambda: worker.ready or worker.process.poll() is not None,
                WORKER_START_TIMEOUT,
                "the worker to start",
            )
            assert worker.ready, f"the worker exited with {worker.process.poll()}:\n{worker.output()}"
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()

    def worker_logs(self) -> str:
        return "\n".join(f"--- worker {i} ---\n{w.output()[-6000:]}" for i, w in enumerate(self.workers))

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` until it holds; fail with the workers' output after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{self.worker_logs()}")
            time.sleep(0.02)

    def get(self, result: Any, timeout: float = RESULT_TIMEOUT, propagate: bool = True) -> Any:
        """``result.get(timeout=...)``, failing with the workers' output when it times out."""
        try:
            return result.get(timeout=timeout, propagate=propagate)
        except TimeoutError:
            pytest.fail(f"no result for task {result.id} within {timeout:g}s\n{self.worker_logs()}")

    # -- what the tasks recorded ------------------------------------------------

    def records(self, kind: str) -> list[dict[str, Any]]:
        raw = cast(list[bytes], self.redis.lrange(config.record_key(kind, self.prefix), 0, -1))
        return [json.loads(item) for item in raw]

    def runs(self, task: str) -> list[dict[str, Any]]:
        """Executions of ``task``'s body, in the order they started."""
        return sorted((r for r in self.records("runs") if r["task"] == task), key=lambda r: r["t"])

    def deferrals(self) -> Counter[str]:
        """How many deliveries of each task id ended in a deferral (``IGNORED``)."""
        return Counter(
            e["id"] for e in self.records("events") if e["phase"] == "postrun" and e["state"] == "IGNORED"
        )

    def deliveries(self, task_id: str) -> list[dict[str, Any]]:
        """The ``task_prerun`` records of every delivery of ``task_id``."""
        return [e for e in self.records("events") if e["phase"] == "prerun" and e["id"] == task_id]

    def wait_settled(self, task_ids: Iterable[str], timeout: float = 10.0) -> None:
        """Wait until the last delivery of each task finished (its postrun is recorded)."""
        pending = set(task_ids)

        def settled() -> bool:
            done = {
                e["id"]
                for e in self.records("events")
                if e["phase"] == "postrun" and e["state"] in ("SUCCESS", "FAILURE")
            }
            return pending <= done

        self.wait_until(settled, timeout, f"the last deliveries of {sorted(pending)} to finish")

    def result_meta(self, task_id: str) -> dict[str, Any]:
        """What the result backend holds for ``task_id``, as stored (JSON)."""
        raw = cast(bytes | None, self.results.get(f"celery-task-meta-{task_id}"))
        assert raw is not None, f"the result backend holds nothing for {task_id}"
        meta: dict[str, Any] = json.loads(raw)
        return meta

    def dead_letters(self) -> list[DeadLetter]:
        return self.store.list_dead()

    # -- cleanup ----------------------------------------------------------------

    def close(self) -> None:
        try:
            self.stop_workers()
            with self.client.connection_for_write() as connection:
                queue = self._bound_queue(connection)
                queue.declare()  # kombu's Redis transport deletes only bindings its connection knows
                queue.delete()
                queue.exchange.delete()
        finally:
            keys = list(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                self.redis.delete(*keys)
            self.store.close()
            self.redis.close()
            self.results.close()
            self.client.close()


@pytest.fixture(params=BROKERS)
def harness(request: pytest.FixtureRequest, require_server: ServerCheck, tmp_path: Path) -> Iterator[Harness]:
    """A fresh queue and key prefix on the broker of ``request.param``; workers stopped afterwards."""
    broker_url: str = request.param
    require_server("redis", REDIS_HOST, REDIS_PORT)
    if broker_url.startswith("amqp"):
        require_server("rabbitmq", RABBITMQ_HOST, RABBITMQ_PORT)
    harness = Harness(broker_url, tmp_path)
    try:
        harness.prepare_queue()
        yield harness
    finally:
        harness.close()


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


# -- admission ----------------------------------------------------------------------


def test_admitted_tasks_run_once_and_return_their_results(harness: Harness) -> None:
    """Tasks the pipeline admits run once each, undeferred, and their results reach the backend."""
    harness.start_worker("prefork", concurrency=2)

    results = [harness.send(config.UPSTREAM_TASK, "inventory", n) for n in range(4)]

    assert [harness.get(r) for r in results] == [0, 2, 4, 6]
    harness.wait_settled(r.id for r in results)
    runs = harness.runs(config.UPSTREAM_TASK)
    assert sorted(run["id"] for run in runs) == sorted(r.id for r in results)
    assert [(run["retries"], run["header"]) for run in runs] == [(0, None)] * 4
    assert harness.deferrals() == Counter()
    harness.wait_until(
        lambda: harness.store.status("service:inventory").calls == 4, 5, "the breaker to count 4 calls"
    )


# -- circuit breaker ------------------------------------------------------------------


def test_open_breaker_defers_without_spending_retries_until_it_is_reset(harness: Harness) -> None:
    """An open breaker defers every task (same id, retries 0) until it is reset; then all complete."""
    key = "service:payments"
    harness.store.force(key, "forced_open")
    assert harness.store.status(key).breaker == "forced_open"
    harness.start_worker("threads", concurrency=4)

    results = [harness.send(config.UPSTREAM_TASK, "payments", n) for n in range(3)]
    ids = [r.id for r in results]
    harness.wait_until(
        lambda: all(harness.deferrals()[i] >= 2 for i in ids), 20, "every task to be deferred twice"
    )
    assert harness.runs(config.UPSTREAM_TASK) == []
    assert [r.state for r in results] == ["PENDING"] * 3

    harness.store.reset(key)

    assert [harness.get(r) for r in results] == [0, 2, 4]
    harness.wait_settled(ids)
    runs = harness.runs(config.UPSTREAM_TASK)
    assert sorted(run["id"] for run in runs) == sorted(ids)
    for run in runs:
        assert run["retries"] == 0
        assert run["header"]["deferrals"] >= 2
        assert isinstance(run["header"]["first_seen"], float)
    for task_id in ids:
        deliveries = harness.deliveries(task_id)
        assert len(deliveries) >= 3
        assert {d["retries"] for d in deliveries} == {0}
        first_seen = {d["header"]["first_seen"] for d in deliveries if d["header"]}
        assert len(first_seen) == 1, f"first_seen changed across deferrals: {first_seen}"
    assert harness.store.status(key).breaker == "closed"


# -- rate limits ----------------------------------------------------------------------


def test_tenant_over_its_rate_is_deferred_while_another_tenant_runs_at_once(harness: Harness) -> None:
    """A flooding tenant drains at its rate through deferrals; a quiet tenant's tasks start at once."""
    harness.start_worker("threads", concurrency=4)
    interval = 1 / config.TENANT_RATE

    flood = [harness.send(config.TENANT_TASK, "flood", n) for n in range(10)]
    quiet = [harness.send(config.TENANT_TASK, "quiet", n) for n in range(2)]

    assert [harness.get(r) for r in flood + quiet] == [*range(10), 0, 1]
    harness.wait_settled(r.id for r in flood + quiet)
    started = {run["id"]: run["t"] for run in harness.runs(config.TENANT_TASK)}
    flood_times = sorted(started[r.id] for r in flood)
    quiet_times = sorted(started[r.id] for r in quiet)
    assert flood_times[-1] - flood_times[0] >= 9 * interval * 0.9, flood_times
    assert min(_gaps(flood_times)) >= interval * 0.5, _gaps(flood_times)
    assert quiet_times[-1] - flood_times[0] < 2 * interval + 0.5, (flood_times, quiet_times)
    assert quiet_times[-1] < flood_times[-1] - 4 * interval
    deferrals = harness.deferrals()
    assert [deferrals[r.id] > 0 for r in sorted(flood, key=lambda r: started[r.id])] == [False] + [True] * 9
    assert [deferrals[r.id] > 0 for r in sorted(quiet, key=lambda r: started[r.id])] == [False, True]


def test_task_deferred_to_a_reserved_slot_is_admitted_when_it_returns(harness: Harness) -> None:
    """A task deferred to its booked rate-limit slot is admitted when it comes back: one deferral, one hop."""
    harness.start_worker("threads", concurrency=4)

    results = [harness.send(config.TENANT_TASK, "booked", n) for n in range(6)]

    assert [harness.get(r) for r in results] == list(range(6))
    harness.wait_settled(r.id for r in results)
    deferrals = harness.deferrals()
    runs = {run["id"]: run for run in harness.runs(config.TENANT_TASK)}
    deferred = [r.id for r in results if runs[r.id]["header"] is not None]
    assert len(deferred) == 5
    assert {runs[i]["header"]["deferrals"] for i in deferred} == {1}
    # For each task deferred more than once: when each delivery arrived, in ms after its booked slot.
    late_ms = {
        task_id: [
            round(1000 * (e["t"] - slot), 1)
            for e in harness.deliveries(task_id)
            if e["header"]
            for slot in e["header"]["reservations"].values()
        ]
        for task_id in deferred
        if deferrals[task_id] != 1
    }
    assert not late_ms, f"re-published again when back for the booked slot (ms after it): {late_ms}"


# -- deferral limit -------------------------------------------------------------------


def test_deferral_limit_dead_letters_the_task_and_fails_it(harness: Harness) -> None:
    """After max_deferrals the task is dead-lettered and fails with DeferralLimitExceeded in the backend."""
    key = "service:ledger"
    harness.store.force(key, "forced_open")
    harness.start_worker("solo")

    result = harness.send(config.STRICT_TASK, "ledger", 1)

    harness.get(result, propagate=False)  # the type the client rebuilds is the next test's subject
    assert result.state == "FAILURE"
    meta = harness.result_meta(result.id)
    assert meta["status"] == "FAILURE"
    assert (meta["result"]["exc_module"], meta["result"]["exc_type"]) == (
        "limitpal_tasks.errors",
        "DeferralLimitExceeded",
    )
    assert "max_deferrals" in str(meta["result"]["exc_message"])
    letters = harness.dead_letters()
    assert [(d.id, d.reason, d.task_name, d.key, d.args, d.deferrals) for d in letters] == [
        (result.id, "max_deferrals", config.STRICT_TASK, key, ("ledger", 1), 2)
    ]
    harness.wait_settled([result.id])
    assert harness.runs(config.STRICT_TASK) == []
    assert harness.deferrals()[result.id] == 2
    assert [(f["id"], f["exc_type"]) for f in harness.records("failures")] == [
        (result.id, "DeferralLimitExceeded")
    ]


def test_dead_letter_replayed_from_the_cli_runs_exactly_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dead replay` re-publishes a dead letter: a real worker runs it once; a second replay finds nothing."""
    from click.testing import CliRunner

    from limitpal_tasks.cli import main

    key = "service:ledger"
    harness.store.force(key, "forced_open")
    harness.start_worker("prefork", concurrency=2)
    dead = harness.send(config.STRICT_TASK, "ledger", 7)
    harness.get(dead, propagate=False)
    harness.wait_settled([dead.id])
    harness.store.reset(key)
    module = types.ModuleType("limitpal_replay_client")
    module.app = harness.client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    replay = ["dead", "replay", dead.id, "--celery-app", module.__name__, "--store", STORE_URL]
    replay += ["--prefix", harness.prefix]

    first = CliRunner().invoke(main, replay)
    assert first.exit_code == 0, first.output
    replayed_id = first.output.split()[-1]
    harness.wait_settled([replayed_id])
    second = CliRunner().invoke(main, replay)

    assert second.exit_code != 0
    runs = harness.runs(config.STRICT_TASK)
    assert [(r["id"], r["service"], r["n"]) for r in runs] == [(replayed_id, "ledger", 7)]
    assert harness.dead_letters() == []
    harness.stop_workers()
    assert harness.queue_size() == 0


@pytest.mark.parametrize("harness", REDIS_ONLY, indirect=True)
def test_deferral_limit_error_reaches_the_caller_as_deferral_limit_exceeded(harness: Harness) -> None:
    """``AsyncResult.get()`` of a task that ran out of deferrals raises ``DeferralLimitExceeded``."""
    harness.store.force("service:ledger", "forced_open")
    harness.start_worker("solo")

    result = harness.send(config.STRICT_TASK, "ledger", 1)

    with pytest.raises(DeferralLimitExceeded) as raised:
        harness.get(result)
    assert raised.value.limit == "max_deferrals"
    assert raised.value.deferrals == 3


# -- retries --------------------------------------------------------------------------


def test_retries_follow_the_policy_then_the_task_is_dead_lettered(harness: Harness) -> None:
    """A task failing every time runs max_attempts times (retries 0, 1, 2), then fails, dead-lettered."""
    harness.redis.set(config.health_key("billing", harness.prefix), "down")
    harness.start_worker("threads", concurrency=2)

    result = harness.send(config.UPSTREAM_TASK, "billing", 7)

    with pytest.raises(ConnectionError, match="upstream billing is down"):
        harness.get(result)
    assert result.state == "FAILURE"
    harness.wait_settled([result.id])
    runs = harness.runs(config.UPSTREAM_TASK)
    assert [(run["id"], run["retries"]) for run in runs] == [(result.id, 0), (result.id, 1), (result.id, 2)]
    assert harness.deferrals() == Counter()
    letters = harness.dead_letters()
    assert [(d.id, d.reason, d.attempts, d.key) for d in letters] == [
        (result.id, "max_attempts", 3, "service:billing")
    ]
    assert "ConnectionError" in letters[0].error


def test_result_taken_at_enqueue_resolves_after_deferrals_and_a_retry(harness: Harness) -> None:
    """A task deferred by an open breaker, then failing once and retried, resolves its first AsyncResult."""
    key = "service:search"
    harness.store.force(key, "forced_open")
    harness.redis.set(config.health_key("search", harness.prefix), "flaky")
    harness.start_worker("threads", concurrency=2)

    results = [harness.send(config.UPSTREAM_TASK, "search", n) for n in (1, 2)]
    harness.wait_until(
        lambda: all(harness.deferrals()[r.id] >= 1 for r in results), 15, "every task to be deferred"
    )
    harness.store.reset(key)

    assert [harness.get(r) for r in results] == [2, 4]
    harness.wait_settled(r.id for r in results)
    for result in results:
        runs = [run for run in harness.runs(config.UPSTREAM_TASK) if run["id"] == result.id]
        assert [run["retries"] for run in runs] == [0, 1]
        assert runs[0]["header"]["deferrals"] >= 1
    assert harness.dead_letters() == []


@pytest.mark.parametrize("harness", REDIS_ONLY, indirect=True)
def test_first_seen_survives_a_retry(harness: Harness) -> None:
    """A retried task keeps the first-seen time of its first enqueue, so its deadline is not restarted."""
    key = "service:archive"
    harness.store.force(key, "forced_open")
    harness.redis.set(config.health_key("archive", harness.prefix), "flaky")
    harness.start_worker("solo")

    result = harness.send(config.UPSTREAM_TASK, "archive", 1)
    harness.wait_until(lambda: harness.deferrals()[result.id] >= 1, 15, "the task to be deferred")
    harness.store.reset(key)

    assert harness.get(result) == 2
    harness.wait_settled([result.id])
    runs = harness.runs(config.UPSTREAM_TASK)
    assert [run["retries"] for run in runs] == [0, 1]
    first_seen = runs[0]["header"]["first_seen"]
    assert (runs[1]["header"] or {}).get("first_seen") == first_seen, runs[1]["header"]


# -- cooldown -------------------------------------------------------------------------


def test_cooldown_pauses_the_key_fleet_wide_then_the_task_completes(harness: Harness) -> None:
    """``Cooldown(retry_after)`` pauses the key for everyone and defers the task, which completes after it."""
    retry_after = 2.0
    harness.start_worker("threads", concurrency=2)

    first = harness.send(config.PARTNER_TASK, "acme", 1, retry_after)
    harness.wait_until(lambda: harness.deferrals()[first.id] >= 1, 15, "the cooldown to defer the task")
    [cooldown] = harness.records("cooldowns")
    status = harness.store.status("partner:acme")
    assert status.pause_reason == "cooldown"
    assert status.paused_until is not None
    assert status.paused_until - cooldown["t"] == pytest.approx(retry_after, abs=0.5)
    second = harness.send(config.PARTNER_TASK, "acme", 2, retry_after)

    assert (harness.get(first), harness.get(second)) == (1, 2)
    harness.wait_settled([first.id, second.id])
    runs = {run["id"]: run for run in harness.runs(config.PARTNER_TASK)}
    assert sorted(runs) == sorted([first.id, second.id])
    for run in runs.values():
        assert run["t"] >= cooldown["t"] + retry_after - 0.1
        assert run["retries"] == 0
    assert harness.deferrals()[second.id] >= 1


# -- canvas ---------------------------------------------------------------------------


def test_chain_of_rate_limited_tasks_survives_deferrals(harness: Harness) -> None:
    """A chain whose links are deferred by their rate limit still runs in order and gives the right result."""
    harness.start_worker("threads", concurrency=2)
    tenant = "chained"

    result = chain(
        harness.sig(config.STEP_TASK, 0, tenant, 1),
        harness.sig(config.STEP_TASK, tenant, 2),
        harness.sig(config.STEP_TASK, tenant, 3),
    ).apply_async()

    assert harness.get(result) == 123
    harness.wait_settled([result.id])
    runs = harness.runs(config.STEP_TASK)
    assert [(run["acc"], run["digit"]) for run in runs] == [(0, 1), (1, 2), (12, 3)]
    assert len({run["id"] for run in runs}) == 3
    deferrals = harness.deferrals()
    assert sum(deferrals[run["id"]] for run in runs) >= 2


def test_chord_over_rate_limited_tasks_calls_back_with_every_result(harness: Harness) -> None:
    """A chord whose header tasks are deferred calls its callback once, with all their results."""
    harness.start_worker("threads", concurrency=4)
    tenant = "fanned"

    result = chord([harness.sig(config.SQUARE_TASK, x, tenant) for x in range(1, 6)])(
        harness.sig(config.COLLECT_TASK)
    )

    assert harness.get(result) == [1, 4, 9, 16, 25]
    harness.wait_settled([result.id])
    squares = harness.runs(config.SQUARE_TASK)
    assert sorted(run["x"] for run in squares) == [1, 2, 3, 4, 5]
    assert len({run["id"] for run in squares}) == 5
    [callback] = harness.runs(config.COLLECT_TASK)
    assert sorted(callback["results"]) == [1, 4, 9, 16, 25]
    assert callback["t"] >= max(run["t"] for run in squares)
    deferrals = harness.deferrals()
    assert sum(deferrals[run["id"]] for run in squares) >= 4


# -- settings -------------------------------------------------------------------------


def test_settings_only_policy_rate_limits_an_undecorated_task(harness: Harness) -> None:
    """``limitpal_task_policies`` alone puts an undecorated task under its policy's rate limit."""
    harness.start_worker("prefork", concurrency=2)
    interval = 1 / config.SETTINGS_RATE

    results = [harness.send(config.PLAIN_TASK, "settings", n) for n in range(4)]

    assert [harness.get(r) for r in results] == [0, 1, 2, 3]
    harness.wait_settled(r.id for r in results)
    runs = harness.runs(config.PLAIN_TASK)
    started = {run["id"]: run["t"] for run in runs}
    times = [run["t"] for run in runs]
    assert times[-1] - times[0] >= 3 * interval * 0.9, times
    assert min(_gaps(times)) >= interval * 0.5, _gaps(times)
    assert {run["retries"] for run in runs} == {0}
    deferrals = harness.deferrals()
    assert [deferrals[r.id] > 0 for r in sorted(results, key=lambda r: started[r.id])] == [False] + [True] * 3


BAD_SETTINGS = [
    pytest.param(
        {"upstream": {**config.POLICIES["upstream"], "breaker": {"failure_rate_threshold": 150}}},
        "limitpal_policies.upstream.breaker.failure_rate_threshold",
        "150",
        id="threshold-150",
    ),
    pytest.param(
        {"upstream": {**config.POLICIES["upstream"], "colour": "red"}},
        "limitpal_policies.upstream.colour",
        "'red'",
        id="unknown-field",
    ),
]


@pytest.mark.parametrize("harness", REDIS_ONLY, indirect=True)
@pytest.mark.parametrize(("overrides", "setting", "value"), BAD_SETTINGS)
def test_bad_setting_stops_the_worker_naming_setting_and_value(
    harness: Harness, overrides: dict[str, Any], setting: str, value: str
) -> None:
    """A worker whose limitpal settings are invalid exits non-zero, naming the setting and the value."""
    worker = harness.start_worker("solo", overrides=overrides, wait_ready=False)

    harness.wait_until(
        lambda: worker.process.poll() is not None or worker.ready,
        WORKER_START_TIMEOUT,
        "the worker to exit (or to say it is ready)",
    )

    output = worker.output()
    assert not worker.ready, f"the worker started consuming despite the bad setting:\n{output}"
    assert worker.process.returncode != 0, output
    assert setting in output
    assert value in output


# -- acknowledgement ------------------------------------------------------------------


def test_acks_late_task_is_deferred_and_run_once_leaving_nothing_in_the_queue(harness: Harness) -> None:
    """An ``acks_late`` task is deferred, runs exactly once, and no delivery stays unacknowledged."""
    harness.start_worker("prefork", concurrency=2)

    results = [harness.send(config.LATE_TASK, "late", n) for n in range(3)]

    assert [harness.get(r) for r in results] == [0, 1, 2]
    harness.wait_settled(r.id for r in results)
    runs = harness.runs(config.LATE_TASK)
    assert sorted(run["id"] for run in runs) == sorted(r.id for r in results)
    started = {run["id"]: run["t"] for run in runs}
    deferrals = harness.deferrals()
    assert [deferrals[r.id] > 0 for r in sorted(results, key=lambda r: started[r.id])] == [False, True, True]
    assert harness.store.status("late:late").rates, "the key given to @resilient_task(key=...) is used"
    assert not harness.store.status("tenant:late").rates
    harness.stop_workers()
    assert harness.queue_size() == 0
