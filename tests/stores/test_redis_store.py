"""RedisStore specifics: round trips, scripts, TTLs, failures, the fail-fast guard, URLs, packaging.

The behaviour every store shares is the contract suite's (``test_contract_*.py``); this
module holds what only a Redis store has. Tests on the shared server use database 9;
tests that flush everything, pause, kill or count the server's commands start their own
``redis-server`` (:class:`LocalRedis`).
"""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import redis.cluster
from redis.commands.core import Script

from limitpal_tasks import (
    Breaker,
    Bulkhead,
    ConfigurationError,
    DeadLetter,
    Hooks,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    RetryBudget,
    RetryPolicy,
    StoreError,
    TaskContext,
    Ticket,
    Transition,
    store_from_url,
)
from limitpal_tasks.core.decisions import AdmitRequest
from limitpal_tasks.core.store import AdmitResult
from limitpal_tasks.stores.redis import RedisStore

from .redis_support import (
    CountingConnection,
    LocalRedis,
    ServerCheck,
    free_port,
    fresh_db,
    prefixed_keys,
    wait_until,
)
from .support import admitted, deferred

pytestmark = pytest.mark.redis

DB = 9
PREFIX = "rs"
SRC = Path(__file__).resolve().parents[2] / "src" / "limitpal_tasks"

# One key for every component: admit and record are one script call each.
SINGLE = Policy(
    "single",
    key="tenant:{tenant_id}",
    breaker=Breaker(minimum_calls=5, window=10),
    bulkhead=Bulkhead(10),
    rate=RateLimit("100/s", burst=10),
)
# A breaker on the service and a rate per tenant: two keys, still one call on a standalone server.
SPLIT = Policy(
    "split",
    key="tenant:{tenant_id}",
    breaker=Breaker(minimum_calls=5, window=10, key="service:x"),
    rate=RateLimit("100/s", burst=10, key="tenant:{tenant_id}"),
)


def context(tenant: str = "acme") -> TaskContext:
    return TaskContext("task", kwargs={"tenant_id": tenant})


def a_ticket(policy: Policy = SINGLE) -> Ticket:
    """A ticket as an admission hands it out (made on a MemoryStore, so no server is needed)."""
    return admitted(Pipeline(MemoryStore(), rng=random.Random(0)).admit(policy, context()))


class Recorder(Hooks):
    """Collects the transitions a pipeline reports."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def on_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def url(require_server: ServerCheck) -> str:
    """Database 9 of the shared server, emptied."""
    return fresh_db(require_server, DB)


@pytest.fixture
def store(url: str, clock: MockClock) -> Iterator[RedisStore]:
    """A store on database 9 whose scripts get their ``now`` from the test's clock."""
    store = RedisStore.from_url(url, prefix=PREFIX, clock=clock)
    yield store
    store.close()


@pytest.fixture
def server() -> Iterator[LocalRedis]:
    """A ``redis-server`` of this test's own, on a free loopback port."""
    with LocalRedis.running() as server:
        yield server


@pytest.fixture
def counter() -> type[CountingConnection]:
    """A connection class whose counts belong to this test only."""
    return type("TestConnection", (CountingConnection,), {})


def local_store(
    server: LocalRedis,
    clock: MockClock | None,
    connection_class: type[redis.Connection] = redis.Connection,
    batch_delay: float = 60.0,
) -> RedisStore:
    """A store on ``server``; batched successes wait for the next round trip (no timer fires)."""
    pool = redis.ConnectionPool(
        host="127.0.0.1",
        port=server.port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        connection_class=connection_class,
    )
    client = redis.Redis(connection_pool=pool)
    return RedisStore(client, prefix=PREFIX, clock=clock, batch_delay=batch_delay)


