"""Deferral parking in real workers: restarts, a broker restart, a killed releaser, pacing, a full park.

Every test spawns its own workers (``parking_celery_app`` / ``parking_dramatiq_app``) on a
queue and a key prefix of its own; the store is database 3 of the shared Redis (the Redis
broker too, except in the broker-restart test, which brings its own ``redis-server``).
Tasks are deferred by forcing their breaker open (``RedisStore.force``) and parked by the
policy's ``DeferPolicy(transport="park")`` (or the worker setting
``limitpal_defer_transport``). Workers record runs, delivery outcomes and every message
their releaser publishes in Redis; tests wait on those records with deadlines, and fail
at once when a releaser logs a publish that failed for another reason than an outage
the test caused (``ParkingHarness.check_publishes``).

1. a worker restart: parked tasks are acknowledged and held by the store alone;
2. a Redis broker restart (the broker comes back empty): nothing parked is lost;
3. 300 tasks due at once, four releasing worker processes, one SIGKILLed mid-batch;
4. one key's releases keep parking order and its rate; another key is not held back;
5. a full park dead-letters the next deferral (``park_full``) and drops nothing.

The ``xfail(strict=True)`` marks name library bugs these tests found.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest

from .parking_common import tenant_key
from .parking_harness import (
    RABBITMQ,
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    REDIS_HOST,
    REDIS_PORT,
    SHARED_REDIS,
    Framework,
    OwnRedis,
    ParkingHarness,
    WorkerProcess,
    parking_harness,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CELERY = [pytest.mark.celery]
DRAMATIQ = [pytest.mark.dramatiq]
RABBIT = [pytest.mark.rabbitmq]

ALL_BROKERS = [
    pytest.param(("celery", SHARED_REDIS), id="celery-redis", marks=CELERY),
    pytest.param(("celery", RABBITMQ["celery"]), id="celery-rabbitmq", marks=CELERY + RABBIT),
    pytest.param(("dramatiq", SHARED_REDIS), id="dramatiq-redis", marks=DRAMATIQ),
    pytest.param(("dramatiq", RABBITMQ["dramatiq"]), id="dramatiq-rabbitmq", marks=DRAMATIQ + RABBIT),
]
FRAMEWORKS = [
    pytest.param("celery", id="celery", marks=CELERY),
    pytest.param("dramatiq", id="dramatiq", marks=DRAMATIQ),
]
FRAMEWORKS_OWN_XFAIL = [  # for tests that are xfail for a bug of their own, on both
    pytest.param("celery", id="celery", marks=[pytest.mark.celery]),
    pytest.param("dramatiq", id="dramatiq", marks=DRAMATIQ),
]


ServerCheck = Callable[[str, str, int], None]


def _require_servers(require_server: ServerCheck, framework: Framework, broker_url: str) -> None:
    require_server("redis", REDIS_HOST, REDIS_PORT)
    if broker_url.startswith("amqp"):
        require_server("rabbitmq", RABBITMQ_HOST, RABBITMQ_PORT)
        if framework == "dramatiq":
            pytest.importorskip("pika")  # Dramatiq's RabbitmqBroker client


@pytest.fixture(params=ALL_BROKERS)
def harness(
    request: pytest.FixtureRequest, require_server: ServerCheck, tmp_path: Path
) -> Iterator[ParkingHarness]:
    """A fresh queue and key prefix on the broker of ``request.param``; workers stopped afterwards."""
    framework: Framework
    framework, broker_url = request.param
    _require_servers(require_server, framework, broker_url)
    with parking_harness(framework, broker_url, tmp_path) as found:
        yield found


# -- 1. a worker restart ----------------------------------------------------------------------------

RESTART_OPEN_FOR = 5.0
"""How long the forced-open breaker defers: no parked task comes due before the first worker stopped."""


def test_parked_tasks_survive_a_worker_restart(harness: ParkingHarness) -> None:
    """Parked tasks are acknowledged and live only in the store; a new worker releases and runs each once."""
    key = tenant_key("acme")
    harness.store.force(key, "forced_open")
    config = harness.config(open_for=RESTART_OPEN_FOR, open_spread=0.5)
    first = harness.start_worker(config)

    ids = harness.send_many("acme", 10)
    harness.wait_parked(ids)
    first.stop()

    assert harness.records("releases") == [], "a parked task came due while the first worker ran"
    assert harness.broker_messages() == 0
    assert sorted(harness.parked_ids()) == sorted(ids)
    assert [(s.key, s.count) for s in harness.parked()] == [(key, 10)]
    assert harness.records("runs") == []

    harness.store.reset(key)
    harness.start_worker(config)

    harness.wait_ran(ids, RESTART_OPEN_FOR + 20)
    harness.wait_until(lambda: harness.parked_count() == 0, 10, "the park to be empty")
    harness.stop_workers()  # a warm shutdown: every delivery acknowledged
    assert harness.broker_messages() == 0
    assert harness.run_counts() == dict.fromkeys(ids, 1)
    assert sorted(r["id"] for r in harness.records("releases")) == sorted(ids)


def _failed_publishes(worker: WorkerProcess) -> Counter[str]:
    """How many times the worker's releaser logged a failed publish, by parked entry id."""
    return Counter(re.findall(r"could not publish parked \S+ (\d+)", worker.output()))


