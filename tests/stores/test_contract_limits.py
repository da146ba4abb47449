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

from .support import about, admitted, deferred, most_in_window

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
    start = clock.now()
    admitted(pipeline.admit(policy, context()))
    first = deferred(pipeline.admit(policy, context()))  # slot +1
    second = deferred(pipeline.admit(policy, context()))  # slot +2

    clock.advance(3.5)
    admitted(pipeline.admit(policy, context()))  # a newcomer takes the free slot
    # The first late task runs too (one interval of slack absorbs delivery jitter) ...
    admitted(pipeline.admit(policy, context(after=first)))
    # ... but a third in the same second would exceed the rate: the second task's slot has
    # passed for good, and it books the next free one (+5.5), without counting a deferral.
    rebooked = deferred(pipeline.admit(policy, context(after=second)))
    assert (rebooked.reason, rebooked.delay, rebooked.deferrals) == (
        "rate_limited",
        about(2.0),
        second.deferrals,
    )
    assert list(rebooked.reservations.values()) == [about(start + 5.5)]
    clock.advance(rebooked.delay)
    assert pipeline.admit(policy, context(after=rebooked)).admitted


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


# -- late crowds -----------------------------------------------------------------------


def late_crowd(
    pipeline: Pipeline,
    clock: MockClock,
    policy: Policy,
    tasks: int,
    outages: list[tuple[float, float]],
    tenants: tuple[str, ...] = ("a",),
    uncounted: bool = True,
) -> tuple[list[tuple[float, int]], int]:
    """Enqueue ``tasks`` executions at once (tenants in turn); every redelivery falls due after
    its delay, except one due within an outage ``(a, b)`` (seconds from now), held until ``b``.

    Returns the admissions (time, task number) in order, and the deferrals after the first
    pass (the broker's re-publishes), which must all be ``uncounted`` unless told otherwise.
    """
    start = clock.now()
    order = itertools.count()

    def delivery(due: float) -> float:
        for begin, end in outages:
            if start + begin <= due < start + end:
                return start + end
        return due

    queue: list[tuple[float, int, int, TaskContext]] = []
    admissions: list[tuple[float, int]] = []
    for task in range(tasks):
        decision = pipeline.admit(policy, context(tenants[task % len(tenants)]))
        if isinstance(decision, Admitted):
            admissions.append((clock.now(), task))
            pipeline.record(decision.ticket, Outcome.success())
        else:
            assert decision.deferrals == 1, decision
            queue.append((delivery(clock.now() + decision.delay), next(order), task, context(after=decision)))
    heapq.heapify(queue)
    hops = 0
    while queue:
        at, _, task, back = heapq.heappop(queue)
        clock.set(max(at, clock.now()))
        decision = pipeline.admit(policy, back)
        if isinstance(decision, Admitted):
            admissions.append((clock.now(), task))
            pipeline.record(decision.ticket, Outcome.success())
            continue
        hops += 1
        assert hops <= 100 * tasks, "the crowd does not drain"
        assert decision.exhausted is None, decision
        assert decision.deferrals == back.deferrals or not uncounted, decision
        queue_at = delivery(clock.now() + decision.delay)
        heapq.heappush(queue, (queue_at, next(order), task, context(tenants[task % len(tenants)], decision)))
    return admissions, hops


def assert_within_rate(times: list[float], rate: float, burst: int) -> None:
    """No window of length T (one interval and up) holds more than ``rate`` × T + ``burst`` admissions."""
    for length in (1 / rate, 1.0, 2.5, 10.0):
        assert most_in_window(times, length) <= rate * length + burst + 1e-9, (length, sorted(times))


@pytest.mark.parametrize("tasks", [50, 300])
def test_late_crowd_drains_in_linear_hops_at_the_rate(
    pipeline: Pipeline, clock: MockClock, tasks: int
) -> None:
    """Tasks back late together for their slots each book a slot of their own: one hop each, not n²/2."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("10/s"), defer=NO_JITTER)

    # Every deferred task is held by an outage until +6 s (slots up to +4.9 s or +29.9 s)
    admissions, hops = late_crowd(pipeline, clock, policy, tasks, outages=[(0.0, 6.0)])

    assert sorted(task for _, task in admissions) == list(range(tasks))
    assert hops <= 2 * (tasks - 1)  # it was 1128 for 49 late tasks, 15812 for 299 (n²/2)
    assert_within_rate([t for t, _ in admissions], 10.0, 1)


def test_late_crowd_is_admitted_at_the_rate_in_order(pipeline: Pipeline, clock: MockClock) -> None:
    """A late crowd runs in the order of its slots, one interval apart once the slack is spent."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("5/s"), defer=NO_JITTER)
    start = clock.now()

    admissions, hops = late_crowd(pipeline, clock, policy, 8, outages=[(0.0, 5.0)])

    assert [task for _, task in admissions] == list(range(8))
    # Two at +5 s (the second on the slack of one interval), then the slot after the slack
    assert [t - start for t, _ in admissions] == about([0.0, 5.0, 5.0, 5.4, 5.6, 5.8, 6.0, 6.2])
    assert hops == 5