class ServerCounts:
    """What a server executed since the last :meth:`reset`: scripts run, scripts loaded."""

    def __init__(self, server: LocalRedis) -> None:
        self._admin = server.client()

    def reset(self) -> None:
        self._admin.config_resetstat()

    def calls(self, command: str) -> int:
        stats = cast(dict[str, dict[str, Any]], self._admin.info("commandstats"))
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    def scripts(self) -> tuple[int, int, int]:
        """(EVALSHA, EVAL, SCRIPT LOAD) calls."""
        return self.calls("evalsha"), self.calls("eval"), self.calls("script|load")


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [SINGLE, SPLIT], ids=["one-key", "two-keys"])
def test_admit_is_one_round_trip(
    server: LocalRedis, counter: type[CountingConnection], clock: MockClock, policy: Policy
) -> None:
    """An admit sends one command, and the server runs exactly one EVALSHA for it."""
    store = local_store(server, clock, counter)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    pipeline.record(admitted(pipeline.admit(policy, context())), Outcome.failure())  # loads the scripts
    counts = ServerCounts(server)
    counts.reset()
    counter.reset()

    admitted(pipeline.admit(policy, context()))

    assert (counter.sent, counts.scripts()) == (1, (1, 0, 0))


@pytest.mark.parametrize(
    ("policy", "outcome"),
    [(SINGLE, Outcome.success()), (SINGLE, Outcome.failure()), (SPLIT, Outcome.failure())],
    ids=["one-key-success", "one-key-failure", "two-keys-failure"],
)
def test_record_is_one_round_trip(
    server: LocalRedis,
    counter: type[CountingConnection],
    clock: MockClock,
    policy: Policy,
    outcome: Outcome,
) -> None:
    """A record that is not batched sends one command, and the server runs exactly one EVALSHA."""
    store = local_store(server, clock, counter)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    pipeline.record(admitted(pipeline.admit(policy, context())), Outcome.failure())  # loads the scripts
    ticket = admitted(pipeline.admit(policy, context()))
    counts = ServerCounts(server)
    counts.reset()
    counter.reset()

    pipeline.record(ticket, outcome)

    assert (counter.sent, counts.scripts()) == (1, (1, 0, 0))


def test_batched_success_rides_along_with_the_next_admit(
    server: LocalRedis, counter: type[CountingConnection], clock: MockClock
) -> None:
    """A batchable success costs no round trip of its own: the next admit carries it, still one EVALSHA."""
    store = local_store(server, clock, counter)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    pipeline.record(admitted(pipeline.admit(SPLIT, context())), Outcome.failure())  # loads the scripts
    ticket = admitted(pipeline.admit(SPLIT, context()))
    counts = ServerCounts(server)
    counts.reset()
    counter.reset()

    pipeline.record(ticket, Outcome.success())
    sent_by_record = counter.sent
    admitted(pipeline.admit(SPLIT, context("other")))
    window = server.client().hget(f"{PREFIX}:{{service:x}}:s", "tc")

    assert (sent_by_record, counter.sent, counts.scripts(), window) == (0, 1, (1, 0, 0), b"2")


# -- scripts ------------------------------------------------------------------------------


def test_scripts_are_reloaded_after_script_flush(server: LocalRedis, clock: MockClock) -> None:
    """After SCRIPT FLUSH the store reloads its scripts transparently, and the state is intact."""
    store = local_store(server, clock)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    policy = Policy("flush", key="k", rate="1/s")
    admitted(pipeline.admit(policy, context()))
    server.client().script_flush()
    counts = ServerCounts(server)
    counts.reset()

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "rate_limited"
    assert counts.calls("script|load") >= 1


def test_flushall_restarts_breakers_closed(server: LocalRedis, clock: MockClock) -> None:
    """After FLUSHALL an open breaker reads closed, admits again, and a stale ticket records harmlessly."""
    store = local_store(server, clock)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    policy = Policy("flushall", key="service:x", breaker=Breaker(minimum_calls=2, open_for=60))
    stale = admitted(pipeline.admit(policy, context()))
    for _ in range(2):
        pipeline.record(admitted(pipeline.admit(policy, context())), Outcome.failure())
    assert store.status("service:x").breaker == "open"

    server.client().flushall()

    assert store.status("service:x").breaker == "closed"
    assert not store.record(stale, Outcome.failure(), clock.now(), 0.5).recorded
    admitted(pipeline.admit(policy, context()))


# -- TTLs ---------------------------------------------------------------------------------