# -- 2. a Redis broker restart ----------------------------------------------------------------------

LEASE = 3.0
"""The releasers' claim in the tests that wait one out (the library's default is 30 s)."""


@pytest.mark.parametrize(
    ("framework", "releasers"),
    [
        pytest.param("celery", 1, id="celery-1-releaser", marks=CELERY),
        pytest.param(
            "celery",
            2,
            id="celery-2-releasers",
            marks=CELERY,
        ),
        pytest.param("dramatiq", 2, id="dramatiq-2-releasers", marks=DRAMATIQ),
    ],
)
def test_parked_tasks_survive_a_redis_broker_restart(
    framework: Framework, releasers: int, require_server: ServerCheck, tmp_path: Path
) -> None:
    """The broker dies (and comes back empty) while tasks are parked and due: each still runs once.

    The broker is a ``redis-server`` of the test's own; the store (database 3 of the shared
    Redis) is untouched. The parked tasks are made due while the broker is down, so the
    releasers' publishes fail, and the entries wait out their claims in the park (the
    broker is started again once every releaser failed at least once). The workers stay up
    throughout: they hold no unacknowledged deferred messages that a lost connection strands.
    """
    require_server("redis", REDIS_HOST, REDIS_PORT)
    with (
        OwnRedis.running(tmp_path) as broker,
        parking_harness(framework, broker.url(), tmp_path) as harness,
    ):
        key = tenant_key("acme")
        harness.store.force(key, "forced_open")
        config = harness.config(open_for=60.0, lease=LEASE)
        workers = [harness.start_worker(config, wait_ready=False) for _ in range(releasers)]
        harness.wait_ready(*workers)
        ids = harness.send_many("acme", 20)
        harness.wait_parked(ids)

        harness.broker_outage = True
        broker.kill()
        harness.store.reset(key)
        assert harness.store.release_parked(harness.park, key) == 20
        # A releaser stops its batch at the first failed publish and leaves the rest claimed
        # for its lease, so which releaser meets the dead broker next is up to timing.
        harness.wait_until(
            lambda: any(_failed_publishes(w) for w in workers),
            30,
            "a releaser to fail publishing a parked task into the dead broker",
        )
        broker.start()

        harness.wait_ran(ids, 60)
        harness.wait_until(lambda: harness.parked_count() == 0, 30, "the park to be empty")
        alive = [w.alive for w in workers]
        harness.stop_workers()  # a warm shutdown: every delivery acknowledged
        assert alive == [True] * releasers
        assert harness.broker_messages() == 0
        assert harness.run_counts() == dict.fromkeys(ids, 1)


# -- 3. four releasers, one killed mid-release ------------------------------------------------------

BULK = 300
"""Tasks parked and made due at once."""
STALL_AT = 40
"""The killed worker's releaser stops at this publish of its first batch (of up to 100)."""


