"""Store contract: bulkhead, GCRA rate limits with reservations, pauses, and all-or-nothing admission.

A deferred task "comes back" by calling ``admit`` again with a context carrying the
deferral's ``deferrals``, ``first_seen`` and ``reservations``, after the clock moved by
its delay. Policies use no deferral jitter unless a test is about it.
"""

from __future__ import annotations

import heapq
import itertools

import pytest

from limitpal_tasks import (
    Admitted,
    Breaker,
    Bulkhead,
    DeferPolicy,
    Deferred,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    Store,
    TaskContext,
)
from limitpal_tasks.core.store import reservation_id

from .support import about, admitted, deferred

NO_JITTER = DeferPolicy(jitter=0.0, open_spread=0.0)
TENANT_KEY = "tenant:{tenant_id}"


def context(tenant: str = "a", after: Deferred | None = None) -> TaskContext:
    """A fresh execution of tenant ``tenant``'s task, or the one coming back ``after`` a deferral."""
    if after is None:
        return TaskContext("task", kwargs={"tenant_id": tenant})
    return TaskContext(
        "task",
        kwargs={"tenant_id": tenant},
        deferrals=after.deferrals,
        first_seen=after.first_seen,
        reservations=after.reservations,
    )


def effective_tats(store: Store, key: str, now: float) -> dict[str, float]:
    """A key's GCRA state as it acts: a theoretical arrival time in the past acts as ``now``."""
    return {slot: max(tat, now) for slot, tat in store.status(key).rates.items()}


# -- bulkhead -----------------------------------------------------------------------


