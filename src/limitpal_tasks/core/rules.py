"""The rules of the pipeline, as pure functions over one key's state.

This module is the reference semantics: :class:`~limitpal_tasks.stores.MemoryStore` keeps
:class:`KeyState` objects and applies these functions under its lock; the Redis store's
Lua scripts implement the same rules step for step (a differential test holds them
equal). Nothing here reads a clock or draws a random number: ``now`` and ``rand`` are
arguments.
"""

from __future__ import annotations

import math
from typing import Literal

from .decisions import (
    AdaptiveStatus,
    BreakerState,
    DeferReason,
    Group,
    GroupResult,
    KeyStatus,
    Outcome,
    RateChange,
    RateOverride,
    Transition,
)
from .policy import AdaptiveRate, Breaker, RateLimit, RetryBudget

__all__ = [
    "EARLY_TOLERANCE",
    "AdaptiveData",
    "BreakerData",
    "BudgetData",
    "KeyState",
    "adapt_rates",
    "admit_group",
    "force_breaker",
    "record_group",
    "release_group",
    "reset_breaker",
    "set_override",
    "spend_retry",
    "status_of",
]

EARLY_TOLERANCE = 0.001
"""A reservation is honoured this many seconds before its slot (broker timers round)."""

_RECORDED, _FAILED, _SLOW = 1, 2, 4


class BreakerData:
    """One key's breaker: its state, generation, window and probe leases."""

    __slots__ = (
        "buckets",
        "calls",
        "cursor",
        "failures",
        "generation",
        "open_until",
        "opens",
        "probe_ok",
        "probe_slow",
        "probes",
        "ring",
        "shape",
        "slow",
        "state",
    )

    def __init__(self) -> None:
        self.state: BreakerState = "closed"
        self.generation = 0
        self.open_until = 0.0
        self.opens = 0
        self.probes: dict[str, float] = {}
        self.probe_ok = 0
        self.probe_slow = 0
        self.shape: tuple[str, float] = ("count", 0.0)
        self.ring = bytearray()
        self.buckets: dict[int, tuple[int, int, int]] = {}
        self.cursor = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def clear_window(self, config: Breaker | None = None) -> None:
        if config is not None:
            self.shape = (config.window_type, config.window)
        size = int(self.shape[1]) if self.shape[0] == "count" else 0
        self.ring = bytearray(size)
        self.buckets = {}
        self.cursor = 0
        self.calls = self.failures = self.slow = 0

    def add(self, config: Breaker, now: float, failed: bool, slow: bool) -> None:
        """Count one outcome in the sliding window, O(1) (amortized for time windows)."""
        if self.shape != (config.window_type, config.window):
            self.clear_window(config)
        code = _RECORDED | (_FAILED if failed else 0) | (_SLOW if slow else 0)
        if config.window_type == "count":
            old = self.ring[self.cursor]
            if old:
                self._count(old, -1)
            self.ring[self.cursor] = code
            self.cursor = (self.cursor + 1) % len(self.ring)
        else:
            second = math.floor(now)
            self.evict(config, second)
            calls, failures, slow_calls = self.buckets.get(second, (0, 0, 0))
            self.buckets[second] = (calls + 1, failures + failed, slow_calls + slow)
        self._count(code, 1)

    def evict(self, config: Breaker, second: int) -> None:
        """Drop the buckets that fell out of the time window, keeping running totals."""
        size = int(config.window)
        if second - self.cursor >= size:
            self.clear_window(config)
        else:
            for old in range(self.cursor - size + 1, second - size + 1):
                bucket = self.buckets.pop(old, None)
                if bucket is not None:
                    self.calls -= bucket[0]
                    self.failures -= bucket[1]
                    self.slow -= bucket[2]
        self.cursor = max(self.cursor, second)

    def _count(self, code: int, sign: int) -> None:
        self.calls += sign
        if code & _FAILED:
            self.failures += sign
        if code & _SLOW:
            self.slow += sign

    def trips(self, config: Breaker) -> bool:
        if self.calls < config.minimum_calls:  # capped at a count window's size (Resilience4j)
            return False
        if self.failures * 100.0 >= config.failure_rate_threshold * self.calls:
            return True
        return math.isfinite(config.slow_call_duration) and (
            self.slow * 100.0 >= config.slow_call_rate_threshold * self.calls
        )


