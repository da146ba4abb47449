"""MemoryStore is the reference: RedisStore's scripts must decide exactly as it does.

Hypothesis draws sequences of operations — admissions for a few tenants that carry their
reservations and deferral counts back like a requeued message, records with every kind of
outcome (some recorded twice), operator actions, retry-budget spends and jumps of the
shared ``MockClock`` — over policies that exercise every rule. Each operation is applied
to both stores on the same clock with identically seeded pipelines; after every step the
decisions, the record results and the status of every key must be identical.

With success batching off every answer is compared as is. With batching on (the default),
a batched success's answer is the store's placeholder and the transitions it causes are
reported by a later call, so record results and the transitions on decisions are left out
(``test_redis_store.py`` checks that such a transition is still reported once).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limitpal_tasks import (
    AdaptiveRate,
    Admitted,
    Breaker,
    Bulkhead,
    Decision,
    DeferPolicy,
    Deferred,
    MemoryStore,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    Rate,
    RateLimit,
    RetryBudget,
    RetryPolicy,
    TaskContext,
    Ticket,
)
from limitpal_tasks.core.decisions import BreakerState
from limitpal_tasks.stores.redis import RedisStore

from .redis_support import ServerCheck, decision_summary, fresh_db

pytestmark = pytest.mark.redis

DB = 10
TENANTS = ("a", "b")
KEYS = ("tenant:a", "tenant:b", "slow:a", "slow:b", "global", "service:x")

POLICIES = (
    # Count-window breaker with growing, jittered breaks; bulkhead; two rate limits, one on a shared key.
    Policy(
        "api",
        key="tenant:{tenant_id}",
        breaker=Breaker(
            minimum_calls=3,
            window=5,
            open_for=4,
            open_for_max=20,
            multiplier=2,
            open_jitter=0.5,
            half_open_probes=2,
            busy_delay=0.5,
        ),
        bulkhead=Bulkhead(2, lease=3, retry_delay=0.7),
        rate=[
            RateLimit("4/s", burst=3, reserve_ahead=3, grace=0.5),
            RateLimit("30/m", burst=5, reserve_ahead=30, key="global"),
        ],
        retry=RetryPolicy(budget=RetryBudget(ratio=0.5, min_per_second=0.2, window=4)),
        defer=DeferPolicy(max_deferrals=6, deadline=30),
        lease=5,
    ),
    # Time-window breaker with slow-call detection; a one-slot bulkhead.
    Policy(
        "slow",
        key="slow:{tenant_id}",
        breaker=Breaker(
            window_type="time",
            window=3,
            minimum_calls=2,
            failure_rate_threshold=60,
            slow_call_duration=0.5,
            slow_call_rate_threshold=50,
            open_for=2,
            half_open_probes=1,
        ),
        bulkhead=Bulkhead(1, lease=2),
        lease=4,
    ),
    # A breaker on the service, a rate per tenant: two keys, compensated when the rate defers.
    Policy(
        "svc",
        key="tenant:{tenant_id}",
        breaker=Breaker(minimum_calls=2, window=4, open_for=3, half_open_probes=1, key="service:x"),
        rate=RateLimit("3/s", burst=2, reserve_ahead=1, key="tenant:{tenant_id}"),
        lease=2,
    ),
    # An adaptive rate limit: overload answers cut it, successes raise it, slow calls count.
    Policy(
        "adapt",
        key="tenant:{tenant_id}",
        rate=RateLimit(
            "6/s",
            burst=2,
            reserve_ahead=2,
            adaptive=AdaptiveRate(floor="1/s", ceiling="20/s", increase=3, cooldown=0.5, slow=1.5),
        ),
        lease=3,
    ),
    # Rate limits only (successes are batchable), with a retry budget on the shared key.
    Policy(
        "bulk",
        key="tenant:{tenant_id}",
        rate=[RateLimit("2/s", grace=0.3), RateLimit("20/m", burst=2, reserve_ahead=20, key="global")],
        retry=RetryPolicy(budget=RetryBudget(ratio=0.2, min_per_second=0.5, window=2, key="global")),
    ),
)

OUTCOMES = (
    Outcome.success(),
    Outcome.success(),
    Outcome.success(0.1),
    Outcome.success(2.0),
    Outcome.failure(),
    Outcome.failure(),
    Outcome.failure(),
    Outcome.failure(0.3),
    Outcome.failure(overload=True),
    Outcome.failure(0.2, overload=True),
    Outcome.ignored(),
    Outcome.cooldown(1.5),
    Outcome.cooldown(0.0),
)
STATES: tuple[BreakerState, ...] = ("forced_open", "disabled", "closed")


@dataclass(frozen=True)
class Admit:
    policy: int
    tenant: str


@dataclass(frozen=True)
class Record:
    held: int  # which held ticket (modulo how many are held)
    outcome: Outcome
    rand: float
    keep: bool  # keep the ticket, so it may be recorded again


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Pause:
    key: str
    seconds: float


@dataclass(frozen=True)
class Resume:
    key: str


@dataclass(frozen=True)
class Reset:
    key: str


@dataclass(frozen=True)
class Force:
    key: str
    state: BreakerState


@dataclass(frozen=True)
class Override:
    key: str
    limit: str  # a limit id of the key
    rate: str | None  # None lifts the override
    burst: int
    seconds: float | None  # None: permanent


@dataclass(frozen=True)
class SpendRetry:
    policy: int
    tenant: str


Operation = Admit | Record | Advance | Pause | Resume | Reset | Force | Override | SpendRetry
# The (key, limit id) pairs POLICIES use, so overrides land where admissions read them.
LIMITS = (
    *[(f"tenant:{t}", limit) for t in TENANTS for limit in ("4/1/3", "3/1/2", "2/1/1", "6/1/2")],
    ("global", "30/60/5"),
    ("global", "20/60/2"),
)

tenants = st.sampled_from(TENANTS)
keys = st.sampled_from(KEYS)
admits = st.builds(Admit, st.integers(0, len(POLICIES) - 1), tenants)
records = st.builds(
    Record, st.integers(0, 50), st.sampled_from(OUTCOMES), st.floats(0, 1, exclude_max=True), st.booleans()
)
advances = st.builds(
    Advance, st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.3, 0.5, 1.0, 2.0, 3.5, 11.0]) | st.floats(0, 5)
)
# Mostly admissions and records, so breakers get to trip; operator actions now and then.
# (Weights by repetition: ``one_of`` would merge repeated branches.)
_weighted: list[st.SearchStrategy[Operation]] = [
    *[admits] * 8,
    *[records] * 8,
    *[advances] * 4,
    st.builds(Pause, keys, st.sampled_from([0.5, 3.0])),
    st.builds(Resume, keys),
    st.builds(Reset, keys),
    st.builds(Force, keys, st.sampled_from(STATES)),
    st.builds(SpendRetry, st.sampled_from([0, 4]), tenants),
    *[
        st.builds(
            lambda pair, rate, burst, seconds: Override(pair[0], pair[1], rate, burst, seconds),
            st.sampled_from(LIMITS),
            st.sampled_from([None, "1/s", "8/s", "90/m"]),
            st.integers(1, 3),
            st.sampled_from([None, 0.5, 4.0]),
        )
    ]
    * 2,
]
operations: st.SearchStrategy[Operation] = st.sampled_from(_weighted).flatmap(lambda strategy: strategy)
# Long enough for breakers to trip and re-open; short enough to shrink quickly.
scenarios = st.tuples(st.integers(0, 2**32 - 1), st.lists(operations, min_size=20, max_size=60))

_prefixes = itertools.count()


@pytest.fixture
def url(require_server: ServerCheck) -> str:
    """Database 10 of the shared server, emptied (each example then uses its own prefix)."""
    return fresh_db(require_server, DB)


@dataclass
class Carried:
    """What a requeued message carries back after a deferral."""

    deferrals: int = 0
    first_seen: float | None = None
    reservations: dict[str, float] = field(default_factory=dict)


class Twins:
    """One MemoryStore and one RedisStore driven in lock step by the same clock and seeds."""

    def __init__(self, redis_store: RedisStore, clock: MockClock, seed: int, batching: bool) -> None:
        self.clock = clock
        self.memory = MemoryStore(clock=clock)
        self.redis = redis_store
        self.batching = batching
        self.pipelines = (
            Pipeline(self.memory, clock=clock, rng=random.Random(seed)),
            Pipeline(self.redis, clock=clock, rng=random.Random(seed)),
        )
        self.carried: dict[tuple[int, str], Carried] = {}
        self.held: list[tuple[Ticket, Ticket]] = []
        self.log: list[str] = []

    def check(self, what: str, mine: object, theirs: object) -> None:
        assert mine == theirs, f"{what} differs after steps:\n" + "\n".join(self.log)

    def summary(self, decision: Decision) -> tuple[object, ...]:
        full = decision_summary(decision)
        return full[:-1] if self.batching else full  # batching moves record transitions onto admits

    def apply(self, op: Operation) -> None:
        self.log.append(f"  t={self.clock.now():.6f} {op!r}")
        now = self.clock.now()
        stores = (self.memory, self.redis)
        if isinstance(op, Admit):
            self.admit(op.policy, op.tenant)
        elif isinstance(op, Record):
            self.record(op)
        elif isinstance(op, Advance):
            self.clock.advance(op.seconds)
        elif isinstance(op, Pause):
            for store in stores:
                store.pause(op.key, op.seconds, "operator", now=now)
        elif isinstance(op, Resume):
            for store in stores:
                store.resume(op.key)
        elif isinstance(op, Reset):
            mine, theirs = (store.reset(op.key, "ops", now=now) for store in stores)
            self.check(f"reset({op.key})", mine, theirs)
        elif isinstance(op, Force):
            mine, theirs = (store.force(op.key, op.state, "ops", now=now) for store in stores)
            self.check(f"force({op.key}, {op.state})", mine, theirs)
        elif isinstance(op, Override):
            rate = None if op.rate is None else Rate.parse(op.rate)
            for store in stores:
                store.override(op.key, op.limit, rate, op.burst, op.seconds, now=now)
        else:
            retry = POLICIES[op.policy].retry
            assert retry is not None
            budget = retry.budget
            assert budget is not None
            budget_key = "global" if budget.key is not None else f"tenant:{op.tenant}"
            allowed = [store.spend_retry(budget_key, budget, now) for store in stores]
            self.check(f"spend_retry({budget_key})", allowed[0], allowed[1])
        for status_key in KEYS:
            self.check(
                f"status({status_key})",
                self.memory.status(status_key, now=self.clock.now()),
                self.redis.status(status_key, now=self.clock.now()),
            )

    def admit(self, index: int, tenant_id: str) -> None:
        policy = POLICIES[index]
        carried = self.carried.get((index, tenant_id), Carried())
        context = TaskContext(
            "task",
            kwargs={"tenant_id": tenant_id},
            deferrals=carried.deferrals,
            first_seen=carried.first_seen,
            reservations=dict(carried.reservations),
        )
        mine, theirs = (pipeline.admit(policy, context) for pipeline in self.pipelines)
        self.check(f"admit({policy.name}, {tenant_id})", self.summary(mine), self.summary(theirs))
        if isinstance(mine, Admitted) and isinstance(theirs, Admitted):
            self.held.append((mine.ticket, theirs.ticket))
            self.carried.pop((index, tenant_id), None)
        elif isinstance(mine, Deferred):
            if mine.exhausted:  # dead-lettered: the message does not come back
                self.carried.pop((index, tenant_id), None)
            else:
                self.carried[(index, tenant_id)] = Carried(
                    mine.deferrals, mine.first_seen, dict(mine.reservations)
                )

    def record(self, op: Record) -> None:
        if not self.held:
            return
        i = op.held % len(self.held)
        tickets = self.held[i] if op.keep else self.held.pop(i)
        now = self.clock.now()
        mine = self.memory.record(tickets[0], op.outcome, now, op.rand)
        theirs = self.redis.record(tickets[1], op.outcome, now, op.rand)
        if not self.batching:
            self.check(f"record({op.outcome})", mine, theirs)


@contextmanager
def redis_store(url: str, clock: MockClock, batching: bool) -> Iterator[RedisStore]:
    """A RedisStore under a prefix of its own, on the given clock, batching successes or not."""
    prefix = f"diff{next(_prefixes)}"
    store = RedisStore.from_url(url, prefix=prefix, clock=clock, batch_delay=0.05 if batching else 0)
    try:
        yield store
    finally:
        store.close()


def run(url: str, seed: int, steps: list[Operation], batching: bool) -> None:
    clock = MockClock()
    with redis_store(url, clock, batching) as store:
        twins = Twins(store, clock, seed, batching)
        for step in steps:
            twins.apply(step)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenarios)
def test_redis_decides_like_memory(url: str, case: tuple[int, list[Operation]]) -> None:
    """With batching off, every decision, record result and status matches MemoryStore's, step by step."""
    run(url, case[0], case[1], batching=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenarios)
def test_redis_with_batched_successes_decides_like_memory(
    url: str, case: tuple[int, list[Operation]]
) -> None:
    """With batching on, every decision and status still matches MemoryStore's, step by step."""
    run(url, case[0], case[1], batching=True)