def test_every_key_written_carries_a_ttl(store: RedisStore, clock: MockClock) -> None:
    """After admits, records, probes, pauses, retries and dead letters, every key has a TTL."""
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    counted = Policy(
        "ttl",
        key="tenant:{tenant_id}",
        breaker=Breaker(minimum_calls=2, window=10, open_for=5, half_open_probes=2),
        bulkhead=Bulkhead(5),
        rate=RateLimit("10/s", burst=5),
        retry=RetryPolicy(budget=RetryBudget()),
    )
    timed = Policy("ttl-time", key="timed", breaker=Breaker(window_type="time", window=5, minimum_calls=10))
    admitted(pipeline.admit(counted, context("held")))  # a lease left in flight
    pipeline.record(admitted(pipeline.admit(counted, context("busy"))), Outcome.success())
    for _ in range(2):
        pipeline.record(admitted(pipeline.admit(counted, context("down"))), Outcome.failure())
    clock.advance(6)
    assert admitted(pipeline.admit(counted, context("down"))).probe  # a probe left in flight
    pipeline.record(admitted(pipeline.admit(timed, context())), Outcome.failure())
    pipeline.record(admitted(pipeline.admit(counted, context("cool"))), Outcome.cooldown(30))
    store.pause("tenant:paused", 120, "maintenance")
    pipeline.retry(counted, RuntimeError("boom"), 1, context("busy"))
    store.put_dead(DeadLetter(id="d1", task_name="task", reason="max_attempts", dead_at=clock.now()))
    store.flush()

    keys = prefixed_keys(cast(redis.Redis, store.client), PREFIX)
    ttls = {key: store.client.pttl(key) for key in keys}

    assert {key.rsplit(":", 1)[1] for key in keys} >= {"s", "l", "p", "w"}
    assert all(ttl > 0 for ttl in ttls.values()), {key: ttl for key, ttl in ttls.items() if ttl <= 0}


@pytest.mark.slow
def test_idle_keys_vanish(url: str) -> None:
    """With ``idle_ttl=1`` and one-second leases, every key is gone once both have passed."""
    store = RedisStore.from_url(url, prefix=PREFIX, idle_ttl=1)  # the server's clock, like production
    client = cast(redis.Redis, store.client)
    baseline = client.dbsize()
    pipeline = Pipeline(store, rng=random.Random(0))
    policy = Policy(
        "idle",
        key="tenant:{tenant_id}",
        breaker=Breaker(window_type="time", window=5, minimum_calls=100),
        bulkhead=Bulkhead(5),
        rate="50/s",
        lease=1,
    )
    for n in range(20):
        ticket = admitted(pipeline.admit(policy, context(f"t{n}")))
        if n % 2:
            pipeline.record(ticket, Outcome.failure())  # the others keep their lease until it expires
    store.pause("tenant:t0", 0.5, "maintenance")
    store.close()
    written = time.monotonic()
    longest = max(client.pttl(key) for key in prefixed_keys(client, PREFIX))

    # Redis expires keys in real time: wait out lease + idle_ttl (2 s), then give its
    # active expiry cycle a moment to reclaim them.
    time.sleep(max(0.0, written + 2.5 - time.monotonic()))
    wait_until(lambda: client.dbsize() == baseline, 5.0, f"DBSIZE back to {baseline}")

    assert 0 < longest <= 2000


def _admit_distinct_keys(url: str, first: int, stop: int) -> int:
    """Worker: admit one execution for each key in ``range(first, stop)`` (no record)."""
    store = RedisStore.from_url(url, prefix=PREFIX, idle_ttl=1, store_timeout=5.0)
    pipeline = Pipeline(store, rng=random.Random(first))
    policy = Policy("bulk", key="k:{n}", rate="10/s", lease=1)
    admitted_count = 0
    for n in range(first, stop):
        admitted_count += pipeline.admit(policy, TaskContext("task", kwargs={"n": n})).admitted
    store.close()
    return admitted_count