class BudgetData:
    """A two-window sliding counter of admissions and retries (Cloudflare-style estimate)."""

    __slots__ = ("cur_adm", "cur_ret", "prev_adm", "prev_ret", "start")

    def __init__(self) -> None:
        self.start = 0.0
        self.cur_adm = self.cur_ret = self.prev_adm = self.prev_ret = 0

    def roll(self, window: float, now: float) -> float:
        """Advance to the window holding ``now``; return the weight of the previous one."""
        start = math.floor(now / window) * window
        if start > self.start:
            if start - self.start > window:
                self.prev_adm = self.prev_ret = 0
            else:
                self.prev_adm, self.prev_ret = self.cur_adm, self.cur_ret
            self.cur_adm = self.cur_ret = 0
            self.start = start
        return max(0.0, 1.0 - (now - self.start) / window)


GOODPUT_MARGIN = 0.95
"""An overload cut aims this far below the successes per second just measured."""
GOODPUT_WINDOW = 1.0
"""Seconds over which successes are counted to measure the upstream's goodput."""
BINDING_SHARE = 0.75
"""Successes raise the rate only while they come at least this close to it (the limit binds)."""
REPORT_STEP = 1.1
"""An increase is reported (an event) once the rate grew by this factor since the last report."""


class AdaptiveData:
    """One adaptive limit's learned rate under one key, and the successes it measures."""

    __slots__ = ("bucket", "changed_at", "count", "cut_at", "last", "previous", "rate", "reported")

    def __init__(self, rate: float) -> None:
        self.rate = rate  # calls per second
        self.reported = rate  # the rate the last event announced
        self.previous = rate  # the rate before the last change
        self.changed_at = 0.0  # when an event last announced a change
        self.cut_at = 0.0  # when the last cut happened (at most one per cooldown)
        self.bucket = 0.0  # start of the current measuring bucket (GOODPUT_WINDOW long)
        self.count = 0  # successes in it
        self.last = 0  # successes in the bucket before

    def roll(self, now: float) -> None:
        if now < self.bucket + GOODPUT_WINDOW:
            return
        self.last = self.count if now < self.bucket + 2 * GOODPUT_WINDOW else 0
        self.count = 0
        self.bucket = math.floor(now / GOODPUT_WINDOW) * GOODPUT_WINDOW

    def goodput(self, now: float) -> float:
        """Successes per second over the last second (the previous bucket weighted)."""
        weight = max(0.0, 1.0 - (now - self.bucket) / GOODPUT_WINDOW)
        return (self.last * weight + self.count) / GOODPUT_WINDOW


class KeyState:
    """Everything kept under one key."""

    __slots__ = (
        "adaptive",
        "breaker",
        "budget",
        "leases",
        "overrides",
        "pause_reason",
        "paused_until",
        "policy",
        "tats",
    )

    def __init__(self) -> None:
        self.paused_until = 0.0
        self.pause_reason: str | None = None
        self.breaker: BreakerData | None = None
        self.leases: dict[str, float] = {}
        self.tats: dict[str, float] = {}
        self.budget: BudgetData | None = None
        self.overrides: dict[str, RateOverride] = {}
        self.adaptive: dict[str, AdaptiveData] = {}
        self.policy: str | None = None

    def horizon(self) -> float:
        """The latest time at which anything kept here still matters."""
        latest = max(
            self.paused_until, max(self.leases.values(), default=0.0), max(self.tats.values(), default=0.0)
        )
        for override in self.overrides.values():
            latest = max(latest, math.inf if override.until is None else override.until)
        if self.breaker is not None:
            latest = max(latest, self.breaker.open_until, max(self.breaker.probes.values(), default=0.0))
        return latest

    def live_leases(self, now: float, exact: bool = False) -> dict[str, float]:
        """Drop expired leases and return the rest.

        Leases are mostly granted in expiry order, so dropping from the oldest until a live
        one is O(1) amortized; ``exact`` scans them all (only a saturated bulkhead needs it).
        """
        leases = self.leases
        if exact:
            expired = [lease_id for lease_id, expiry in leases.items() if expiry <= now]
            for lease_id in expired:
                del leases[lease_id]
            return leases
        while leases:
            oldest = next(iter(leases))
            if leases[oldest] > now:
                break
            del leases[oldest]
        return leases


def _earliest(leases: dict[str, float], now: float, cap: float) -> float:
    return min(cap, max(0.0, min(leases.values(), default=now + cap) - now))


