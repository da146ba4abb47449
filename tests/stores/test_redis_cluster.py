"""RedisStore on a real three-master Redis Cluster (started by this module, on loopback ports).

On a cluster a policy whose components use different keys costs one script call per key
(each key's state sits in its own slot, possibly on another node); when a later key
defers, a compensating call gives back what the earlier ones took. The scenarios here
run on the cluster and on a MemoryStore side by side and must decide alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
import redis.cluster

from limitpal_tasks import (
    Breaker,
    Bulkhead,
    DeadLetter,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    Store,
    TaskContext,
)
from limitpal_tasks.stores.redis import RedisStore

from .redis_support import ClusterInfo, decision_summary, local_cluster, status_summary
from .support import admitted, deferred

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PREFIX = "cl"

# The breaker, the bulkhead and a rate on the service; a rate per tenant: two keys, two slots.
COMPOSITE = Policy(
    "composite",
    key="tenant:{tenant_id}",
    breaker=Breaker(minimum_calls=1, open_for=5, half_open_probes=1, key="service:x"),
    bulkhead=Bulkhead(3, key="service:x"),
    rate=[RateLimit("100/s", burst=5, key="service:x"), RateLimit("1/m", key="tenant:{tenant_id}")],
)
SINGLE = Policy(
    "single",
    key="tenant:{tenant_id}",
    breaker=Breaker(minimum_calls=2, window=10, open_for=5),
    bulkhead=Bulkhead(2),
    rate=RateLimit("10/s", burst=3),
)


def context(tenant: str = "acme") -> TaskContext:
    return TaskContext("task", kwargs={"tenant_id": tenant})


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterInfo]:
    """A three-master cluster for the whole session; shut down and removed at its end."""
    with local_cluster() as info:
        yield info


@pytest.fixture
def store(cluster: ClusterInfo, clock: MockClock) -> Iterator[RedisStore]:
    """A store on the emptied cluster whose scripts get their ``now`` from the test's clock."""
    for port in cluster.ports:
        cluster.node(port).flushall()
    store = RedisStore.from_url(cluster.url, prefix=PREFIX, clock=clock)
    yield store
    store.close()


def client_of(store: RedisStore) -> redis.cluster.RedisCluster:
    return cast(redis.cluster.RedisCluster, store.client)


def all_keys(cluster: ClusterInfo) -> list[str]:
    """Every key under the prefix, on every master."""
    return sorted(
        key.decode() for port in cluster.ports for key in cluster.node(port).scan_iter(match=f"{PREFIX}:*")
    )


def keyslot(cluster: ClusterInfo, key: str) -> int:
    return int(cast(Any, cluster.node(cluster.ports[0])).execute_command("CLUSTER", "KEYSLOT", key))


Scenario = Callable[[Pipeline, Store, MockClock], list[object]]


def side_by_side(store: RedisStore, clock: MockClock, scenario: Scenario) -> list[object]:
    """Run ``scenario`` on a MemoryStore and on the cluster; assert they saw the same; return it."""
    memory_clock = MockClock(clock.now())
    memory = MemoryStore(clock=memory_clock)
    expected = scenario(Pipeline(memory, clock=memory_clock, rng=random.Random(7)), memory, memory_clock)
    seen = scenario(Pipeline(store, clock=clock, rng=random.Random(7)), store, clock)
    assert seen == expected
    return seen


def test_single_key_admit_and_record(store: RedisStore, clock: MockClock) -> None:
    """A one-key policy admits, records and opens its breaker on a cluster as on a MemoryStore."""

    def scenario(pipeline: Pipeline, on: Store, clock: MockClock) -> list[object]:
        seen: list[object] = []
        for _ in range(2):
            decision = pipeline.admit(SINGLE, context())
            seen.append(decision_summary(decision))
            seen.append(on.record(admitted(decision), Outcome.failure(), clock.now(), 0.5))
        seen.append(decision_summary(pipeline.admit(SINGLE, context())))
        seen.append(status_summary(on.status("tenant:acme")))
        return seen

    seen = side_by_side(store, clock, scenario)

    assert cast(tuple[object, ...], seen[-2])[:2] == ("deferred", "breaker_open")


def test_policy_keys_live_in_different_slots(store: RedisStore, cluster: ClusterInfo) -> None:
    """The service key and the tenant key of one policy hash to different slots, on different nodes."""
    service, tenant = f"{PREFIX}:{{service:x}}:s", f"{PREFIX}:{{tenant:acme}}:s"
    client = cast(Any, client_of(store))

    assert keyslot(cluster, service) != keyslot(cluster, tenant)
    assert client.get_node_from_key(service).name != client.get_node_from_key(tenant).name


def test_multi_key_admit_and_record(store: RedisStore, clock: MockClock) -> None:
    """A policy spread over two slots admits (holding a lease on each key) and records like a MemoryStore."""

    def scenario(pipeline: Pipeline, on: Store, clock: MockClock) -> list[object]:
        ticket = admitted(pipeline.admit(COMPOSITE, context()))
        held = [status_summary(on.status(key)) for key in ("service:x", "tenant:acme")]
        result = on.record(ticket, Outcome.success(), clock.now(), 0.5)
        after = [status_summary(on.status(key)) for key in ("service:x", "tenant:acme")]
        return [held, result, after]

    held, _, after = side_by_side(store, clock, scenario)

    assert [status.in_flight for status in cast(list[Any], held)] == [1, 1]
    assert [status.in_flight for status in cast(list[Any], after)] == [0, 0]