@pytest.mark.parametrize(
    ("framework", "stall"),
    [
        pytest.param("celery", "before", id="celery-killed-before-publishing", marks=CELERY),
        pytest.param("dramatiq", "before", id="dramatiq-killed-before-publishing", marks=DRAMATIQ),
        pytest.param(
            "dramatiq",
            "after",
            id="dramatiq-killed-after-publishing",
            marks=[
                *DRAMATIQ,
                pytest.mark.xfail(
                    strict=True,
                    raises=AssertionError,
                    reason=(
                        "limitpal gap: a releaser killed after the broker took a message and before "
                        "confirm_parked leaves the entry claimed; once the lease ends it is released "
                        "again and the task runs twice (Releaser.run_once publishes, then confirms: "
                        "at-least-once, with nothing that recognises the second copy)"
                    ),
                ),
            ],
        ),
    ],
)
def test_each_parked_task_runs_once_when_a_releaser_is_killed_mid_release(
    framework: Framework, stall: Literal["before", "after"], require_server: ServerCheck, tmp_path: Path
) -> None:
    """300 parked tasks due at once, 4 worker processes releasing them, one SIGKILLed mid-batch.

    Four worker processes, each with its own releaser: Celery, four ``celery worker``
    processes (threads pool); Dramatiq, one ``dramatiq`` process plus one command of three
    worker processes. The victim consumes nothing (it listens on an idle queue), so its
    death loses no delivery, only the claims it held. It is the only releaser when the
    tasks are made due, takes a batch of 100, publishes 39 of them and stops at the 40th,
    ``before`` the broker has it (or ``after``, before confirming it); the stop is recorded,
    the other three start releasing the rest, and the victim is SIGKILLed. Its unpublished
    claims come back once the lease (``limitpal_park_lease``, 3 s here) ends: every task
    runs exactly once.
    """
    require_server("redis", REDIS_HOST, REDIS_PORT)
    with parking_harness(framework, SHARED_REDIS, tmp_path) as harness:
        key = tenant_key("bulk")
        harness.store.force(key, "forced_open")
        config = harness.config(open_for=60.0, lease=LEASE)
        parker = harness.start_worker(config, concurrency=8, wait_ready=False)
        victim_config = replace(config, stall_at=STALL_AT, stall_when=stall)
        victim = harness.start_worker(victim_config, consume=False, wait_ready=False)
        harness.wait_ready(parker, victim)
        ids = harness.send_many("bulk", BULK)
        harness.wait_parked(ids, 60)
        parker.kill()  # every task it took is parked (and acknowledged)
        harness.store.reset(key)

        assert harness.store.release_parked(harness.park, key) == BULK
        harness.wait_until(lambda: bool(harness.records("stalls")), 20, "the victim's releaser to stall")
        if framework == "celery":
            others = [harness.start_worker(config, wait_ready=False) for _ in range(3)]
        else:
            others = [harness.start_worker(config, processes=3, concurrency=2, wait_ready=False)]
        harness.wait_ready(*others)
        victim.kill()

        harness.wait_ran(ids, LEASE + 60)
        harness.wait_until(lambda: harness.parked_count() == 0, 30, "the park to be empty")
        # Every message that reached the broker has run (the stalled one did not, when "before").
        published = len(harness.records("releases")) - (1 if stall == "before" else 0)
        harness.wait_until(
            lambda: len(harness.records("runs")) >= published, 20, "every published message to run"
        )
        harness.stop_workers()  # a warm shutdown: every delivery acknowledged
        assert harness.broker_messages() == 0
        (stalled,) = harness.records("stalls")
        by_victim = [r["id"] for r in harness.records("releases") if r["pid"] == stalled["pid"]]
        assert len(by_victim) == STALL_AT
        assert by_victim[-1] == stalled["id"]
        assert Counter(r["id"] for r in harness.records("releases")) == {
            i: 2 if i == stalled["id"] else 1 for i in ids
        }
        assert harness.run_counts() == dict.fromkeys(ids, 1)


# -- 4. order and pace per key --------------------------------------------------------------------

RATE = 10
"""The rate limit of every tenant in the pacing test (burst 1): releases 0.1 s apart."""


def _most_in_one_second(times: list[float]) -> int:
    """The largest number of ``times`` (sorted) within any window of one second."""
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def _park_busy_and_quiet(harness: ParkingHarness, holds: dict[int, float]) -> tuple[list[str], list[str]]:
    """20 ``busy`` and 3 ``quiet`` tasks parked behind forced-open breakers, then made due together.

    Returns each key's task ids in parking order. ``holds`` makes some busy calls slow (by n).
    """
    busy, quiet = tenant_key("busy"), tenant_key("quiet")
    for key in (busy, quiet):
        harness.store.force(key, "forced_open")
    harness.start_worker(harness.config(open_for=60.0, rate=f"{RATE}/s"), concurrency=1)
    busy_ids = [harness.send("busy", n, holds.get(n, 0.0)) for n in range(20)]
    quiet_ids = harness.send_many("quiet", 3)
    harness.wait_parked(busy_ids + quiet_ids)
    parked = harness.parked_ids()
    for key in (busy, quiet):
        harness.store.reset(key)
    assert harness.store.release_parked(harness.park, busy) == 20
    assert harness.store.release_parked(harness.park, quiet) == 3

    harness.wait_ran(busy_ids + quiet_ids, 30)
    harness.wait_until(lambda: harness.parked_count() == 0, 10, "the park to be empty")
    harness.kill_workers()
    assert harness.run_counts() == dict.fromkeys(busy_ids + quiet_ids, 1)
    return [i for i in parked if i in set(busy_ids)], [i for i in parked if i in set(quiet_ids)]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_keys_parked_tasks_come_out_in_parking_order_at_its_rate(
    framework: Framework, require_server: ServerCheck, tmp_path: Path
) -> None:
    """20 parked tasks of a 10/s key, due together, leave the park in parking order at 10/s; another
    key's tasks are not held back behind them.

    One worker running one task at a time. The order asserted is the order of the releases
    (first release of each task): a released task that arrives a little early for the rate
    limit is deferred and parked again (see the next test), so its run may come later.
    """
    require_server("redis", REDIS_HOST, REDIS_PORT)
    with parking_harness(framework, SHARED_REDIS, tmp_path) as harness:
        busy_order, quiet_order = _park_busy_and_quiet(harness, {})
        first_released = list(dict.fromkeys(r["id"] for r in harness.records("releases")))
        runs = harness.runs()

    assert [i for i in first_released if i in set(busy_order)] == busy_order
    assert [i for i in first_released if i in set(quiet_order)] == quiet_order
    started = [float(r["t"]) for r in runs if r["tenant"] == "busy"]
    assert (started[-1] - started[0]) / (len(started) - 1) >= 0.9 / RATE
    assert _most_in_one_second(started) <= RATE + 1
    # The quiet key has a pace of its own: its three tasks are done while the busy key still drains.
    assert max(float(r["t"]) for r in runs if r["tenant"] == "quiet") < started[9]