def _defer(
    now: float,
    reason: DeferReason,
    delay: float,
    early: bool = False,
    reservations: tuple[float, ...] = (),
) -> GroupResult:
    return GroupResult(False, now, reason, max(0.0, delay), early=early, reservations=reservations)


def admit_group(
    state: KeyState, group: Group, ticket_id: str, policy: str, now: float, rand: float
) -> GroupResult:
    """Check pause → breaker → bulkhead → rate limits for one key; commit all or nothing.

    The one exception to "nothing": a rate-limited execution whose slot lies within the
    reservation horizon books that slot (the returned ``reservations``).
    """
    del rand  # admission draws no randomness; kept for symmetry with record_group
    state.policy = policy
    if state.paused_until > now:
        return _defer(now, "paused", state.paused_until - now)

    config = group.breaker
    breaker = state.breaker
    half_open_now = False
    probe = False
    generation = 0
    if config is not None:
        if breaker is None:
            breaker = state.breaker = BreakerData()
            breaker.clear_window(config)
        generation = breaker.generation
        if breaker.state == "forced_open":
            return _defer(now, "breaker_open", config.open_for)
        if breaker.state == "open":
            if now < breaker.open_until:
                return _defer(now, "breaker_open", breaker.open_until - now)
            half_open_now = True
            generation += 1
            probe = True
        elif breaker.state == "half_open":
            probes = breaker.probes
            for probe_id in [p for p, expiry in probes.items() if expiry <= now]:
                del probes[probe_id]
            if len(probes) >= config.half_open_probes - breaker.probe_ok:
                return _defer(now, "half_open_busy", _earliest(probes, now, config.busy_delay))
            probe = True

    lease_for = group.lease
    bulkhead = group.bulkhead
    if bulkhead is not None:
        lease_for = bulkhead.lease or lease_for
        leases = state.live_leases(now)
        if len(leases) >= bulkhead.max_concurrent:
            leases = state.live_leases(now, exact=True)
        if len(leases) >= bulkhead.max_concurrent:
            return _defer(now, "concurrency", _earliest(leases, now, bulkhead.retry_delay))

    booked: tuple[float, ...] = ()
    if group.rates:
        verdict = _check_rates(state, group, now)
        if isinstance(verdict, GroupResult):
            return verdict
        booked = verdict

    # Commit: every check passed.
    transitions: tuple[Transition, ...] = ()
    if breaker is not None and config is not None:
        if half_open_now:
            breaker.state = "half_open"
            breaker.generation = generation
            breaker.probes.clear()
            breaker.probe_ok = breaker.probe_slow = 0
            transitions = (Transition(policy, group.key, "open", "half_open", generation, now),)
        if probe:
            breaker.probes[ticket_id] = now + lease_for
    expiry = now + lease_for
    state.leases[ticket_id] = expiry
    if group.budget is not None:
        budget = state.budget or BudgetData()
        state.budget = budget
        budget.roll(group.budget.window, now)
        budget.cur_adm += 1
    return GroupResult(
        True, now, generation=generation, probe=probe, reservations=booked, transitions=transitions
    )


