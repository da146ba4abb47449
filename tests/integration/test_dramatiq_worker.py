"""The Dramatiq integration in real workers, on a Redis and on a RabbitMQ broker.

Every worker test spawns its own ``dramatiq`` worker processes
(``tests/integration/dramatiq_actors.py``) on a queue and a key prefix of its own, so
nothing it leaves behind reaches another test; the state store is the Redis server in
both cases. Actors and a recording middleware record what they saw in Redis (see
``dramatiq_actors``), and tests wait on those records with timeouts, never on fixed
sleeps. The tests at the end need no worker process: they check declaration and
settings errors, and run a ``dramatiq.Worker`` in-process on a ``StubBroker``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import dramatiq
import pytest
import redis
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Retries

from limitpal_tasks import (
    Breaker,
    ConfigurationError,
    DeadLetter,
    DeferPolicy,
    MemoryStore,
    Policy,
    RateLimit,
)
from limitpal_tasks.dramatiq import Cooldown, LimitpalMiddleware, install
from limitpal_tasks.integrations.dramatiq import ActorConfigurationError
from limitpal_tasks.stores.redis import RedisStore

from . import dramatiq_actors as actors

if TYPE_CHECKING:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.brokers.redis import RedisBroker

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
REDIS_BROKER = f"redis://{REDIS_HOST}:{REDIS_PORT}/4"
RABBITMQ_BROKER = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"
STORE_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/6"
ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "dramatiq"  # the RedisBroker's default key namespace

WORKER_START_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 20.0
SETTLE_TIMEOUT = 30.0
READY_LINE = "Worker process is ready for action."

ServerCheck = Callable[[str, str, int], None]

# The RabbitMQ runs need Redis too: it is their state store and where actors record.
BROKERS = [
    pytest.param(REDIS_BROKER, id="redis", marks=[pytest.mark.redis, pytest.mark.slow]),
    pytest.param(
        RABBITMQ_BROKER, id="rabbitmq", marks=[pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]
    ),
]

pytestmark = [pytest.mark.dramatiq]


def _in_ci() -> bool:
    """Whether the tests run in CI (the same test as ``require_server``'s)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_pika() -> None:
    """Skip (loudly) when pika, the client Dramatiq's ``RabbitmqBroker`` needs, is missing; fail in CI."""
    try:
        import pika  # type: ignore[import-untyped]  # pika ships no type information
    except ImportError:
        problem = "pika is not installed, so Dramatiq's RabbitmqBroker cannot run"
        if _in_ci():
            pytest.fail(
                f"{problem}; CI must run the RabbitMQ tests: add pika to the dev extras", pytrace=False
            )
        pytest.skip(f"SKIPPED ON PURPOSE - {problem}; pip install 'dramatiq[rabbitmq]' to run these tests")
    del pika


class Worker:
    """One spawned ``dramatiq`` command (main process plus worker processes), output to a log file."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, processes: int) -> None:
        self.process = process
        self.log = log
        self.processes = processes

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def ready(self) -> bool:
        return self.output().count(READY_LINE) >= self.processes

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM to the main process), then SIGKILL to its group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=WORKER_STOP_TIMEOUT)


class Harness:
    """A test's broker queue, key prefix, client broker, store and workers; cleaned up after it."""

    def __init__(self, broker_url: str, logs: Path) -> None:
        token = uuid.uuid4().hex[:12]
        self.broker_url = broker_url
        self.logs = logs
        self.queue = f"limitpal-dq-{token}"
        self.prefix = f"lpd-{token}"
        # A client broker without middleware: it only enqueues, as an application would.
        self.broker = actors.make_broker(broker_url, middleware=[])
        self.redis = redis.Redis.from_url(STORE_URL)
        self.store = RedisStore.from_url(STORE_URL, prefix=self.prefix)
        self.workers: list[Worker] = []

    @property
    def rabbitmq(self) -> bool:
        return self.broker_url.startswith("amqp")

    def rabbitmq_broker(self) -> RabbitmqBroker:
        """The client broker, on a RabbitMQ test (imports pika, so only there)."""
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        assert isinstance(self.broker, RabbitmqBroker)
        return self.broker

    def redis_broker(self) -> RedisBroker:
        """The client broker, on a Redis test."""
        from dramatiq.brokers.redis import RedisBroker

        assert isinstance(self.broker, RedisBroker)
        return self.broker

    def redis_broker_client(self) -> redis.Redis:
        """The Redis client of the client broker, on a Redis test."""
        client: redis.Redis = self.redis_broker().client
        return client

    # -- broker -----------------------------------------------------------------

    def prepare_queue(self) -> None:
        """Declare the test's queues on the server (RabbitMQ) and purge them."""
        if self.rabbitmq:
            self.rabbitmq_broker().declare_queue(self.queue, ensure=True)
        else:
            self.broker.declare_queue(self.queue)
        self.broker.flush(self.queue)

    def send(self, actor: str, *args: Any) -> str:
        """Enqueue a message for ``actor`` on the test's queue; its message id."""
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=self.queue, actor_name=actor, args=args, kwargs={}, options={}
        )
        self.broker.enqueue(message)
        return message.message_id

    def dlq_message_ids(self) -> list[str]:
        """The message ids in Dramatiq's own dead-letter queue of the test's queue (left in place)."""
        if self.rabbitmq:
            channel = self.rabbitmq_broker().channel
            ids = []
            while True:
                method, _, body = channel.basic_get(queue=f"{self.queue}.XQ", auto_ack=False)
                if method is None:
                    break
                ids.append(dramatiq.Message.decode(body).message_id)
            channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)  # put them back
            return ids
        client = self.redis_broker_client()
        xq = f"{NAMESPACE}:{self.queue}.XQ"
        raw = cast(list[bytes], client.hvals(f"{xq}.msgs"))
        assert int(client.zcard(xq)) == len(raw)
        return [dramatiq.Message.decode(body).message_id for body in raw]

    def dlq_size(self) -> int:
        """How many messages Dramatiq's dead-letter queue holds (RabbitMQ: ``<queue>.XQ``'s count)."""
        if self.rabbitmq:
            _, _, dead = self.rabbitmq_broker().get_queue_message_counts(self.queue)
            return int(dead)
        return int(self.redis_broker_client().zcard(f"{NAMESPACE}:{self.queue}.XQ"))

    # -- workers ----------------------------------------------------------------

    def start_worker(self, processes: int = 2, threads: int = 2) -> Worker:
        """Spawn ``dramatiq`` on the test's queue and wait until every worker process is ready."""
        index = len(self.workers)
        log = self.logs / f"worker-{index}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "LIMITPAL_TEST_BROKER": self.broker_url,
            "LIMITPAL_TEST_STORE": STORE_URL,
            "LIMITPAL_TEST_PREFIX": self.prefix,
            "LIMITPAL_TEST_QUEUE": self.queue,
        }
        command = [
            sys.executable,
            "-m",
            "dramatiq",
            "tests.integration.dramatiq_actors:broker",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--queues",
            self.queue,
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = Worker(process, log, processes)
        self.workers.append(worker)
        self.wait_until(
            lambda: worker.ready or worker.process.poll() is not None,
            WORKER_START_TIMEOUT,
            "the worker processes to start",
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

    # -- what the workers recorded ----------------------------------------------

    def records(self, kind: str) -> list[dict[str, Any]]:
        raw = cast(list[bytes], self.redis.lrange(actors.record_key(kind, self.prefix), 0, -1))
        return [json.loads(item) for item in raw]

    def runs(self, actor: str) -> list[dict[str, Any]]:
        """Executions of ``actor``'s body, in the order they started."""
        return sorted((r for r in self.records("runs") if r["actor"] == actor), key=lambda r: r["t"])

    def deliveries(self, message_id: str) -> list[dict[str, Any]]:
        """Every delivery of ``message_id`` a worker processed (deferred ones included), in order."""
        return [d for d in self.records("deliveries") if d["id"] == message_id]

    def outcomes(self, message_id: str) -> list[str]:
        """How each delivery of ``message_id`` ended: done, retried, failed, deferred or dead."""
        return [o["outcome"] for o in self.records("outcomes") if o["id"] == message_id]

    def deferrals(self) -> Counter[str]:
        """How many deliveries of each message the limitpal middleware deferred (skipped, requeued)."""
        return Counter(o["id"] for o in self.records("outcomes") if o["outcome"] == "deferred")

    def wait_settled(self, message_ids: Iterable[str], timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until the last delivery of each message finished: done, failed or dead."""
        pending = set(message_ids)

        def settled() -> bool:
            final = {o["id"] for o in self.records("outcomes") if o["outcome"] in ("done", "failed", "dead")}
            return pending <= final

        self.wait_until(settled, timeout, f"the last deliveries of {sorted(pending)} to finish")

    def dead_letters(self) -> list[DeadLetter]:
        return self.store.list_dead()

    # -- cleanup ----------------------------------------------------------------

    def close(self) -> None:
        try:
            self.stop_workers()
            names = [self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"]
            if self.rabbitmq:
                channel = self.rabbitmq_broker().channel
                for name in names:
                    channel.queue_delete(queue=name)
            else:
                client = self.redis_broker_client()
                keys = [f"{NAMESPACE}:{n}{suffix}" for n in names for suffix in ("", ".msgs")]
                # Every broker command (the client's enqueues too) leaves a heartbeat; workers leave acks.
                broker_ids = [w["broker_id"] for w in self.records("workers")]
                broker_ids.append(self.redis_broker().broker_id)
                for broker_id in broker_ids:
                    keys.extend(client.scan_iter(match=f"{NAMESPACE}:__acks__.{broker_id}.*"))
                    client.zrem(f"{NAMESPACE}:__heartbeats__", broker_id)
                client.delete(*keys)
        finally:
            keys = list(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                self.redis.delete(*keys)
            self.store.close()
            self.redis.close()
            self.broker.close()


@pytest.fixture(params=BROKERS)
def harness(request: pytest.FixtureRequest, require_server: ServerCheck, tmp_path: Path) -> Iterator[Harness]:
    """A fresh queue and key prefix on the broker of ``request.param``; workers stopped afterwards."""
    broker_url: str = request.param
    require_server("redis", REDIS_HOST, REDIS_PORT)
    if broker_url.startswith("amqp"):
        require_server("rabbitmq", RABBITMQ_HOST, RABBITMQ_PORT)
        require_pika()
    harness = Harness(broker_url, tmp_path)
    try:
        harness.prepare_queue()
        yield harness
    finally:
        harness.close()


def _gaps(times: list[float], step: int = 1) -> list[float]:
    """The time from each of ``times`` to the one ``step`` places later."""
    return [later - earlier for earlier, later in zip(times, times[step:])]


# -- admission ----------------------------------------------------------------------


def test_admitted_messages_run_once_each_undeferred(harness: Harness) -> None:
    """Messages the pipeline admits run once each, undeferred, across two worker processes."""
    harness.start_worker(processes=2, threads=2)

    ids = [harness.send(actors.UPSTREAM_ACTOR, "inventory", n) for n in range(4)]

    harness.wait_settled(ids)
    runs = harness.runs(actors.UPSTREAM_ACTOR)
    assert sorted(run["id"] for run in runs) == sorted(ids)
    assert sorted(run["n"] for run in runs) == [0, 1, 2, 3]
    assert [(run["retries"], run["header"]) for run in runs] == [(0, None)] * 4
    assert {i: harness.outcomes(i) for i in ids} == {i: ["done"] for i in ids}
    harness.wait_until(
        lambda: harness.store.status("service:inventory").calls == 4, 5, "the breaker to count 4 calls"
    )
    assert harness.dead_letters() == []


# -- circuit breaker ------------------------------------------------------------------


def test_open_breaker_defers_without_spending_retries_until_it_is_reset(harness: Harness) -> None:
    """An open breaker defers every message (same message id, retries 0) until it is reset; then all run."""
    key = "service:payments"
    harness.store.force(key, "forced_open")
    assert harness.store.status(key).breaker == "forced_open"
    harness.start_worker(processes=2, threads=2)

    ids = [harness.send(actors.UPSTREAM_ACTOR, "payments", n) for n in range(3)]
    harness.wait_until(
        lambda: all(harness.deferrals()[i] >= 2 for i in ids), 20, "every message to be deferred twice"
    )
    assert harness.runs(actors.UPSTREAM_ACTOR) == []

    harness.store.reset(key)

    harness.wait_settled(ids)
    runs = harness.runs(actors.UPSTREAM_ACTOR)
    assert sorted(run["id"] for run in runs) == sorted(ids)
    for run in runs:
        assert run["retries"] == 0
        assert run["header"]["deferrals"] >= 2
        assert isinstance(run["header"]["first_seen"], float)
    for message_id in ids:
        deliveries = harness.deliveries(message_id)
        assert len(deliveries) >= 3
        assert {d["retries"] for d in deliveries} == {0}
        first_seen = {d["header"]["first_seen"] for d in deliveries if d["header"]}
        assert len(first_seen) == 1, f"first_seen changed across deferrals: {first_seen}"
        outcomes = harness.outcomes(message_id)
        assert outcomes[-1] == "done"
        assert set(outcomes[:-1]) == {"deferred"}
    # Every delivery a worker processed carried one of the ids the client got at enqueue.
    assert {d["id"] for d in harness.records("deliveries")} == set(ids)
    assert harness.store.status(key).breaker == "closed"
    assert harness.dead_letters() == []


# -- rate limits ----------------------------------------------------------------------


def test_tenant_over_its_rate_is_deferred_while_another_tenant_runs_at_once(harness: Harness) -> None:
    """A flooding tenant drains at its rate through deferrals; a quiet tenant's first message runs at once."""
    harness.start_worker(processes=2, threads=2)
    interval = 1 / actors.TENANT_RATE

    flood = [harness.send(actors.TENANT_ACTOR, "flood", n) for n in range(10)]
    quiet = [harness.send(actors.TENANT_ACTOR, "quiet", n) for n in range(2)]

    harness.wait_settled(flood + quiet)
    runs = harness.runs(actors.TENANT_ACTOR)
    assert sorted(run["id"] for run in runs) == sorted(flood + quiet)
    started = {run["id"]: run["t"] for run in runs}
    flood_times = sorted(started[i] for i in flood)
    quiet_times = sorted(started[i] for i in quiet)
    assert flood_times[-1] - flood_times[0] >= 9 * interval * 0.9, flood_times
    # Returns that come back late from the delay queue may run in pairs (the execution schedule
    # gives late returns one interval of slack), never three within one interval.
    assert min(_gaps(flood_times, 2)) >= interval * 0.9, _gaps(flood_times)
    # The quiet tenant is not queued behind the flood: it starts before the flood's second run.
    assert quiet_times[0] < flood_times[1], (flood_times, quiet_times)
    deferrals = harness.deferrals()
    assert [deferrals[i] > 0 for i in sorted(flood, key=started.__getitem__)] == [False] + [True] * 9
    assert [deferrals[i] > 0 for i in sorted(quiet, key=started.__getitem__)] == [False, True]
    assert {run["retries"] for run in runs} == {0}
    # Each deferred message was booked a slot once and admitted for it (late returns may wait an
    # uncounted hop for the execution schedule, which does not add a deferral).
    booked = [run["header"] for run in runs if run["header"] is not None]
    assert len(booked) == 10
    assert {header["deferrals"] for header in booked} == {1}
    assert all(len(header["reservations"]) == 1 for header in booked), booked
    assert harness.store.status("tenant:flood").rates, "the key given as limitpal_key is used"
    assert not harness.store.status("tenant_rate").rates


# -- deferral limit -------------------------------------------------------------------


def test_deferral_limit_dead_letters_the_message_in_the_store_and_in_dramatiqs_dlq(harness: Harness) -> None:
    """After max_deferrals the message is dead-lettered ("max_deferrals") and lands in Dramatiq's XQ."""
    key = "service:ledger"
    harness.store.force(key, "forced_open")
    harness.start_worker(processes=1, threads=1)

    message_id = harness.send(actors.STRICT_ACTOR, "ledger", 1)

    harness.wait_settled([message_id])
    harness.wait_until(lambda: harness.dlq_size() == 1, 10, "the message to reach Dramatiq's XQ")
    assert harness.dlq_message_ids() == [message_id]
    letters = harness.dead_letters()
    assert [(d.id, d.reason, d.task_name, d.key, d.args, d.deferrals, d.attempts) for d in letters] == [
        (message_id, "max_deferrals", actors.STRICT_ACTOR, key, ("ledger", 1), 2, 1)
    ]
    assert harness.runs(actors.STRICT_ACTOR) == []
    assert harness.outcomes(message_id) == ["deferred", "deferred", "dead"]
    assert {d["retries"] for d in harness.deliveries(message_id)} == {0}


# -- retries --------------------------------------------------------------------------


def test_retries_follow_the_policy_then_the_message_is_dead_lettered(harness: Harness) -> None:
    """An always-failing actor runs max_attempts times (retries 0, 1, 2), then is dead-lettered twice over."""
    harness.start_worker(processes=1, threads=2)

    message_id = harness.send(actors.DOOMED_ACTOR, "nightly")

    harness.wait_settled([message_id])
    runs = harness.runs(actors.DOOMED_ACTOR)
    assert [(run["id"], run["retries"]) for run in runs] == [(message_id, r) for r in range(3)]
    # The policy's backoff (0.1 s), not Retries' default (15 s), between attempts.
    assert all(0.1 * 0.9 <= gap < 10 for gap in _gaps([run["t"] for run in runs])), _gaps(
        [run["t"] for run in runs]
    )
    assert harness.outcomes(message_id) == ["retried", "retried", "failed"]
    assert harness.deferrals() == Counter()
    letters = harness.dead_letters()
    assert [(d.id, d.reason, d.attempts, d.key, d.task_name) for d in letters] == [
        (message_id, "max_attempts", actors.DOOMED_ATTEMPTS, "job:nightly", actors.DOOMED_ACTOR)
    ]
    assert "RuntimeError" in letters[0].error
    harness.wait_until(lambda: harness.dlq_size() == 1, 10, "the message to reach Dramatiq's XQ")
    assert harness.dlq_message_ids() == [message_id]


def test_deferral_then_a_retry_keeps_first_seen_and_spends_one_retry(harness: Harness) -> None:
    """A message deferred by an open breaker, then failing once, is retried once and keeps its first_seen."""
    key = "service:archive"
    harness.store.force(key, "forced_open")
    harness.redis.set(actors.health_key("archive", harness.prefix), "flaky")
    harness.start_worker(processes=1, threads=2)

    message_id = harness.send(actors.UPSTREAM_ACTOR, "archive", 1)
    harness.wait_until(lambda: harness.deferrals()[message_id] >= 1, 15, "the message to be deferred")
    harness.store.reset(key)

    harness.wait_settled([message_id])
    runs = harness.runs(actors.UPSTREAM_ACTOR)
    assert [run["retries"] for run in runs] == [0, 1]
    first_seen = runs[0]["header"]["first_seen"]
    assert (runs[1]["header"] or {}).get("first_seen") == first_seen, runs[1]["header"]
    outcomes = harness.outcomes(message_id)
    assert outcomes[-2:] == ["retried", "done"]
    assert set(outcomes[:-2]) == {"deferred"}
    assert harness.dead_letters() == []
    assert harness.dlq_size() == 0


# -- cooldown -------------------------------------------------------------------------


def test_cooldown_pauses_the_key_fleet_wide_then_the_message_completes(harness: Harness) -> None:
    """``Cooldown(retry_after)`` pauses the key fleet-wide and defers the message without spending a retry."""
    retry_after = 2.0
    harness.start_worker(processes=2, threads=2)

    first = harness.send(actors.PARTNER_ACTOR, "acme", 1, retry_after)
    harness.wait_until(lambda: bool(harness.outcomes(first)), 15, "the cooldown to end the first delivery")
    [cooldown] = harness.records("cooldowns")
    assert cooldown["id"] == first
    status = harness.store.status("partner:acme")
    assert status.pause_reason == "cooldown"
    assert status.paused_until is not None
    assert status.paused_until - cooldown["t"] == pytest.approx(retry_after, abs=0.5)
    second = harness.send(actors.PARTNER_ACTOR, "acme", 2, retry_after)

    harness.wait_settled([first, second])
    runs = {run["id"]: run for run in harness.runs(actors.PARTNER_ACTOR)}
    assert sorted(runs) == sorted([first, second])
    for run in runs.values():
        assert run["t"] >= cooldown["t"] + retry_after - 0.1
        assert run["retries"] == 0
    assert runs[first]["header"]["deferrals"] >= 1
    assert harness.deferrals()[second] >= 1
    for message_id in (first, second):
        assert {d["retries"] for d in harness.deliveries(message_id)} == {0}
    assert harness.dead_letters() == []
    assert harness.dlq_size() == 0


# -- settings -------------------------------------------------------------------------


def test_settings_only_policy_rate_limits_an_actor_declared_without_options(harness: Harness) -> None:
    """``limitpal_task_policies`` alone puts an actor without limitpal options under its policy's rate."""
    harness.start_worker(processes=2, threads=2)
    interval = 1 / actors.SETTINGS_RATE

    ids = [harness.send(actors.PLAIN_ACTOR, "settings", n) for n in range(4)]

    harness.wait_settled(ids)
    runs = harness.runs(actors.PLAIN_ACTOR)
    assert sorted(run["id"] for run in runs) == sorted(ids)
    started = {run["id"]: run["t"] for run in runs}
    deferrals = harness.deferrals()
    assert [deferrals[i] > 0 for i in sorted(ids, key=started.__getitem__)] == [False, True, True, True], (
        "limitpal_task_policies did not put the actor under its policy"
    )
    times = sorted(started.values())
    assert times[-1] - times[0] >= 3 * interval * 0.9, times
    assert {run["retries"] for run in runs} == {0}
    assert harness.store.status("tenant:settings").rates


# -- declaration and settings (in-process, no worker) -----------------------------------


def _stub_broker(**policies: Policy) -> tuple[StubBroker, LimitpalMiddleware]:
    """A ``StubBroker`` with ``CurrentMessage`` and the middleware (on a memory store) installed."""
    broker = StubBroker()
    broker.add_middleware(CurrentMessage())
    middleware = install(broker, LimitpalMiddleware(store=MemoryStore(), policies=policies))
    return broker, middleware


def _charge(customer_id: str, amount: int) -> None:
    """An actor body whose parameters are ``customer_id`` and ``amount``."""


@pytest.mark.parametrize(
    ("policy", "options"),
    [
        pytest.param(Policy("api", rate="5/s"), {"limitpal_key": "tenant:{tenant_id}"}, id="limitpal_key"),
        pytest.param(Policy("api", key="tenant:{tenant_id}", rate="5/s"), {}, id="policy-key"),
        pytest.param(
            Policy("api", key="customer:{customer_id}", breaker=Breaker(key="region:{region}")),
            {},
            id="component-key",
        ),
    ],
)
def test_key_template_naming_a_missing_parameter_fails_at_declaration(
    policy: Policy, options: dict[str, Any]
) -> None:
    """Declaring an actor whose key template names a parameter it lacks raises ActorConfigurationError."""
    broker, _ = _stub_broker(api=policy)

    with pytest.raises(ActorConfigurationError) as raised:
        dramatiq.actor(broker=broker, actor_name="charge", limitpal_policy="api", **options)(_charge)

    assert isinstance(raised.value, ConfigurationError)
    assert "policy 'api'" in raised.value.field
    assert "charge" not in broker.actors


def test_unknown_policy_name_fails_at_declaration() -> None:
    """An actor naming a policy the middleware does not know fails when it is declared."""
    broker, _ = _stub_broker(api=Policy("api", rate="5/s"))

    with pytest.raises(ActorConfigurationError, match="limitpal_policy") as raised:
        dramatiq.actor(broker=broker, actor_name="charge", limitpal_policy="payments")(_charge)

    assert raised.value.value == "payments"
    assert "charge" not in broker.actors


def test_unknown_actor_option_fails_as_dramatiq_fails_it() -> None:
    """A misspelt actor option fails with Dramatiq's own error, with and without the middleware installed."""
    plain = StubBroker()
    with pytest.raises(ValueError, match="actor options are undefined") as without:
        dramatiq.actor(broker=plain, limitpal_polcy="api")(_charge)
    broker, _ = _stub_broker(api=Policy("api", rate="5/s"))

    with pytest.raises(ValueError, match="actor options are undefined") as raised:
        dramatiq.actor(broker=broker, limitpal_polcy="api")(_charge)

    assert type(raised.value) is type(without.value)
    assert str(raised.value) == str(without.value)
    assert not isinstance(raised.value, ConfigurationError)


def test_install_places_the_middleware_right_after_retries() -> None:
    """``install`` adds the middleware just after ``Retries``, so its after-hooks run before Retries'."""
    broker = StubBroker()
    middleware = install(broker, LimitpalMiddleware())

    kinds = [type(m) for m in broker.middleware]
    assert kinds.index(LimitpalMiddleware) == kinds.index(Retries) + 1
    assert broker.middleware[kinds.index(LimitpalMiddleware)] is middleware
    assert {"limitpal_policy", "limitpal_key"} <= broker.actor_options


BAD_SETTINGS = [
    pytest.param(
        {"upstream": {**actors.POLICIES["upstream"], "breaker": {"failure_rate_threshold": 150}}},
        "limitpal_policies.upstream.breaker.failure_rate_threshold",
        "150",
        id="threshold-150",
    ),
    pytest.param(
        {"upstream": {**actors.POLICIES["upstream"], "colour": "red"}},
        "limitpal_policies.upstream.colour",
        "'red'",
        id="unknown-field",
    ),
    pytest.param(
        {"partner": {"key": "partner:{partner}", "retry": {"max_attempts": 0}}},
        "limitpal_policies.partner.retry.max_attempts",
        "0",
        id="zero-attempts",
    ),
]


@pytest.mark.parametrize(("overrides", "setting", "value"), BAD_SETTINGS)
def test_from_settings_rejects_a_bad_setting_naming_it_and_its_value(
    overrides: dict[str, Any], setting: str, value: str
) -> None:
    """``from_settings`` with an invalid policy raises ConfigurationError naming the setting and the value."""
    settings = {**actors.SETTINGS, "limitpal_policies": {**actors.POLICIES, **overrides}}

    with pytest.raises(ConfigurationError) as raised:
        LimitpalMiddleware.from_settings(settings)

    assert raised.value.field == setting
    assert str(raised.value).startswith(f"{setting}: ")
    assert str(raised.value).endswith(f"got {value}")


def test_from_env_reads_the_store_url_and_a_json_policies_file(tmp_path: Path) -> None:
    """``from_env`` builds the middleware from LIMITPAL_STORE_URL and the JSON of LIMITPAL_POLICIES_FILE."""
    path = tmp_path / "policies.json"
    policies = {"api": {"key": "tenant:{tenant_id}", "rate": "3/s", "retry": {"max_attempts": 4}}}
    path.write_text(json.dumps(policies))
    environ = {
        "LIMITPAL_STORE_URL": "memory://",
        "LIMITPAL_POLICIES_FILE": str(path),
        "LIMITPAL_FAIL_MODE": "closed",
        "LIMITPAL_KEY_PREFIX": "from-env",
    }

    middleware = LimitpalMiddleware.from_env(environ)

    settings = middleware.runtime.settings
    assert (settings.store_url, settings.fail_mode) == ("memory://", "closed")
    assert settings.key_prefix == "from-env"
    policy = middleware.runtime.policies["api"]
    assert policy.key.source == "tenant:{tenant_id}"
    assert [(r.rate.limit, r.rate.per) for r in policy.rates] == [(3, 1.0)]
    assert policy.retry is not None
    assert policy.retry.max_attempts == 4
    assert policy.fail_mode == "closed"
    broker = StubBroker()
    install(broker, middleware)
    dramatiq.actor(broker=broker, actor_name="charge", limitpal_policy="api")(_tenant_charge)
    assert "charge" in broker.actors


def _tenant_charge(tenant_id: str, amount: int) -> None:
    """An actor body keyed by ``tenant_id``."""


@pytest.mark.parametrize("content", [None, "{not json"], ids=["missing", "malformed"])
def test_from_env_rejects_an_unreadable_policies_file(tmp_path: Path, content: str | None) -> None:
    """A missing or malformed LIMITPAL_POLICIES_FILE raises ConfigurationError naming the variable."""
    path = tmp_path / "policies.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(ConfigurationError) as raised:
        LimitpalMiddleware.from_env({"LIMITPAL_POLICIES_FILE": str(path)})

    assert raised.value.field == "LIMITPAL_POLICIES_FILE"
    assert raised.value.value == str(path)


# -- in-process worker on a StubBroker ------------------------------------------------


def test_stub_worker_defers_and_the_result_is_found_under_the_same_message_id() -> None:
    """On a StubBroker, a deferred message runs later under its message id, and Results returns its value."""
    from dramatiq.results import Results
    from dramatiq.results.backends import StubBackend

    broker, _ = _stub_broker(quick=Policy("quick", key="tenant:{tenant_id}", rate=RateLimit("5/s")))
    backend = StubBackend()
    broker.add_middleware(Results(backend=backend))  # type: ignore[no-untyped-call]  # unannotated
    seen: list[tuple[str, Any, int]] = []

    def square(tenant_id: str, x: int) -> int:
        message = CurrentMessage.get_current_message()
        assert message is not None
        seen.append((message.message_id, message.options.get("limitpal"), message.options.get("retries", 0)))
        return x * x

    actor = dramatiq.actor(broker=broker, actor_name="square", limitpal_policy="quick", store_results=True)(
        square
    )
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        messages = [actor.send("acme", x) for x in (2, 3)]
        results = [m.get_result(backend=backend, block=True, timeout=10_000) for m in messages]
        broker.join(actor.queue_name, timeout=10_000)
        worker.join()
    finally:
        worker.stop()

    assert sorted(message_id for message_id, _, _ in seen) == sorted(m.message_id for m in messages)
    headers = sorted((header or {}).get("deferrals", 0) for _, header, _ in seen)
    assert headers == [0, 1], seen
    assert {retries for _, _, retries in seen} == {0}
    # What the caller holds from send() must give the value of the run, not of a deferred delivery.
    assert results == [4, 9]


def test_stub_worker_dead_letters_a_cooldown_past_the_deferral_limit() -> None:
    """A ``Cooldown`` past max_deferrals pauses the key, is dead-lettered and fails into Dramatiq's DLQ."""
    policy = Policy("partner", key="partner:{partner}", defer=DeferPolicy(max_deferrals=0))
    broker, middleware = _stub_broker(partner=policy)
    runs: list[str] = []

    def call(partner: str) -> None:
        message = CurrentMessage.get_current_message()
        assert message is not None
        runs.append(message.message_id)
        raise Cooldown(retry_after=30)

    actor = dramatiq.actor(broker=broker, actor_name="call", limitpal_policy="partner")(call)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        message = actor.send("acme")
        broker.join(actor.queue_name, timeout=10_000, fail_fast=False)
        worker.join()
    finally:
        worker.stop()

    assert runs == [message.message_id]
    assert [m.message_id for m in broker.dead_letters] == [message.message_id]
    letters = middleware.runtime.store.list_dead()
    assert [(d.id, d.reason, d.key, d.task_name) for d in letters] == [
        (message.message_id, "max_deferrals", "partner:acme", "call")
    ]
    assert middleware.runtime.store.status("partner:acme").pause_reason == "cooldown"


def test_stub_worker_defers_an_asyncio_actor_and_runs_it_later() -> None:
    """An ``async def`` actor (AsyncIO middleware) is deferred by its rate limit, then runs once."""
    from dramatiq.middleware import AsyncIO

    broker, _ = _stub_broker(quick=Policy("quick", key="tenant:{tenant_id}", rate=RateLimit("5/s")))
    broker.add_middleware(AsyncIO())
    seen: list[tuple[str, int]] = []

    async def ping(tenant_id: str, n: int) -> None:
        message = CurrentMessage.get_current_message()
        assert message is not None
        seen.append((message.message_id, (message.options.get("limitpal") or {}).get("deferrals", 0)))

    actor = dramatiq.actor(broker=broker, actor_name="ping", limitpal_policy="quick")(ping)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        messages = [actor.send("acme", n) for n in range(2)]
        broker.join(actor.queue_name, timeout=10_000)
        worker.join()
    finally:
        worker.stop()

    assert sorted(message_id for message_id, _ in seen) == sorted(m.message_id for m in messages)
    assert sorted(deferrals for _, deferrals in seen) == [0, 1]