@pytest.mark.slow
def test_hundred_thousand_idle_keys_vanish(url: str) -> None:
    """100,000 distinct keys admitted once each with ``idle_ttl=1`` all expire: DBSIZE returns to baseline."""
    client = redis.Redis.from_url(url)
    baseline = client.dbsize()
    memory_before = client.info("memory")["used_memory"]
    total, workers = 100_000, 8
    ranges = [(url, i * total // workers, (i + 1) * total // workers) for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        admitted_count = sum(pool.starmap(_admit_distinct_keys, ranges))
    peak = client.dbsize()

    # Redis expires keys in real time: every key's TTL is lease + idle_ttl = 2 s.
    deadline = time.monotonic() + 60.0
    while client.dbsize() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    final = client.dbsize()
    memory_after = client.info("memory")["used_memory"]

    assert (admitted_count, final) == (total, baseline), (
        f"admitted {admitted_count}/{total}; DBSIZE baseline {baseline}, after admits {peak}, "
        f"now {final}; used_memory before {memory_before}, after {memory_after}"
    )


# -- failures -----------------------------------------------------------------------------


class _Capture(MemoryStore):
    """A MemoryStore that keeps the last request a pipeline sent it."""

    request: AdmitRequest | None = None

    def admit(self, request: AdmitRequest) -> AdmitResult:
        self.request = request
        return super().admit(request)


def a_request(policy: Policy = SINGLE) -> AdmitRequest:
    """An admit request as the pipeline builds it (no clock: the store uses its own)."""
    capture = _Capture()
    Pipeline(capture, rng=random.Random(0)).admit(policy, context())
    assert capture.request is not None
    return capture.request


Operation = Callable[[RedisStore], object]
OPERATIONS: dict[str, Operation] = {
    "admit": lambda store: store.admit(a_request()),
    "record": lambda store: store.record(a_ticket(), Outcome.failure(), None, 0.5),
    "spend_retry": lambda store: store.spend_retry("tenant:acme", RetryBudget(), None),
    "pause": lambda store: store.pause("tenant:acme", 5, "maintenance"),
    "resume": lambda store: store.resume("tenant:acme"),
    "reset": lambda store: store.reset("tenant:acme"),
    "force": lambda store: store.force("tenant:acme", "forced_open"),
    "status": lambda store: store.status("tenant:acme"),
    "put_dead": lambda store: store.put_dead(DeadLetter(id="d", task_name="task", reason="max_attempts")),
    "list_dead": lambda store: store.list_dead(),
    "take_dead": lambda store: store.take_dead("d"),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_unreachable_server_raises_store_error(operation: str) -> None:
    """A refused connection surfaces as StoreError, with redis-py's ConnectionError as its cause."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/{DB}", store_timeout=0.2)

    with pytest.raises(StoreError) as raised:
        OPERATIONS[operation](store)

    assert isinstance(raised.value.__cause__, redis.ConnectionError)


@pytest.mark.parametrize("operation", ["admit", "record", "status"])
def test_slow_server_raises_store_error_after_store_timeout(
    server: LocalRedis, clock: MockClock, operation: str
) -> None:
    """A server silent for longer than ``store_timeout`` surfaces as StoreError caused by a TimeoutError."""
    store = RedisStore.from_url(server.url(), prefix=PREFIX, clock=clock, store_timeout=0.1)
    store.admit(a_request())  # connected, scripts loaded
    server.client().client_pause(1000)  # every client's commands wait for a second
    started = time.monotonic()

    with pytest.raises(StoreError) as raised:
        OPERATIONS[operation](store)

    assert isinstance(raised.value.__cause__, redis.TimeoutError)
    assert time.monotonic() - started < 0.9  # gave up by itself, well before the pause ended


GARBLED: list[tuple[str, object]] = [
    ("admit", None),
    ("admit", b"garbage"),
    ("admit", []),
    ("admit", [b"1.5", [], [1, b"", b"0", b"not-a-generation", 0, 0, [], []]]),
    ("record", None),
    ("record", b"garbage"),
    ("record", [b"not-a-time", [1], []]),
    ("spend_retry", None),
    ("spend_retry", b"garbage"),
    ("reset", None),
    ("reset", [b"1.5", [[b"service:x"]]]),
    ("take_dead", b"{not json"),
]


@pytest.mark.parametrize(("operation", "reply"), GARBLED)
def test_garbled_reply_raises_store_error(
    monkeypatch: pytest.MonkeyPatch, operation: str, reply: object
) -> None:
    """A script reply of the wrong shape surfaces as StoreError, with the parsing error as its cause."""

    def garbage(self: Script, keys: Any = None, args: Any = None, client: Any = None) -> object:
        return reply

    monkeypatch.setattr(Script, "__call__", garbage)
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/{DB}")  # never reached

    with pytest.raises(StoreError) as raised:
        OPERATIONS[operation](store)

    assert raised.value.__cause__ is not None


def test_guard_fails_fast_after_three_failures(
    server: LocalRedis, counter: type[CountingConnection], clock: MockClock
) -> None:
    """After three failed calls the store fails the next ones at once, without touching the network."""
    store = local_store(server, clock, counter)
    store.admit(a_request())
    server.kill()
    for _ in range(3):
        with pytest.raises(StoreError) as failed:
            store.admit(a_request())
        assert isinstance(failed.value.__cause__, redis.ConnectionError)
    touched = (counter.sent, counter.connects)

    with pytest.raises(StoreError) as raised:
        store.admit(a_request())

    assert (counter.sent, counter.connects) == touched
    assert raised.value.__cause__ is None


def test_guard_lets_a_call_through_after_its_pause(
    server: LocalRedis, counter: type[CountingConnection], clock: MockClock
) -> None:
    """Once Redis is back, the guard keeps failing fast until its pause has passed, then recovers."""
    store = local_store(server, clock, counter)
    store.admit(a_request())
    server.kill()
    for _ in range(3):
        with pytest.raises(StoreError):
            store.admit(a_request())
    server.start()
    touched = (counter.sent, counter.connects)
    with pytest.raises(StoreError):
        store.admit(a_request())
    assert (counter.sent, counter.connects) == touched

    clock.advance(0.5)

    assert store.admit(a_request()).admitted
    assert store.admit(a_request()).admitted  # and stays recovered


def test_fail_open_admits_through_the_local_fallback(clock: MockClock) -> None:
    """With fail_mode="open" an unreachable store admits on the process's own state, which still limits."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/{DB}", clock=clock, store_timeout=0.2)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    policy = Policy("open", key="tenant:{tenant_id}", rate="1/s", fail_mode="open")

    first = admitted(pipeline.admit(policy, context()))
    second = deferred(pipeline.admit(policy, context()))

    assert (first.fallback, second.reason, pipeline.store_errors) == (True, "rate_limited", 2)


def test_fail_closed_defers_with_store_unavailable(clock: MockClock) -> None:
    """With fail_mode="closed" an unreachable store defers the execution with reason "store_unavailable"."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/{DB}", clock=clock, store_timeout=0.2)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    policy = Policy("closed", key="tenant:{tenant_id}", rate="1/s", fail_mode="closed")

    assert deferred(pipeline.admit(policy, context())).reason == "store_unavailable"


# -- transitions of batched successes ------------------------------------------------------


def test_a_batched_success_that_opens_the_breaker_reports_its_transition(
    store: RedisStore, clock: MockClock
) -> None:
    """A success bringing the window to minimum_calls at a failing rate opens the breaker, reported once."""
    recorder = Recorder()
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0), hooks=[recorder])
    policy = Policy("batched", key="service:x", breaker=Breaker(minimum_calls=3, window=10))
    tickets = [admitted(pipeline.admit(policy, context())) for _ in range(3)]
    pipeline.record(tickets[0], Outcome.failure())
    pipeline.record(tickets[1], Outcome.failure())

    pipeline.record(tickets[2], Outcome.success())  # 2 failures in 3 calls: 67 % >= 50 %

    assert store.status("service:x").breaker == "open"
    assert [(t.from_state, t.to_state) for t in recorder.transitions] == [("closed", "open")]


# -- URLs -----------------------------------------------------------------------------------


def test_store_from_url_builds_a_memory_store() -> None:
    """``memory://`` builds a MemoryStore."""
    assert isinstance(store_from_url("memory://?idle_ttl=60&max_keys=10"), MemoryStore)


def test_store_from_url_builds_a_working_redis_store(url: str) -> None:
    """``redis://host:port/db`` builds a RedisStore on that database, with the given prefix."""
    store = store_from_url(url, prefix="via-url")
    assert isinstance(store, RedisStore)

    admitted(Pipeline(store, rng=random.Random(0)).admit(SINGLE, context()))

    assert prefixed_keys(cast(redis.Redis, store.client), "via-url")
    store.close()


def test_store_from_url_passes_the_stores_own_options(url: str, clock: MockClock) -> None:
    """Options of the store itself (``batch_delay=0``: no batching) are honoured, not handed to redis-py."""
    store = store_from_url(url, prefix=PREFIX, clock=clock, batch_delay=0)
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))

    pipeline.record(admitted(pipeline.admit(SPLIT, context())), Outcome.success())

    assert redis.Redis.from_url(url).hget(f"{PREFIX}:{{service:x}}:s", "tc") == b"1"  # written at once
    store.close()


def test_store_from_url_passes_the_dead_letter_limit(url: str) -> None:
    """``dead_letter_limit`` given to ``store_from_url`` bounds the dead letter, not handed to redis-py."""
    store = store_from_url(url, prefix=PREFIX, dead_letter_limit=2)
    for n in range(3):
        store.put_dead(DeadLetter(id=f"d{n}", task_name="task", reason="max_attempts", dead_at=100.0 + n))

    assert [letter.id for letter in store.list_dead()] == ["d2", "d1"]
    store.close()


def test_rediss_url_configures_tls_and_the_acl_user() -> None:
    """``rediss://user:password@host:port/db`` builds a TLS client for that user and database."""
    store = RedisStore.from_url("rediss://alice:s3cret@cache.example.com:6380/3")
    pool = cast(redis.Redis, store.client).connection_pool
    options = pool.connection_kwargs

    assert pool.connection_class is redis.SSLConnection
    assert (options["host"], options["port"], options["db"]) == ("cache.example.com", 6380, 3)
    assert (options["username"], options["password"]) == ("alice", "s3cret")


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis://127.0.0.1:7000/0?cluster=true", True),
        ("redis://127.0.0.1:7000/0?cluster=true&health_check_interval=5", True),
        ("redis+cluster://127.0.0.1:7000", True),
        ("rediss+cluster://127.0.0.1:7000", True),
        ("redis://127.0.0.1:7000/0?cluster=false", False),
        ("redis://127.0.0.1:7000/0", False),
    ],
)
def test_cluster_urls_build_a_cluster_client(
    monkeypatch: pytest.MonkeyPatch, url: str, cluster: bool
) -> None:
    """``?cluster=true`` or ``redis+cluster://`` builds a RedisCluster client from the URL minus that flag."""
    built: list[str] = []
    fake = mock.create_autospec(redis.cluster.RedisCluster, instance=True)

    def from_url(url: str, **options: Any) -> redis.cluster.RedisCluster:
        built.append(url)
        return cast(redis.cluster.RedisCluster, fake)

    monkeypatch.setattr(redis.cluster.RedisCluster, "from_url", from_url)

    store = store_from_url(url)

    assert isinstance(store, RedisStore)
    assert (store.client is fake) == cluster
    if cluster:
        (seen,) = built
        assert "cluster" not in parse_qs(urlsplit(seen).query)
        assert urlsplit(seen).scheme == urlsplit(url).scheme.split("+")[0]
        assert urlsplit(seen).netloc == "127.0.0.1:7000"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:6379",
        "http://127.0.0.1:6379/0",
        "redis+sentinel://127.0.0.1:26379",
        "memory://?size=3",
        "memory://?idle_ttl=soon",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1:6379/notadb",
        "redis://127.0.0.1:6379/0?cluster=maybe",
    ],
)
def test_bad_store_url_raises_configuration_error(url: str) -> None:
    """A URL no store can use raises ConfigurationError naming ``store_url``."""
    with pytest.raises(ConfigurationError) as raised:
        store_from_url(url)

    assert raised.value.field == "store_url"
    assert "store_url" in str(raised.value)


def test_store_url_that_is_not_a_string_raises_configuration_error() -> None:
    """A store URL that is not a string raises ConfigurationError naming ``store_url``."""
    with pytest.raises(ConfigurationError) as raised:
        store_from_url(cast(Any, None))

    assert raised.value.field == "store_url"


# -- packaging ------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_ships_every_lua_script(tmp_path: Path) -> None:
    """The built wheel contains every ``stores/lua/*.lua`` file of the source tree."""
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path)],
        cwd=SRC.parents[1],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("limitpal_tasks-*.whl")
    expected = {f"limitpal_tasks/stores/lua/{path.name}" for path in (SRC / "stores" / "lua").glob("*.lua")}

    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())

    assert expected
    assert expected <= shipped, sorted(expected - shipped)