def _check_rates(state: KeyState, group: Group, now: float) -> GroupResult | tuple[float, ...]:
    """GCRA over every limit of the group, with two schedules per limit.

    The *booking* schedule (``tats[slot_id]``) hands out slots, now or in the future
    (reservations). The *execution* schedule (``tats[slot_id + "#x"]``) counts admissions
    when they happen: a task that returns late for its booked slot, in a crowd of other
    late ones, still runs no faster than the rate (it waits a short, uncounted hop).

    Returns the deferral, or (all conform, now consumed) per limit the reserved slot the
    execution used, ``0.0`` where it took a fresh slot.
    """
    rates: tuple[RateLimit | _Effective, ...] = group.rates
    if state.overrides or state.adaptive:
        rates = tuple(_effective(state, limit, now) for limit in group.rates)
    tats = state.tats
    if not group.reservations and len(rates) == 1:  # the common case, same arithmetic as below
        limit = rates[0]
        slack = limit.interval * (1 - limit.burst)
        booked = max(tats.get(limit.slot_id, 0.0), now)
        executed = max(tats.get(limit.exec_id, 0.0), now)
        if booked + slack <= now and executed + slack <= now:
            tats[limit.slot_id] = booked + limit.interval
            tats[limit.exec_id] = executed + limit.interval
            return (0.0,)
    carried: tuple[float | None, ...] = group.reservations or (None,) * len(rates)
    covered = [
        slot is not None and slot - EARLY_TOLERANCE <= now <= slot + limit.grace
        for slot, limit in zip(carried, rates)
    ]
    early = 0.0
    for slot, hit in zip(carried, covered):
        if slot is not None and not hit and now < slot:
            early = max(early, slot - now)
    if early <= 0:
        # Even a covered slot waits for the execution schedule (late crowds run at the rate),
        # with one interval of slack: a delivery a little late must not push every later
        # one back by a hop (the lag would grow by a broker round trip each time).
        for limit, hit in zip(rates, covered):
            if hit:
                ready = (
                    max(tats.get(limit.exec_id, 0.0), now)
                    + limit.interval * (1 - limit.burst)
                    - limit.interval
                )
                early = max(early, ready - now)
    if early > 0:
        kept = tuple(
            s if s is not None and s + limit.grace >= now else 0.0 for s, limit in zip(carried, rates)
        )
        return _defer(now, "rate_limited", early, early=True, reservations=kept)
    target = now
    horizon = math.inf
    for limit, hit in zip(rates, covered):
        if hit:
            continue
        booked = max(tats.get(limit.slot_id, 0.0), now)
        executed = max(tats.get(limit.exec_id, 0.0), now)
        target = max(
            target, booked + limit.interval * (1 - limit.burst), executed + limit.interval * (1 - limit.burst)
        )
        horizon = min(horizon, limit.reserve_ahead)
    if target <= now:
        for limit, hit in zip(rates, covered):
            if not hit:
                tats[limit.slot_id] = max(tats.get(limit.slot_id, 0.0), now) + limit.interval
            tats[limit.exec_id] = max(tats.get(limit.exec_id, 0.0), now) + limit.interval
        return tuple(slot if hit and slot is not None else 0.0 for slot, hit in zip(carried, covered))
    if target - now > horizon:
        kept = tuple(s if s is not None and hit else 0.0 for s, hit in zip(carried, covered))
        return _defer(now, "rate_limited", target - now - horizon, reservations=kept)
    for limit, hit in zip(rates, covered):
        if not hit:
            tats[limit.slot_id] = max(tats.get(limit.slot_id, 0.0), target) + limit.interval
    booked_slots = tuple(s if hit and s is not None else target for s, hit in zip(carried, covered))
    return _defer(now, "rate_limited", target - now, reservations=booked_slots)


class _Effective:
    """A limit at the rate it runs at now (an override's, or an adaptive one), on its own schedule."""

    __slots__ = ("burst", "exec_id", "grace", "interval", "reserve_ahead", "slot_id")

    def __init__(self, limit: RateLimit, interval: float, burst: int) -> None:
        self.slot_id, self.exec_id = limit.slot_id, limit.exec_id
        self.grace, self.reserve_ahead = limit.grace, limit.reserve_ahead
        self.interval, self.burst = interval, burst


def _effective(state: KeyState, limit: RateLimit, now: float) -> RateLimit | _Effective:
    override = state.overrides.get(limit.slot_id)
    if override is not None and override.active(now):
        return _Effective(limit, override.interval, override.burst)
    adaptive = limit.adaptive
    learned = state.adaptive.get(limit.slot_id)
    if adaptive is not None and learned is not None:
        return _Effective(limit, 1.0 / adaptive.clamp(learned.rate), limit.burst)
    return limit


def set_override(state: KeyState, slot_id: str, override: RateOverride | None) -> None:
    """Put an operator's rate on one limit of the key (``None`` lifts it)."""
    if override is None:
        state.overrides.pop(slot_id, None)
    else:
        state.overrides[slot_id] = override


def release_group(state: KeyState, group: Group, ticket_id: str, admitted: GroupResult) -> None:
    """Undo an admission of this group because a later group of the request deferred.

    Leases and probe slots are given back; the execution slot of every rate limit is
    refunded, and so is the booked slot where the admission took a fresh one (a carried
    reservation stays with the message).
    """
    state.leases.pop(ticket_id, None)
    if state.breaker is not None:
        state.breaker.probes.pop(ticket_id, None)
    tats = state.tats
    for configured, slot in zip(group.rates, admitted.reservations):
        limit = _effective(state, configured, admitted.now)
        if limit.exec_id in tats:
            tats[limit.exec_id] -= limit.interval
        if slot == 0.0 and limit.slot_id in tats:
            tats[limit.slot_id] -= limit.interval


