"""Store contract: every transition of the circuit breaker, driven by a ``MockClock``.

Admissions go through a :class:`Pipeline` (which passes the clock as ``now``); outcomes are
recorded on the store directly so each test sees the transitions its own record caused.
Policies here use no deferral jitter, so delays are the store's exact answers.
"""

from __future__ import annotations

from typing import Any

from limitpal_tasks import (
    Admitted,
    Breaker,
    DeferPolicy,
    MockClock,
    Outcome,
    Pipeline,
    Policy,
    Store,
    TaskContext,
    Ticket,
    Transition,
)
from limitpal_tasks.core.decisions import KeyStatus, RecordResult

from .support import about, admitted, deferred

KEY = "service:x"
NO_JITTER = DeferPolicy(jitter=0.0, open_spread=0.0)


def breaker_policy(defer: DeferPolicy = NO_JITTER, lease: float = 300.0, **breaker: Any) -> Policy:
    """A policy with only a breaker, on the fixed key ``service:x``."""
    return Policy("api", key=KEY, breaker=Breaker(**breaker), defer=defer, lease=lease)


def context(tenant: str = "a") -> TaskContext:
    return TaskContext("task", kwargs={"tenant_id": tenant})


def breaker_view(status: KeyStatus) -> tuple[object, ...]:
    """Everything the breaker keeps, without the bulkhead leases a record gives back."""
    return (
        status.breaker,
        status.generation,
        status.open_until,
        status.calls,
        status.failures,
        status.slow_calls,
        status.probes_in_flight,
    )


def finish(store: Store, clock: MockClock, ticket: Ticket, outcome: Outcome) -> RecordResult:
    """Record ``outcome`` for ``ticket`` at the clock's time (no break-duration jitter draw)."""
    return store.record(ticket, outcome, clock.now(), 0.0)


def run(pipeline: Pipeline, store: Store, clock: MockClock, policy: Policy, outcome: Outcome) -> RecordResult:
    """Admit one execution (it must be admitted) and record ``outcome`` for it."""
    return finish(store, clock, admitted(pipeline.admit(policy, context())), outcome)


def trip(pipeline: Pipeline, store: Store, clock: MockClock, policy: Policy) -> float:
    """Fail executions until the breaker opens; return the time it opened."""
    assert policy.breaker is not None
    for _ in range(policy.breaker.minimum_calls):
        result = run(pipeline, store, clock, policy, Outcome.failure())
        if result.transitions:
            assert store.status(KEY).breaker == "open"
            return clock.now()
    raise AssertionError("the breaker did not open")


# -- CLOSED -------------------------------------------------------------------------