def test_deferral_of_the_later_key_gives_back_the_earlier_lease(store: RedisStore, clock: MockClock) -> None:
    """When the tenant's rate defers, the service key's lease and rate token are given back."""

    def scenario(pipeline: Pipeline, on: Store, clock: MockClock) -> list[object]:
        admitted(pipeline.admit(COMPOSITE, context()))
        before = status_summary(on.status("service:x"))
        decision = deferred(pipeline.admit(COMPOSITE, context()))  # the tenant's 1/m is spent
        return [before, decision_summary(decision), status_summary(on.status("service:x"))]

    before, decision, after = side_by_side(store, clock, scenario)

    assert cast(tuple[object, ...], decision)[1] == "rate_limited"
    assert after == before  # one lease (the first admission's) and the service's token count unchanged


def test_deferral_of_the_later_key_gives_back_the_probe(store: RedisStore, clock: MockClock) -> None:
    """A probe taken on the half-open service key is released when the tenant's rate defers."""

    def scenario(pipeline: Pipeline, on: Store, clock: MockClock) -> list[object]:
        opener = admitted(pipeline.admit(COMPOSITE, context("a")))
        on.record(opener, Outcome.failure(), clock.now(), 0.5)  # open for 5 s; tenant a's 1/m is spent
        clock.advance(5)
        blocked = deferred(pipeline.admit(COMPOSITE, context("a")))
        probes = on.status("service:x").probes_in_flight
        prober = admitted(pipeline.admit(COMPOSITE, context("b")))
        return [decision_summary(blocked), probes, prober.probe, status_summary(on.status("service:x"))]

    blocked, probes, probe_taken, _ = side_by_side(store, clock, scenario)

    assert cast(tuple[object, ...], blocked)[1] == "rate_limited"
    assert (probes, probe_taken) == (0, True)


def test_pause_status_and_reset(store: RedisStore, clock: MockClock) -> None:
    """Pausing, reading and resetting a key work on a cluster as on a MemoryStore."""

    def scenario(pipeline: Pipeline, on: Store, clock: MockClock) -> list[object]:
        on.pause("service:x", 30, "maintenance")
        paused = [
            decision_summary(pipeline.admit(COMPOSITE, context())),
            status_summary(on.status("service:x")),
        ]
        on.resume("service:x")
        on.record(admitted(pipeline.admit(COMPOSITE, context())), Outcome.failure(), clock.now(), 0.5)
        opened = status_summary(on.status("service:x"))
        reset = on.reset("service:x", "ops")
        return [paused, opened, reset, status_summary(on.status("service:x"))]

    paused, opened, reset, after = cast(list[Any], side_by_side(store, clock, scenario))

    assert paused[0][1] == "paused"
    assert (paused[1].pause_reason, opened.breaker, after.breaker) == ("maintenance", "open", "closed")
    assert [(t.from_state, t.to_state) for t in reset] == [("open", "closed")]


def test_dead_letters(store: RedisStore) -> None:
    """Dead letters are put, listed newest first and taken exactly once on a cluster."""
    for n in range(3):
        store.put_dead(DeadLetter(id=f"d{n}", task_name="task", reason="max_attempts", dead_at=100.0 + n))

    listed = [letter.id for letter in store.list_dead()]
    taken = store.take_dead("d1")

    assert listed == ["d2", "d1", "d0"]
    assert taken is not None
    assert taken.id == "d1"
    assert store.take_dead("d1") is None


def test_all_keys_of_one_key_share_a_slot(store: RedisStore, cluster: ClusterInfo, clock: MockClock) -> None:
    """Every Redis key kept for one limitpal key (s, l, p, w) hashes to the same slot."""
    pipeline = Pipeline(store, clock=clock, rng=random.Random(0))
    admitted(pipeline.admit(COMPOSITE, context("held")))  # leases left in flight
    pipeline.record(admitted(pipeline.admit(SINGLE, context("counted"))), Outcome.success())
    for _ in range(2):
        pipeline.record(admitted(pipeline.admit(SINGLE, context("down"))), Outcome.failure())
    clock.advance(5)
    assert admitted(pipeline.admit(SINGLE, context("down"))).probe  # a probe left in flight

    groups: dict[str, set[int]] = {}
    for key in all_keys(cluster):
        tag = key[key.index("{") + 1 : key.index("}")]
        groups.setdefault(tag, set()).add(keyslot(cluster, key))

    assert len(groups) >= 4
    assert all(len(slots) == 1 for slots in groups.values()), groups
    suffixes = {key.rsplit(":", 1)[1] for key in all_keys(cluster)}
    assert suffixes >= {"s", "l", "p", "w"}


def test_cluster_flag_in_a_redis_url(cluster: ClusterInfo, clock: MockClock) -> None:
    """``redis://host:port/0?cluster=true`` reaches the cluster like ``redis+cluster://``."""
    store = RedisStore.from_url(
        f"redis://127.0.0.1:{cluster.ports[1]}/0?cluster=true", prefix=PREFIX, clock=clock
    )

    admitted(Pipeline(store, clock=clock, rng=random.Random(0)).admit(COMPOSITE, context("via-flag")))

    assert isinstance(store.client, redis.cluster.RedisCluster)
    assert store.status("tenant:via-flag").in_flight == 1
    store.close()