def record_group(
    state: KeyState,
    group: Group,
    ticket_id: str,
    generation: int,
    outcome: Outcome,
    admitted_at: float,
    policy: str,
    now: float,
    rand: float,
) -> tuple[bool, tuple[Transition, ...]]:
    """Give back one group of a ticket and feed its breaker; ``(recorded, transitions)``.

    A duplicate record, or one whose lease expired, or one from an older breaker
    generation, changes nothing but the pause a cooldown asks for.
    """
    if outcome.kind == "cooldown" and group.pause_target:
        until = now + outcome.retry_after
        if until > state.paused_until:
            state.paused_until = until
            state.pause_reason = "cooldown"
    expiry = state.leases.pop(ticket_id, None)
    breaker = state.breaker
    probe_expiry = breaker.probes.pop(ticket_id, None) if breaker is not None else None
    if expiry is None or expiry < now:
        return False, ()
    config = group.breaker
    if config is None or breaker is None or generation != breaker.generation:
        return True, ()
    if outcome.kind in ("ignored", "cooldown") or breaker.state in ("forced_open", "disabled"):
        return True, ()
    failed = outcome.kind == "failure"
    duration = outcome.duration if outcome.duration is not None else now - admitted_at
    slow = duration >= config.slow_call_duration
    if breaker.state == "half_open":
        if probe_expiry is None:
            return True, ()
        if failed:
            return True, (_open(breaker, config, group.key, policy, now, rand, "half_open"),)
        breaker.probe_ok += 1
        breaker.probe_slow += slow
        if breaker.probe_ok < config.half_open_probes:
            return True, ()
        if math.isfinite(config.slow_call_duration) and (
            breaker.probe_slow * 100.0 >= config.slow_call_rate_threshold * breaker.probe_ok
        ):
            return True, (_open(breaker, config, group.key, policy, now, rand, "half_open"),)
        breaker.state = "closed"
        breaker.generation += 1
        breaker.opens = 0
        breaker.probes.clear()
        breaker.clear_window(config)
        return True, (Transition(policy, group.key, "half_open", "closed", breaker.generation, now),)
    breaker.add(config, now, failed, slow)
    if breaker.trips(config):
        return True, (_open(breaker, config, group.key, policy, now, rand, "closed"),)
    return True, ()


def adapt_rates(
    state: KeyState,
    group: Group,
    outcome: Outcome,
    admitted_at: float,
    duration: float,
    policy: str,
    now: float,
) -> tuple[RateChange, ...]:
    """Feed a recorded outcome to the group's adaptive limits: cut on overload, creep up on success.

    Called only for an outcome that was recorded (a live lease), so a duplicate or late
    record changes nothing. An overload answer to a call admitted before the last cut is
    old news and cuts nothing. A limit pinned by an operator's override does not adapt.
    """
    changes: tuple[RateChange, ...] = ()
    for limit in group.rates:
        config = limit.adaptive
        if config is None:
            continue
        override = state.overrides.get(limit.slot_id)
        if override is not None and override.active(now):
            continue
        overload = (
            outcome.kind == "cooldown"
            or outcome.overload
            or (config.slow is not None and outcome.kind == "success" and duration >= config.slow)
        )
        if not overload and outcome.kind != "success":
            continue
        data = state.adaptive.get(limit.slot_id)
        if data is None:
            data = state.adaptive[limit.slot_id] = AdaptiveData(config.clamp(limit.rate.per_second))
        if overload and admitted_at < data.cut_at:
            continue
        data.rate = config.clamp(data.rate)  # the policy's bounds may have changed
        data.roll(now)
        change = _adapt(data, config, overload, now)
        if change is not None:
            changes += (RateChange(policy, group.key, limit.slot_id, change[0], change[1], now, change[2]),)
    return changes


def _adapt(
    data: AdaptiveData, config: AdaptiveRate, overload: bool, now: float
) -> tuple[float, float, Literal["overload", "increase"]] | None:
    if not overload:
        data.count += 1
        if now - data.cut_at < config.cooldown or data.goodput(now) < BINDING_SHARE * data.rate:
            # Hold after a cut (let the upstream settle), and while successes come well below
            # the rate: they say nothing about the capacity above it.
            return None
        data.rate = min(config.ceiling.per_second, data.rate + config.increase / data.rate)
        if data.rate < data.reported * REPORT_STEP and data.rate < config.ceiling.per_second:
            return None
        if data.rate == data.reported:
            return None
        reason: Literal["overload", "increase"] = "increase"
    else:
        if now - data.cut_at < config.cooldown:
            return None  # one burst of overload answers from many workers is one cut
        measured = data.goodput(now) * GOODPUT_MARGIN
        cut = max(
            config.floor.per_second, data.rate * config.decrease, min(data.rate * GOODPUT_MARGIN, measured)
        )
        if cut >= data.rate:
            return None  # already at the floor
        data.rate = cut
        data.cut_at = now
        reason = "overload"
    change = (data.reported, data.rate, reason)
    data.previous, data.reported, data.changed_at = data.reported, data.rate, now
    return change