def test_closed_breaker_stays_closed_below_minimum_calls(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Failures below ``minimum_calls`` never open the breaker, whatever their rate."""
    policy = breaker_policy(minimum_calls=5, window=10, failure_rate_threshold=50)

    results = [run(pipeline, store, clock, policy, Outcome.failure()) for _ in range(4)]

    assert all(result.transitions == () for result in results)
    status = store.status(KEY)
    assert (status.breaker, status.calls, status.failures) == ("closed", 4, 4)
    assert pipeline.admit(policy, context()).admitted


def test_count_window_opens_at_failure_rate_threshold(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """The breaker opens on the record that brings the failure rate up to the threshold."""
    policy = breaker_policy(minimum_calls=10, window=10, failure_rate_threshold=50, open_for=30)
    for outcome in [Outcome.success()] * 5 + [Outcome.failure()] * 4:
        assert run(pipeline, store, clock, policy, outcome).transitions == ()
    assert store.status(KEY).breaker == "closed"

    # When the 10th call fails (5 failures out of 10 = 50%)
    result = run(pipeline, store, clock, policy, Outcome.failure())

    # Then it opens, once, for open_for
    now = clock.now()
    assert result.transitions == (Transition("api", KEY, "closed", "open", 1, now),)
    status = store.status(KEY)
    assert (status.breaker, status.generation) == ("open", 1)
    assert status.open_until == about(now + 30)


def test_count_window_counts_only_the_last_window_calls(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A count window of N forgets every outcome older than the last N calls."""
    policy = breaker_policy(minimum_calls=4, window=4, failure_rate_threshold=50)
    for outcome in [Outcome.success()] * 3 + [Outcome.failure()] + [Outcome.success()] * 4:
        run(pipeline, store, clock, policy, outcome)

    status = store.status(KEY)
    assert (status.breaker, status.calls, status.failures) == ("closed", 4, 0)

    # Two failures are 2 of the last 4 calls (50%), though only 3 of all 10 (30%)
    assert run(pipeline, store, clock, policy, Outcome.failure()).transitions == ()
    assert run(pipeline, store, clock, policy, Outcome.failure()).transitions != ()
    assert store.status(KEY).breaker == "open"


def test_count_window_smaller_than_minimum_calls_still_opens(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A count window smaller than ``minimum_calls`` still opens (Resilience4j caps the minimum at it)."""
    policy = breaker_policy(minimum_calls=20, window=10, failure_rate_threshold=50)

    for _ in range(10):  # a full window of failures, fewer than minimum_calls
        run(pipeline, store, clock, policy, Outcome.failure())

    assert store.status(KEY).breaker == "open", "a breaker that can never open protects nothing"


def test_time_window_opens_on_failures_within_the_window(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A time window counts every outcome of the last ``window`` seconds."""
    policy = breaker_policy(window_type="time", window=10, minimum_calls=4, failure_rate_threshold=50)
    run(pipeline, store, clock, policy, Outcome.failure())
    run(pipeline, store, clock, policy, Outcome.failure())
    clock.advance(5)
    run(pipeline, store, clock, policy, Outcome.success())

    result = run(pipeline, store, clock, policy, Outcome.failure())

    assert [(t.from_state, t.to_state) for t in result.transitions] == [("closed", "open")]


def test_time_window_forgets_outcomes_older_than_the_window(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Outcomes older than ``window`` seconds no longer count as the clock moves on."""
    policy = breaker_policy(window_type="time", window=10, minimum_calls=4, failure_rate_threshold=50)
    for _ in range(3):
        run(pipeline, store, clock, policy, Outcome.failure())

    # When 11 s later one success arrives (with the old failures it would be 3 of 4)
    clock.advance(11)
    result = run(pipeline, store, clock, policy, Outcome.success())

    assert result.transitions == ()
    status = store.status(KEY)
    assert (status.breaker, status.calls, status.failures) == ("closed", 1, 0)


def test_slow_call_rate_opens_the_breaker(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """Successes slower than ``slow_call_duration`` open the breaker at the slow-call rate."""
    policy = breaker_policy(
        minimum_calls=4,
        window=4,
        failure_rate_threshold=100,
        slow_call_duration=2.0,
        slow_call_rate_threshold=50,
    )
    for duration in (3.0, 1.0, 1.0):
        assert run(pipeline, store, clock, policy, Outcome.success(duration)).transitions == ()

    result = run(pipeline, store, clock, policy, Outcome.success(2.5))

    assert [(t.from_state, t.to_state) for t in result.transitions] == [("closed", "open")]
    assert store.status(KEY).breaker == "open"


def test_calls_faster_than_slow_call_duration_are_not_slow(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Successes shorter than ``slow_call_duration`` never count as slow."""
    policy = breaker_policy(minimum_calls=4, window=4, slow_call_duration=2.0, slow_call_rate_threshold=50)
    for _ in range(8):
        assert run(pipeline, store, clock, policy, Outcome.success(1.99)).transitions == ()

    status = store.status(KEY)
    assert (status.breaker, status.slow_calls) == ("closed", 0)


def test_call_duration_defaults_to_time_from_admission_to_record(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Without an explicit duration, the time between admit and record decides slowness."""
    policy = breaker_policy(minimum_calls=1, slow_call_duration=2.0, slow_call_rate_threshold=100)
    ticket = admitted(pipeline.admit(policy, context()))

    clock.advance(3)
    result = finish(store, clock, ticket, Outcome.success())

    assert [(t.from_state, t.to_state) for t in result.transitions] == [("closed", "open")]


# -- OPEN ---------------------------------------------------------------------------


def test_open_breaker_defers_until_open_until(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """While OPEN every execution is deferred with ``breaker_open`` until ``open_until``."""
    policy = breaker_policy(minimum_calls=1, open_for=30)
    opened = trip(pipeline, store, clock, policy)

    clock.advance(10)
    decision = deferred(pipeline.admit(policy, context()))

    assert decision.reason == "breaker_open"
    assert decision.delay == about(opened + 30 - clock.now())
    assert store.status(KEY).in_flight == 0


def test_open_breaker_deferrals_land_in_the_spread_window(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Deferrals of an OPEN breaker come back between ``open_until`` and ``open_until + open_spread``."""
    policy = breaker_policy(defer=DeferPolicy(jitter=0.0, open_spread=5.0), minimum_calls=1, open_for=30)
    opened = trip(pipeline, store, clock, policy)
    clock.advance(10)

    delays = [deferred(pipeline.admit(policy, context())).delay for _ in range(50)]

    remaining = opened + 30 - clock.now()
    assert all(remaining - 1e-6 <= delay <= remaining + 5.0 + 1e-6 for delay in delays)
    assert len(set(delays)) > 1


# -- HALF_OPEN ----------------------------------------------------------------------


def test_first_caller_after_open_until_becomes_the_probe(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """After ``open_until`` the first caller moves the breaker to HALF_OPEN, a new generation."""
    policy = breaker_policy(minimum_calls=1, open_for=30, half_open_probes=2)
    trip(pipeline, store, clock, policy)
    clock.advance(30)

    decision = pipeline.admit(policy, context())

    assert isinstance(decision, Admitted)
    assert decision.ticket.probe
    assert decision.transitions == (Transition("api", KEY, "open", "half_open", 2, clock.now()),)
    status = store.status(KEY)
    assert (status.breaker, status.generation, status.probes_in_flight) == ("half_open", 2, 1)


def test_half_open_transition_is_reported_by_the_first_caller_only(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Callers after the first probe join HALF_OPEN without reporting the transition again."""
    policy = breaker_policy(minimum_calls=1, open_for=30, half_open_probes=3)
    trip(pipeline, store, clock, policy)
    clock.advance(30)
    pipeline.admit(policy, context())

    later = [pipeline.admit(policy, context()) for _ in range(2)]

    assert all(isinstance(d, Admitted) and d.ticket.probe and d.transitions == () for d in later)
    assert store.status(KEY).generation == 2


def test_half_open_admits_at_most_half_open_probes(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Beyond ``half_open_probes`` probes in flight, callers get ``half_open_busy``."""
    policy = breaker_policy(minimum_calls=1, open_for=30, half_open_probes=2, busy_delay=1.5)
    trip(pipeline, store, clock, policy)
    clock.advance(30)
    admitted(pipeline.admit(policy, context()))
    admitted(pipeline.admit(policy, context()))

    busy = [deferred(pipeline.admit(policy, context())) for _ in range(3)]

    assert {d.reason for d in busy} == {"half_open_busy"}
    assert all(0 < d.delay <= 1.5 for d in busy)
    assert store.status(KEY).probes_in_flight == 2


def test_half_open_probe_successes_close_the_breaker(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """``half_open_probes`` successful probes close the breaker; the last one reports it."""
    policy = breaker_policy(minimum_calls=1, open_for=30, half_open_probes=2)
    trip(pipeline, store, clock, policy)
    clock.advance(30)
    first, second = (admitted(pipeline.admit(policy, context())) for _ in range(2))

    assert finish(store, clock, first, Outcome.success()).transitions == ()
    assert store.status(KEY).breaker == "half_open"
    result = finish(store, clock, second, Outcome.success())

    assert result.transitions == (Transition("api", KEY, "half_open", "closed", 3, clock.now()),)
    status = store.status(KEY)
    assert (status.breaker, status.generation, status.calls, status.probes_in_flight) == ("closed", 3, 0, 0)
    assert pipeline.admit(policy, context()).admitted


def test_probe_failure_reopens_with_a_growing_break_duration(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Each consecutive re-open lasts ``open_for`` × ``multiplier``^n, capped at ``open_for_max``."""
    policy = breaker_policy(minimum_calls=1, open_for=10, multiplier=3, open_for_max=50)
    trip(pipeline, store, clock, policy)
    breaks = []
    wait = 10.0
    for _ in range(3):
        clock.advance(wait)
        probe = admitted(pipeline.admit(policy, context()))
        result = finish(store, clock, probe, Outcome.failure())
        assert [(t.from_state, t.to_state) for t in result.transitions] == [("half_open", "open")]
        open_until = store.status(KEY).open_until
        assert open_until is not None
        wait = open_until - clock.now()
        breaks.append(wait)

    assert breaks == about([30.0, 50.0, 50.0])


def test_open_jitter_shortens_the_break_by_the_drawn_fraction(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """With ``open_jitter`` j and a draw r, the break lasts ``open_for`` × (1 − j × r)."""
    policy = breaker_policy(minimum_calls=1, open_for=100, open_jitter=0.5)
    ticket = admitted(pipeline.admit(policy, context()))

    store.record(ticket, Outcome.failure(), clock.now(), 0.5)

    assert store.status(KEY).open_until == about(clock.now() + 75)


def test_slow_probes_reopen_the_breaker(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """Probes that all succeed but too slowly (at the slow-call rate) re-open the breaker."""
    policy = breaker_policy(
        minimum_calls=1, open_for=10, half_open_probes=2, slow_call_duration=1.0, slow_call_rate_threshold=50
    )
    trip(pipeline, store, clock, policy)
    clock.advance(10)
    first, second = (admitted(pipeline.admit(policy, context())) for _ in range(2))

    finish(store, clock, first, Outcome.success(0.5))
    result = finish(store, clock, second, Outcome.success(2.0))

    assert [(t.from_state, t.to_state) for t in result.transitions] == [("half_open", "open")]


def test_break_duration_starts_over_after_the_breaker_closes(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Once closed, the next opening lasts ``open_for`` again, not the grown duration."""
    policy = breaker_policy(minimum_calls=1, open_for=10, multiplier=3, open_for_max=100, half_open_probes=1)
    trip(pipeline, store, clock, policy)
    clock.advance(10)
    finish(store, clock, admitted(pipeline.admit(policy, context())), Outcome.failure())  # re-open: 30 s
    clock.advance(30)
    finish(store, clock, admitted(pipeline.admit(policy, context())), Outcome.success())
    assert store.status(KEY).breaker == "closed"

    opened = trip(pipeline, store, clock, policy)

    assert store.status(KEY).open_until == about(opened + 10)


def test_expired_probe_lease_frees_its_slot(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A probe whose worker died stops holding its slot once its lease expires."""
    policy = breaker_policy(lease=20, minimum_calls=1, open_for=30, half_open_probes=1)
    trip(pipeline, store, clock, policy)
    clock.advance(30)
    lost = admitted(pipeline.admit(policy, context()))  # its worker is killed: never recorded
    assert deferred(pipeline.admit(policy, context())).reason == "half_open_busy"

    clock.advance(20.5)
    replacement = pipeline.admit(policy, context())

    assert isinstance(replacement, Admitted)
    assert replacement.ticket.probe
    # And the dead probe's late record changes nothing
    late = finish(store, clock, lost, Outcome.failure())
    assert (late.recorded, late.transitions) == (False, ())
    status = store.status(KEY)
    assert (status.breaker, status.probes_in_flight) == ("half_open", 1)


def test_busy_delay_is_cut_short_by_an_expiring_probe_lease(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A ``half_open_busy`` deferral comes back no later than the earliest probe lease expiry."""
    policy = breaker_policy(lease=20, minimum_calls=1, open_for=30, half_open_probes=1, busy_delay=10)
    trip(pipeline, store, clock, policy)
    clock.advance(30)
    admitted(pipeline.admit(policy, context()))
    clock.advance(19.5)

    busy = deferred(pipeline.admit(policy, context()))

    assert busy.reason == "half_open_busy"
    assert busy.delay == about(0.5)


# -- records that change nothing --------------------------------------------------------


def test_record_from_an_older_generation_changes_nothing(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """An outcome of an execution admitted before the breaker changed generation is not counted."""
    policy = breaker_policy(minimum_calls=2, failure_rate_threshold=50, open_for=10, half_open_probes=1)
    old = admitted(pipeline.admit(policy, context()))  # generation 0, still running
    trip(pipeline, store, clock, policy)
    clock.advance(10)
    finish(store, clock, admitted(pipeline.admit(policy, context())), Outcome.success())
    before = store.status(KEY)
    assert (before.breaker, before.generation) == ("closed", 3)

    result = finish(store, clock, old, Outcome.failure())

    assert result.transitions == ()
    after = store.status(KEY)
    assert breaker_view(after) == breaker_view(before)
    assert after.in_flight == before.in_flight - 1  # its lease is given back all the same


def test_record_after_the_lease_expired_is_not_counted(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """An outcome recorded after its execution's lease expired does not count in the window."""
    policy = breaker_policy(lease=10, minimum_calls=1)
    ticket = admitted(pipeline.admit(policy, context()))

    clock.advance(10.5)
    result = finish(store, clock, ticket, Outcome.failure())

    assert (result.recorded, result.transitions) == (False, ())
    status = store.status(KEY)
    assert (status.breaker, status.calls, status.failures) == ("closed", 0, 0)


def test_record_after_the_breaker_opened_reports_no_transition(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """Failures of executions still in flight when the breaker opened do not re-open or extend it."""
    policy = breaker_policy(minimum_calls=2, failure_rate_threshold=50, open_for=10)
    tickets = [admitted(pipeline.admit(policy, context())) for _ in range(4)]
    finish(store, clock, tickets[0], Outcome.failure())
    assert finish(store, clock, tickets[1], Outcome.failure()).transitions != ()
    before = store.status(KEY)

    clock.advance(1)
    results = [finish(store, clock, ticket, Outcome.failure()) for ticket in tickets[2:]]

    assert [r.transitions for r in results] == [(), ()]
    after = store.status(KEY)
    assert breaker_view(after) == breaker_view(before)
    assert after.in_flight == before.in_flight - 2  # their leases are given back all the same


def test_duplicate_record_is_counted_once(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """Recording the same ticket twice counts its outcome once."""
    policy = breaker_policy(minimum_calls=10)
    ticket = admitted(pipeline.admit(policy, context()))

    first = finish(store, clock, ticket, Outcome.failure())
    second = finish(store, clock, ticket, Outcome.failure())

    assert (first.recorded, second.recorded) == (True, False)
    status = store.status(KEY)
    assert (status.calls, status.failures, status.in_flight) == (1, 1, 0)


def test_duplicate_probe_success_counts_once(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A probe's success recorded twice is one success: the breaker stays HALF_OPEN."""
    policy = breaker_policy(minimum_calls=1, open_for=10, half_open_probes=2)
    trip(pipeline, store, clock, policy)
    clock.advance(10)
    probe = admitted(pipeline.admit(policy, context()))
    admitted(pipeline.admit(policy, context()))

    finish(store, clock, probe, Outcome.success())
    again = finish(store, clock, probe, Outcome.success())

    assert again.transitions == ()
    assert store.status(KEY).breaker == "half_open"


def test_ignored_outcomes_do_not_count(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """``ignored`` outcomes are neither successes nor failures in the window."""
    policy = breaker_policy(minimum_calls=2, failure_rate_threshold=50)
    for _ in range(5):
        assert run(pipeline, store, clock, policy, Outcome.ignored()).transitions == ()
    run(pipeline, store, clock, policy, Outcome.failure())

    status = store.status(KEY)
    assert (status.breaker, status.calls, status.failures, status.in_flight) == ("closed", 1, 1, 0)


def test_ignored_probe_neither_closes_nor_reopens(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """An ``ignored`` probe outcome frees its slot without closing or re-opening the breaker."""
    policy = breaker_policy(minimum_calls=1, open_for=10, half_open_probes=1)
    trip(pipeline, store, clock, policy)
    clock.advance(10)
    probe = admitted(pipeline.admit(policy, context()))

    result = finish(store, clock, probe, Outcome.ignored())

    assert result.transitions == ()
    status = store.status(KEY)
    assert (status.breaker, status.probes_in_flight) == ("half_open", 0)
    assert pipeline.admit(policy, context()).admitted


# -- operators ----------------------------------------------------------------------


def test_forced_open_defers_everything_until_changed(
    pipeline: Pipeline, store: Store, clock: MockClock
) -> None:
    """A breaker forced open defers every execution with ``breaker_open``, however long it lasts."""
    policy = breaker_policy(minimum_calls=1, open_for=30)
    pipeline.admit(policy, context())  # the key exists with a CLOSED breaker

    transitions = store.force(KEY, "forced_open", "api")

    assert [(t.from_state, t.to_state) for t in transitions] == [("closed", "forced_open")]
    for _ in range(3):
        decision = deferred(pipeline.admit(policy, context()))
        assert decision.reason == "breaker_open"
        assert decision.delay > 0
        clock.advance(1000)
    assert store.status(KEY).breaker == "forced_open"


def test_disabled_breaker_admits_and_never_opens(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """A disabled breaker lets every execution through and ignores their failures."""
    policy = breaker_policy(minimum_calls=1)
    store.force(KEY, "disabled", "api")

    results = [run(pipeline, store, clock, policy, Outcome.failure()) for _ in range(5)]

    assert all(result.transitions == () for result in results)
    assert store.status(KEY).breaker == "disabled"


def test_reset_closes_an_open_breaker(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """``reset`` puts an OPEN breaker back to CLOSED with a clean window."""
    policy = breaker_policy(minimum_calls=2, open_for=300)
    trip(pipeline, store, clock, policy)

    transitions = store.reset(KEY, "api")

    assert [(t.from_state, t.to_state) for t in transitions] == [("open", "closed")]
    status = store.status(KEY)
    assert (status.breaker, status.calls, status.failures, status.open_until) == ("closed", 0, 0, None)
    assert pipeline.admit(policy, context()).admitted


def test_force_closed_ends_a_forced_open(pipeline: Pipeline, store: Store, clock: MockClock) -> None:
    """``force(key, "closed")`` lifts a forced open."""
    policy = breaker_policy(minimum_calls=1)
    store.force(KEY, "forced_open", "api")

    transitions = store.force(KEY, "closed", "api")

    assert [(t.from_state, t.to_state) for t in transitions] == [("forced_open", "closed")]
    assert pipeline.admit(policy, context()).admitted


def test_operator_transitions_are_returned_once(store: Store, clock: MockClock) -> None:
    """Forcing a breaker into the state it is already in, or resetting a CLOSED one, reports nothing."""
    assert store.reset(KEY, "api") == ()
    first = store.force(KEY, "forced_open", "api")
    again = store.force(KEY, "forced_open", "api")

    assert len(first) == 1
    assert again == ()
    assert len(store.reset(KEY, "api")) == 1
    assert store.reset(KEY, "api") == ()


def test_transition_carries_policy_key_generation_and_time(store: Store, clock: MockClock) -> None:
    """A reported transition names the policy, the key, both states, the new generation and when."""
    clock.advance(5)

    (transition,) = store.force(KEY, "forced_open", "payments")

    assert transition.policy == "payments"
    assert transition.key == KEY
    assert (transition.from_state, transition.to_state) == ("closed", "forced_open")
    assert transition.generation == store.status(KEY).generation
    assert transition.at == about(clock.now())