def test_bulkhead_admits_at_most_max_concurrent(pipeline: Pipeline, store: Store) -> None:
    """No more than ``max_concurrent`` executions of a key hold a slot at once."""
    policy = Policy("api", key=TENANT_KEY, bulkhead=Bulkhead(2), defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    admitted(pipeline.admit(policy, context()))

    third = deferred(pipeline.admit(policy, context()))

    assert third.reason == "concurrency"
    assert store.status("tenant:a").in_flight == 2
    assert pipeline.admit(policy, context("b")).admitted  # other keys have their own slots


def test_record_releases_the_bulkhead_slot(pipeline: Pipeline, store: Store) -> None:
    """Recording an outcome gives the slot back to the next execution."""
    policy = Policy("api", key=TENANT_KEY, bulkhead=Bulkhead(1), defer=NO_JITTER)
    ticket = admitted(pipeline.admit(policy, context()))
    assert not pipeline.admit(policy, context()).admitted

    pipeline.record(ticket, Outcome.success())

    assert store.status("tenant:a").in_flight == 0
    assert pipeline.admit(policy, context()).admitted


def test_expired_lease_frees_its_bulkhead_slot(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A slot whose lease expired (its worker died) is free again without a record."""
    policy = Policy("api", key=TENANT_KEY, bulkhead=Bulkhead(1, lease=10), defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    clock.advance(9.5)
    assert deferred(pipeline.admit(policy, context())).reason == "concurrency"

    clock.advance(1)

    assert pipeline.admit(policy, context()).admitted
    assert store.status("tenant:a").in_flight == 1


def test_record_for_an_expired_lease_does_not_free_someone_elses_slot(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A late record from an execution whose lease expired does not release the slot now held by another."""
    policy = Policy("api", key=TENANT_KEY, bulkhead=Bulkhead(1, lease=10), defer=NO_JITTER)
    late = admitted(pipeline.admit(policy, context()))
    clock.advance(11)
    admitted(pipeline.admit(policy, context()))

    pipeline.record(late, Outcome.success())

    assert store.status("tenant:a").in_flight == 1
    assert deferred(pipeline.admit(policy, context())).reason == "concurrency"


@pytest.mark.parametrize(("lease", "expected"), [(300.0, 2.0), (0.5, 0.5)])
def test_concurrency_deferral_waits_at_most_retry_delay(
    pipeline: Pipeline, lease: float, expected: float
) -> None:
    """A ``concurrency`` deferral waits ``retry_delay``, or until the oldest lease expires if sooner."""
    policy = Policy("api", key=TENANT_KEY, bulkhead=Bulkhead(1, lease=lease, retry_delay=2), defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "concurrency"
    assert decision.delay == about(expected)


# -- rate limits --------------------------------------------------------------------


def test_rate_limit_admits_the_burst_then_defers_to_a_reserved_slot(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """After ``burst`` executions, the next is deferred to a booked slot one interval later."""
    limit = RateLimit("10/s", burst=3)
    policy = Policy("api", key=TENANT_KEY, rate=limit, defer=NO_JITTER)
    start = clock.now()
    for _ in range(3):
        admitted(pipeline.admit(policy, context()))

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "rate_limited"
    assert decision.delay == about(0.1)
    assert decision.reservations == {reservation_id("tenant:a", limit.slot_id): about(start + 0.1)}


def test_reserved_slots_are_booked_one_interval_apart_without_jitter(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """Successive rate-limited deferrals get consecutive slots, delays exact despite the policy's jitter."""
    policy = Policy("api", key=TENANT_KEY, rate="4/s", defer=DeferPolicy(jitter=1.0))
    admitted(pipeline.admit(policy, context()))

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(5)]

    assert delays == about([0.25, 0.5, 0.75, 1.0, 1.25])


def test_task_coming_back_at_its_slot_takes_no_new_token(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A task returning at its reserved slot is admitted and the limiter's state does not move."""
    policy = Policy("api", key=TENANT_KEY, rate="1/s", defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    waiting = deferred(pipeline.admit(policy, context()))
    booked = store.status("tenant:a").rates

    clock.advance(waiting.delay)
    decision = pipeline.admit(policy, context(after=waiting))

    assert decision.admitted
    assert store.status("tenant:a").rates == booked
    # And a newcomer at the same moment is deferred to the next free slot, one interval on
    newcomer = deferred(pipeline.admit(policy, context()))
    assert newcomer.delay == about(1.0)


def test_task_coming_back_early_is_deferred_again_without_counting_a_deferral(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A task back before its slot keeps its reservation and waits the rest; its deferral count stays."""
    policy = Policy("api", key=TENANT_KEY, rate="1/s", defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    waiting = deferred(pipeline.admit(policy, context()))
    booked = store.status("tenant:a").rates

    clock.advance(0.4)
    again = deferred(pipeline.admit(policy, context(after=waiting)))

    assert again.reason == "rate_limited"
    assert again.delay == about(0.6)
    assert again.deferrals == waiting.deferrals == 1
    assert again.reservations == waiting.reservations
    assert store.status("tenant:a").rates == booked
    clock.advance(again.delay)
    assert pipeline.admit(policy, context(after=again)).admitted


def test_slot_beyond_reserve_ahead_is_not_booked(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A slot further than ``reserve_ahead`` is not booked: no reservation, and the limiter does not move."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("1/s", reserve_ahead=2), defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    assert deferred(pipeline.admit(policy, context())).reservations  # slot in 1 s
    assert deferred(pipeline.admit(policy, context())).reservations  # slot in 2 s
    booked = store.status("tenant:a").rates

    beyond = deferred(pipeline.admit(policy, context()))

    assert beyond.reason == "rate_limited"
    assert beyond.reservations == {}
    assert 0 < beyond.delay <= 3.0
    assert store.status("tenant:a").rates == booked


def test_task_deferred_to_the_horizon_books_a_slot_when_it_comes_back(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """A task deferred without a booking contends again on return, and then its slot is within reach."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("1/s", reserve_ahead=2), defer=NO_JITTER)
    for _ in range(3):
        pipeline.admit(policy, context())
    beyond = deferred(pipeline.admit(policy, context()))

    clock.advance(beyond.delay)
    again = deferred(pipeline.admit(policy, context(after=beyond)))

    assert again.reservations
    assert again.delay <= 2.0 + 1e-6


def test_stale_reservation_contends_again(pipeline: Pipeline, clock: MockClock) -> None:
    """A task returning after its slot plus ``grace`` has lost the slot and contends like a newcomer."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("1/s", grace=2), defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    waiting = deferred(pipeline.admit(policy, context()))  # slot in 1 s, honoured until 3 s

    clock.advance(waiting.delay + 2.5)
    admitted(pipeline.admit(policy, context()))  # a newcomer takes the free token
    late = pipeline.admit(policy, context(after=waiting))

    assert isinstance(late, Deferred)
    assert late.reason == "rate_limited"
    assert late.delay == about(1.0)
    assert late.deferrals == 2


def test_reservation_is_honoured_within_grace(pipeline: Pipeline, clock: MockClock) -> None:
    """Tasks back late for their slots, within ``grace``, keep them, yet a late crowd runs at the rate."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("1/s", grace=5), defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    first = deferred(pipeline.admit(policy, context()))  # slot +1
    second = deferred(pipeline.admit(policy, context()))  # slot +2

    clock.advance(3.5)
    admitted(pipeline.admit(policy, context()))  # a newcomer takes the free slot
    # The first late task runs too (one interval of slack absorbs delivery jitter) ...
    admitted(pipeline.admit(policy, context(after=first)))
    # ... but a third in the same instant would exceed the rate: the second waits one
    # interval, without counting a deferral and without losing its slot.
    hop = deferred(pipeline.admit(policy, context(after=second)))
    assert (hop.reason, hop.delay, hop.deferrals) == ("rate_limited", about(1.0), second.deferrals)
    assert hop.reservations == second.reservations
    clock.advance(hop.delay)
    assert pipeline.admit(policy, context(after=hop)).admitted


def drain(pipeline: Pipeline, clock: MockClock, policy: Policy, tasks: int) -> list[float]:
    """Enqueue ``tasks`` executions at once; each deferred one comes back after its delay.

    Returns the admission times, in order.
    """
    order = itertools.count()
    queue: list[tuple[float, int, TaskContext]] = [
        (clock.now(), next(order), context()) for _ in range(tasks)
    ]
    admissions: list[float] = []
    for _ in range(tasks * 100):
        if not queue:
            break
        at, _, task = heapq.heappop(queue)
        clock.set(max(at, clock.now()))
        decision = pipeline.admit(policy, task)
        if isinstance(decision, Admitted):
            admissions.append(clock.now())
            pipeline.record(decision.ticket, Outcome.success())
        else:
            assert decision.exhausted is None, decision
            heapq.heappush(queue, (clock.now() + decision.delay, next(order), context(after=decision)))
    assert not queue, "the backlog did not drain"
    return admissions


def test_backlog_drains_at_exactly_the_configured_rate(pipeline: Pipeline, clock: MockClock) -> None:
    """A backlog of N tasks is admitted one interval apart: no waves, no idle slots."""
    policy = Policy("api", key=TENANT_KEY, rate="5/s", defer=NO_JITTER)
    start = clock.now()

    admissions = drain(pipeline, clock, policy, 20)

    assert len(admissions) == 20
    assert [t - start for t in admissions] == about([0.2 * i for i in range(20)])


def test_backlog_beyond_the_horizon_still_drains_at_the_configured_rate(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """Tasks deferred to the horizon without a booking come back and take the following slots in turn."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("10/s", reserve_ahead=1), defer=NO_JITTER)
    start = clock.now()

    admissions = drain(pipeline, clock, policy, 40)

    assert len(admissions) == 40
    assert [t - start for t in admissions] == about([0.1 * i for i in range(40)])


def test_every_rate_limit_of_a_policy_applies(pipeline: Pipeline, clock: MockClock) -> None:
    """With ``"10/s"`` and ``"1/m"`` (burst 2) on one key, each limit defers when it is the stricter."""
    policy = Policy(
        "api",
        key=TENANT_KEY,
        rate=[RateLimit("10/s", reserve_ahead=0), RateLimit("1/m", burst=2, reserve_ahead=0)],
        defer=NO_JITTER,
    )
    admitted(pipeline.admit(policy, context()))

    # The per-second limit defers a second execution in the same instant (the minute allows 2)
    per_second = deferred(pipeline.admit(policy, context()))
    clock.advance(0.1)
    admitted(pipeline.admit(policy, context()))
    clock.advance(0.1)
    # The per-minute limit defers the third, though the per-second limit would allow it
    per_minute = deferred(pipeline.admit(policy, context()))

    assert (per_second.reason, per_minute.reason) == ("rate_limited", "rate_limited")
    assert per_second.delay == about(0.1)
    assert per_minute.delay == about(60 - 0.2)


def test_booked_slot_conforms_to_every_rate_limit(pipeline: Pipeline, clock: MockClock) -> None:
    """A slot booked under two limits is the later of the two, and both are held for it."""
    per_second, per_minute = RateLimit("10/s"), RateLimit("100/m")
    policy = Policy("api", key=TENANT_KEY, rate=[per_second, per_minute], defer=NO_JITTER)
    start = clock.now()
    admitted(pipeline.admit(policy, context()))

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.delay == about(0.6)
    assert decision.reservations == {
        reservation_id("tenant:a", per_second.slot_id): about(start + 0.6),
        reservation_id("tenant:a", per_minute.slot_id): about(start + 0.6),
    }
    clock.advance(decision.delay)
    assert pipeline.admit(policy, context(after=decision)).admitted


def test_reservations_on_two_keys_both_survive_a_deferral(pipeline: Pipeline, clock: MockClock) -> None:
    """A task holding a slot on one key keeps it when another key's limit defers it again."""
    # Given a global limit of 1/s and a stricter per-tenant limit of 1 per 2 s
    global_limit = RateLimit("1/s", key="global")
    tenant_limit = RateLimit("1/2s", key=TENANT_KEY)
    policy = Policy("api", key=TENANT_KEY, rate=[global_limit, tenant_limit], defer=NO_JITTER)
    global_slot = reservation_id("global", global_limit.slot_id)
    tenant_slot = reservation_id("tenant:a", tenant_limit.slot_id)
    admitted(pipeline.admit(policy, context()))
    first = deferred(pipeline.admit(policy, context()))  # books the global slot at +1 s
    assert set(first.reservations) == {global_slot}

    # When it comes back at +1 s, the global slot is its own but the tenant's limit defers it to +2 s
    clock.advance(first.delay)
    second = deferred(pipeline.admit(policy, context(after=first)))

    assert second.delay == about(1.0)
    clock.advance(second.delay)
    admitted(pipeline.admit(policy, context("b")))  # a newcomer takes the global token of +2 s

    # Then it still holds its global slot (within grace) next to the tenant's, and runs
    # without contending again (one interval of execution slack covers the newcomer).
    assert set(second.reservations) == {global_slot, tenant_slot}
    back = pipeline.admit(policy, context(after=second))
    assert back.admitted, f"lost a reservation: {second.reservations} -> {back!r}"


# -- pause ----------------------------------------------------------------------------


def test_pause_defers_until_it_ends(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A paused key defers every execution with ``paused`` until the pause ends."""
    policy = Policy("api", key=TENANT_KEY, defer=NO_JITTER)
    store.pause("tenant:a", 30, "operator")

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "paused"
    assert decision.delay == about(30)
    status = store.status("tenant:a")
    assert (status.paused_until, status.pause_reason) == (about(clock.now() + 30), "operator")
    assert pipeline.admit(policy, context("b")).admitted
    clock.advance(30)
    assert pipeline.admit(policy, context()).admitted
    assert store.status("tenant:a").paused_until is None


def test_resume_lifts_a_pause(pipeline: Pipeline, store: Store) -> None:
    """``resume`` ends a pause at once."""
    policy = Policy("api", key=TENANT_KEY, defer=NO_JITTER)
    store.pause("tenant:a", 300, "operator")

    store.resume("tenant:a")

    assert pipeline.admit(policy, context()).admitted
    assert store.status("tenant:a").paused_until is None


def test_cooldown_outcome_pauses_the_key_until_it_ends(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A ``cooldown(s)`` outcome pauses the policy's key for ``s`` seconds, for every worker."""
    policy = Policy("api", key=TENANT_KEY, breaker=Breaker(minimum_calls=1), defer=NO_JITTER)
    ticket = admitted(pipeline.admit(policy, context()))
    clock.advance(1)

    pipeline.record(ticket, Outcome.cooldown(20))

    decision = deferred(pipeline.admit(policy, context()))
    assert decision.reason == "paused"
    assert decision.delay == about(20)
    status = store.status("tenant:a")
    assert (status.pause_reason, status.breaker, status.failures) == ("cooldown", "closed", 0)
    clock.advance(20)
    assert pipeline.admit(policy, context()).admitted


def test_pause_applies_to_component_keys_too(pipeline: Pipeline, store: Store) -> None:
    """Pausing the key a breaker lives under defers executions of a policy keyed elsewhere."""
    policy = Policy("api", key=TENANT_KEY, breaker=Breaker(key="service:x"), defer=NO_JITTER)
    store.pause("service:x", 30, "operator")

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "paused"
    assert store.status("tenant:a").in_flight == 0


# -- all or nothing ---------------------------------------------------------------------


def half_open_breaker_policy(*, rate: str | None = None, bulkhead: Bulkhead | None = None) -> Policy:
    """Breaker on ``service:x`` (one probe), other components on the tenant's key."""
    return Policy(
        "api",
        key=TENANT_KEY,
        breaker=Breaker(key="service:x", minimum_calls=1, open_for=10, half_open_probes=1),
        bulkhead=bulkhead,
        rate=rate,
        defer=NO_JITTER,
    )


def open_then_wait(pipeline: Pipeline, clock: MockClock, policy: Policy) -> None:
    """Trip the ``service:x`` breaker from an idle tenant and let its break end."""
    pipeline.record(admitted(pipeline.admit(policy, context("tripper"))), Outcome.failure())
    clock.advance(10)


def test_rate_limited_deferral_takes_no_probe_slot_on_another_key(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """An execution deferred by its tenant's rate limit gives back the probe slot it would have taken."""
    policy = half_open_breaker_policy(rate="1/m")
    admitted(pipeline.admit(policy, context("a")))  # tenant a's token for this minute
    open_then_wait(pipeline, clock, policy)
    before = store.status("service:x")

    decision = deferred(pipeline.admit(policy, context("a")))

    assert decision.reason == "rate_limited"
    after = store.status("service:x")
    assert (after.probes_in_flight, after.in_flight) == (before.probes_in_flight, before.in_flight)
    # The single probe slot is still free for another tenant
    probe = pipeline.admit(policy, context("b"))
    assert isinstance(probe, Admitted)
    assert probe.ticket.probe


def test_bulkhead_deferral_takes_no_probe_slot_on_another_key(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """An execution deferred by its tenant's bulkhead gives back the probe slot it would have taken."""
    policy = half_open_breaker_policy(bulkhead=Bulkhead(1))
    admitted(pipeline.admit(policy, context("a")))  # holds tenant a's only slot
    open_then_wait(pipeline, clock, policy)
    before = store.status("service:x")

    decision = deferred(pipeline.admit(policy, context("a")))

    assert decision.reason == "concurrency"
    after = store.status("service:x")
    assert (after.probes_in_flight, after.in_flight) == (before.probes_in_flight, before.in_flight)
    assert store.status("tenant:a").in_flight == 1
    assert pipeline.admit(policy, context("b")).admitted


def test_rate_limited_deferral_takes_no_probe_slot_or_lease_on_its_own_key(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """With every component on one key, a rate-limited deferral leaves probes and leases untouched."""
    policy = Policy(
        "api",
        key="service:x",
        breaker=Breaker(minimum_calls=1, open_for=10, half_open_probes=1),
        bulkhead=Bulkhead(5),
        rate=RateLimit("1/m", reserve_ahead=0),
        defer=NO_JITTER,
    )
    pipeline.record(admitted(pipeline.admit(policy, context())), Outcome.failure())  # opens it
    clock.advance(10)
    before = store.status("service:x")

    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "rate_limited"
    after = store.status("service:x")
    assert (after.probes_in_flight, after.in_flight, after.generation) == (
        before.probes_in_flight,
        before.in_flight,
        before.generation,
    )
    assert after.rates == before.rates


def test_bulkhead_deferral_takes_no_rate_token(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """An execution deferred by the bulkhead leaves the rate limiter's tokens to others."""
    policy = Policy("api", key=TENANT_KEY, bulkhead=Bulkhead(1), rate=RateLimit("1/s", burst=2))
    admitted(pipeline.admit(policy, context()))  # one of two tokens, and the only slot
    before = effective_tats(store, "tenant:a", clock.now())

    assert deferred(pipeline.admit(policy, context())).reason == "concurrency"

    assert effective_tats(store, "tenant:a", clock.now()) == before


def test_deferral_on_one_key_refunds_tokens_taken_on_another(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A task deferred by its tenant's limit gives back the token it took from the global limit."""
    policy = Policy(
        "api",
        key=TENANT_KEY,
        rate=[RateLimit("1/s", burst=5, key="global"), RateLimit("1/m", key=TENANT_KEY, reserve_ahead=0)],
        defer=NO_JITTER,
    )
    admitted(pipeline.admit(policy, context("a")))
    before = effective_tats(store, "global", clock.now())

    assert deferred(pipeline.admit(policy, context("a"))).reason == "rate_limited"

    assert effective_tats(store, "global", clock.now()) == before
    # The 4 tokens left in the global burst all go to other tenants
    others = [pipeline.admit(policy, context(f"t{i}")).admitted for i in range(5)]
    assert others == [True, True, True, True, False]


def test_a_pause_keeps_the_slot_a_returning_task_carries(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A task coming back for its booked slot while the key is paused keeps the slot (nothing was used)."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("1/s"), defer=NO_JITTER)
    admitted(pipeline.admit(policy, context()))
    booked = deferred(pipeline.admit(policy, context()))
    store.pause("tenant:a", 5, "operator")
    clock.advance(booked.delay)

    paused = deferred(pipeline.admit(policy, context(after=booked)))

    assert (booked.reason, paused.reason) == ("rate_limited", "paused")
    assert dict(paused.reservations) == dict(booked.reservations)
    assert booked.reservations