def _open(
    breaker: BreakerData, config: Breaker, key: str, policy: str, now: float, rand: float, was: BreakerState
) -> Transition:
    breaker.opens += 1
    breaker.state = "open"
    breaker.generation += 1
    breaker.open_until = now + config.break_duration(breaker.opens, rand)
    breaker.probes.clear()
    breaker.clear_window(config)
    return Transition(policy, key, was, "open", breaker.generation, now)


def spend_retry(state: KeyState, budget: RetryBudget, now: float) -> bool:
    """Take one retry from the key's budget if ``ratio`` × admissions + the floor allow it."""
    data = state.budget or BudgetData()
    state.budget = data
    weight = data.roll(budget.window, now)
    admissions = data.prev_adm * weight + data.cur_adm
    retries = data.prev_ret * weight + data.cur_ret
    if retries + 1 > budget.ratio * admissions + budget.min_per_second * budget.window:
        return False
    data.cur_ret += 1
    return True


def reset_breaker(state: KeyState, policy: str, key: str, now: float) -> tuple[Transition, ...]:
    """Back to CLOSED with counters cleared (an operator's reset)."""
    breaker = state.breaker
    if breaker is None:
        return ()
    was = breaker.state
    breaker.state = "closed"
    breaker.generation += 1
    breaker.opens = 0
    breaker.open_until = 0.0
    breaker.probes.clear()
    breaker.probe_ok = breaker.probe_slow = 0
    breaker.clear_window()
    if was == "closed":
        return ()
    return (Transition(policy, key, was, "closed", breaker.generation, now),)


def force_breaker(
    state: KeyState, to: BreakerState, policy: str, key: str, now: float
) -> tuple[Transition, ...]:
    """Put the breaker in ``forced_open``, ``disabled`` or ``closed`` until changed again."""
    if to == "closed":
        return reset_breaker(state, policy, key, now)
    breaker = state.breaker or BreakerData()
    state.breaker = breaker
    was = breaker.state
    breaker.state = to
    breaker.generation += 1
    breaker.probes.clear()
    breaker.clear_window()
    if was == to:
        return ()
    return (Transition(policy, key, was, to, breaker.generation, now),)


def _booked(state: KeyState) -> dict[str, float]:
    """The booking schedule of each rate limit (its theoretical arrival time)."""
    return {slot: tat for slot, tat in state.tats.items() if not slot.endswith("#x")}


def status_of(state: KeyState, key: str, now: float) -> KeyStatus:
    """A snapshot; an OPEN breaker whose break has ended reads as ``half_open``."""
    breaker = state.breaker
    leases = sum(1 for expiry in state.leases.values() if expiry > now)
    paused = state.paused_until if state.paused_until > now else None
    overrides = {slot: o for slot, o in state.overrides.items() if o.active(now)}
    adaptive = {
        slot: AdaptiveStatus(data.rate, data.previous, data.changed_at)
        for slot, data in state.adaptive.items()
    }
    if breaker is None:
        return KeyStatus(
            key,
            "closed",
            in_flight=leases,
            paused_until=paused,
            pause_reason=state.pause_reason if paused else None,
            rates=_booked(state),
            overrides=overrides,
            adaptive=adaptive,
            policy=state.policy,
            at=now,
        )
    shown: BreakerState = breaker.state
    if shown == "open" and now >= breaker.open_until:
        shown = "half_open"
    return KeyStatus(
        key,
        shown,
        generation=breaker.generation,
        open_until=breaker.open_until if breaker.state == "open" else None,
        calls=breaker.calls,
        failures=breaker.failures,
        slow_calls=breaker.slow,
        in_flight=leases,
        probes_in_flight=sum(1 for e in breaker.probes.values() if e > now),
        paused_until=paused,
        pause_reason=state.pause_reason if paused else None,
        rates=_booked(state),
        overrides=overrides,
        adaptive=adaptive,
        policy=state.policy,
        at=now,
    )