HOLD = 0.3
"""How long one slow call of the busy key takes: three release intervals."""


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "known limit: the park paces a key's releases at its rate-limit interval and a released task "
        "is admitted through the same limit with no slot of its own; when two released tasks reach "
        "the worker closer than the interval (here: queued behind one slow call), the later ones are "
        "deferred once more, each to a slot booked for it (not paced again), so some tasks are parked "
        "twice and may run out of parking order"
    ),
)
@pytest.mark.parametrize("framework", FRAMEWORKS_OWN_XFAIL)
def test_one_slow_call_does_not_send_a_keys_paced_releases_round_again(
    framework: Framework, require_server: ServerCheck, tmp_path: Path
) -> None:
    """Paced releases of a 10/s key with one slow call among them: each task is parked once, runs once,
    in parking order, and the key drains at its rate plus the slow call."""
    require_server("redis", REDIS_HOST, REDIS_PORT)
    with parking_harness(framework, SHARED_REDIS, tmp_path) as harness:
        busy_order, _ = _park_busy_and_quiet(harness, {2: HOLD})
        deferred = harness.outcomes("deferred")
        runs = [r for r in harness.runs() if r["tenant"] == "busy"]

    assert {i: deferred[i] for i in busy_order} == dict.fromkeys(busy_order, 1)
    assert [r["id"] for r in runs] == busy_order
    assert float(runs[-1]["t"]) - float(runs[0]["t"]) < 19 / RATE + HOLD + 0.5


# -- 5. a full park -----------------------------------------------------------------------------------

PARK_LIMIT = 5


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_full_park_dead_letters_the_next_deferral_and_drops_nothing(
    framework: Framework, require_server: ServerCheck, tmp_path: Path
) -> None:
    """With ``park_limit=5`` the 6th deferral of a key is dead-lettered (``park_full``) and its task
    fails; the five parked tasks still run, once each.

    Here ``park`` comes from the worker setting ``limitpal_defer_transport`` (the policy says nothing).
    """
    require_server("redis", REDIS_HOST, REDIS_PORT)
    with parking_harness(framework, SHARED_REDIS, tmp_path) as harness:
        key = tenant_key("full")
        harness.store.force(key, "forced_open")
        config = harness.config(open_for=60.0, park_limit=PARK_LIMIT, transport_in="setting")
        harness.start_worker(config, concurrency=1)
        ids = harness.send_many("full", PARK_LIMIT + 1)
        harness.wait_until(
            lambda: len(harness.parked_ids()) == PARK_LIMIT and len(harness.outcomes("failed")) == 1,
            20,
            "five tasks parked and one failed",
        )
        parked = harness.parked_ids()
        (failed,) = harness.outcomes("failed")
        assert failed == ids[-1]  # one task at a time, in the order sent: the 6th is the one refused
        assert sorted(parked) == sorted(ids[:-1])
        letters = harness.store.list_dead()
        assert [(d.id, d.reason, d.key, d.task_name) for d in letters] == [
            (failed, "park_full", key, harness.task_name)
        ]
        assert letters[0].args[:2] == ("full", ids.index(failed))
        if framework == "celery":
            assert [(f["id"], f["exc_type"]) for f in harness.records("failures")] == [
                (failed, "DeferralLimitExceeded")
            ]
        else:
            assert harness.dramatiq_dead() == 1  # in Dramatiq's own dead-letter queue too

        harness.store.reset(key)
        assert harness.store.release_parked(harness.park, key) == PARK_LIMIT
        harness.wait_ran(parked, 20)
        harness.wait_until(lambda: harness.parked_count() == 0, 10, "the park to be empty")
        harness.stop_workers()  # a warm shutdown: every delivery acknowledged
        assert harness.broker_messages() == 0
        assert harness.run_counts() == dict.fromkeys(parked, 1)