def test_rebooked_slot_returning_early_is_deferred_to_it(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A crowd member's new slot is a reservation like any: back early, it waits for it, uncounted."""
    policy = Policy("api", key=TENANT_KEY, rate="1/s", defer=NO_JITTER)
    start = clock.now()
    admitted(pipeline.admit(policy, context()))
    waiting = [deferred(pipeline.admit(policy, context())) for _ in range(3)]  # slots +1, +2, +3
    clock.advance(10.0)
    admitted(pipeline.admit(policy, context(after=waiting[0])))
    admitted(pipeline.admit(policy, context(after=waiting[1])))  # on the slack
    rebooked = deferred(pipeline.admit(policy, context(after=waiting[2])))
    assert (rebooked.delay, rebooked.deferrals) == (about(2.0), 1)
    assert list(rebooked.reservations.values()) == [about(start + 12.0)]
    booked = store.status("tenant:a").rates

    clock.advance(1.0)
    again = deferred(pipeline.admit(policy, context(after=rebooked)))

    assert (again.reason, again.delay, again.deferrals) == ("rate_limited", about(1.0), 1)
    assert again.reservations == rebooked.reservations
    assert store.status("tenant:a").rates == booked
    clock.advance(again.delay)
    assert pipeline.admit(policy, context(after=again)).admitted


def test_rebooked_crowd_late_again_still_runs_at_the_rate(pipeline: Pipeline, clock: MockClock) -> None:
    """A second outage that holds the rebooked crowd back does not let it through all at once."""
    policy = Policy("api", key=TENANT_KEY, rate=RateLimit("10/s"), defer=NO_JITTER)

    # The crowd of +6 s is rebooked up to +8.9 s; deliveries due in [6.3, 9) come at +9 s
    admissions, hops = late_crowd(pipeline, clock, policy, 30, outages=[(0.0, 6.0), (6.3, 9.0)])

    assert len(admissions) == 30
    assert hops <= 3 * 29
    assert_within_rate([t for t, _ in admissions], 10.0, 1)


def test_late_crowd_on_two_keys_drains_in_linear_hops_at_both_rates(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """Slots on a global and a per-tenant limit: a crowd drains at both rates, tokens refunded across keys."""
    policy = Policy(
        "api",
        key=TENANT_KEY,
        rate=[RateLimit("10/s", key="global"), RateLimit("4/s", key=TENANT_KEY)],
        defer=NO_JITTER,
    )

    # (A task deferred by the global limit first contends for its tenant's when it comes back:
    # that deferral counts, as any first deferral by a limit does.)
    admissions, hops = late_crowd(
        pipeline, clock, policy, 60, outages=[(1.0, 12.0)], tenants=("a", "b"), uncounted=False
    )

    assert sorted(task for _, task in admissions) == list(range(60))
    assert hops <= 2 * 60
    assert_within_rate([t for t, _ in admissions], 10.0, 1)
    for tenant in range(2):
        assert_within_rate([t for t, task in admissions if task % 2 == tenant], 4.0, 1)


def test_crowd_rebooking_on_one_key_refunds_the_execution_taken_on_another(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """Behind on its tenant's limit, a task books a new tenant slot, keeps its global one, and
    gives back the global execution it took: nothing but the new slot is consumed."""
    global_limit = RateLimit("10/s", burst=5, key="global")
    tenant_limit = RateLimit("1/s", key=TENANT_KEY)
    policy = Policy("api", key=TENANT_KEY, rate=[global_limit, tenant_limit], defer=NO_JITTER)
    now = clock.now()
    global_slot = reservation_id("global", global_limit.slot_id)
    tenant_slot = reservation_id("tenant:a", tenant_limit.slot_id)
    admitted(pipeline.admit(policy, context()))
    # Two tasks back late (slots 5 s ago, within grace on both keys): the first runs on the slack
    late = [
        TaskContext(
            "task",
            kwargs={"tenant_id": "a"},
            deferrals=1,
            reservations={global_slot: now - 5, tenant_slot: now - 5},
        )
        for _ in range(2)
    ]
    admitted(pipeline.admit(policy, late[0]))

    rebooked = deferred(pipeline.admit(policy, late[1]))

    assert (rebooked.reason, rebooked.delay, rebooked.deferrals) == ("rate_limited", about(2.0), 1)
    assert rebooked.reservations == {global_slot: about(now - 5), tenant_slot: about(now + 2)}
    # The global burst has exactly the three executions left that two admissions leave
    others = [pipeline.admit(policy, context(f"t{i}")).admitted for i in range(4)]
    assert others == [True, True, True, False]
    clock.advance(rebooked.delay)
    assert pipeline.admit(policy, context(after=rebooked)).admitted


def test_late_crowd_behind_two_limits_of_a_key_is_rebooked_on_both(
    pipeline: Pipeline, clock: MockClock
) -> None:
    """Slots on a per-second and a per-minute limit of one key: the crowd rebooks at the later of the two."""
    policy = Policy(
        "api", key=TENANT_KEY, rate=[RateLimit("10/s"), RateLimit("100/m", burst=3)], defer=NO_JITTER
    )

    admissions, hops = late_crowd(pipeline, clock, policy, 30, outages=[(0.0, 20.0)])

    assert [task for _, task in admissions] == list(range(30))
    assert hops <= 2 * 29
    assert_within_rate([t for t, _ in admissions], 10.0, 1)
    assert_within_rate([t for t, _ in admissions], 100 / 60, 3)


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
