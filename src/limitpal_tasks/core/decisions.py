"""The values that flow through the pipeline: requests to the store, decisions, tickets, outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .policy import Breaker, Bulkhead, Policy, RateLimit, RetryBudget
from .units import Rate, exact

__all__ = [
    "AdaptiveStatus",
    "AdmitRequest",
    "Admitted",
    "BreakerState",
    "Decision",
    "DeferReason",
    "Deferred",
    "Group",
    "GroupResult",
    "KeyStatus",
    "Outcome",
    "RateChange",
    "RateOverride",
    "RecordResult",
    "Ticket",
    "Transition",
]

DeferReason = Literal[
    "paused", "breaker_open", "half_open_busy", "concurrency", "rate_limited", "store_unavailable"
]
BreakerState = Literal["closed", "open", "half_open", "forced_open", "disabled"]
OutcomeKind = Literal["success", "failure", "ignored", "cooldown"]

# Stage of the pipeline a group starts at; groups are evaluated in this order.
STAGE_BREAKER, STAGE_BULKHEAD, STAGE_RATE, STAGE_PAUSE_ONLY = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Group:
    """What ``admit`` checks under one key: every component the policy scopes to it.

    ``reservations`` holds, per rate limit of the group (same order), the slot time the
    message carries from an earlier deferral, or ``None``.
    """

    key: str
    stage: int
    breaker: Breaker | None = None
    bulkhead: Bulkhead | None = None
    rates: tuple[RateLimit, ...] = ()
    budget: RetryBudget | None = None
    lease: float = 300.0
    reservations: tuple[float | None, ...] = ()
    pause_target: bool = False


@dataclass(slots=True)
class AdmitRequest:
    """One execution's admission, grouped by key in pipeline order."""

    policy: str
    ticket_id: str
    groups: tuple[Group, ...]
    now: float | None
    rand: float


@dataclass(frozen=True, slots=True)
class Transition:
    """A breaker changed state; reported once fleet-wide, by the caller that changed it."""

    policy: str
    key: str
    from_state: BreakerState
    to_state: BreakerState
    generation: int
    at: float


@dataclass(slots=True)
class GroupResult:
    """The store's answer for one group (internal to stores and the pipeline)."""

    admitted: bool
    now: float
    reason: DeferReason | None = None
    delay: float = 0.0
    generation: int = 0
    probe: bool = False
    early: bool = False
    reservations: tuple[float, ...] = ()
    transitions: tuple[Transition, ...] = ()


@dataclass(frozen=True, slots=True)
class Ticket:
    """What an admitted execution holds; hand it back with ``record``."""

    id: str
    policy: Policy = field(repr=False)
    groups: tuple[Group, ...] = field(repr=False)
    generations: tuple[int, ...]
    probe: bool
    admitted_at: float
    fallback: bool = False


@dataclass(frozen=True, slots=True)
class Admitted:
    """The execution may run now."""

    ticket: Ticket
    transitions: tuple[Transition, ...] = ()

    admitted: ClassVar[Literal[True]] = True


@dataclass(frozen=True, slots=True)
class Deferred:
    """The execution may not run now; requeue it after ``delay`` seconds.

    ``reservations`` (reservation id → slot time) and ``deferrals``/``first_seen`` must
    travel with the requeued message. ``exhausted`` names the bound that was hit
    (``"max_deferrals"`` or ``"deadline"``): such a task goes to the dead letter instead.
    """

    delay: float
    reason: DeferReason
    deferrals: int
    first_seen: float
    reservations: Mapping[str, float] = field(default_factory=dict)
    exhausted: str | None = None
    transitions: tuple[Transition, ...] = ()

    admitted: ClassVar[Literal[False]] = False


Decision = Admitted | Deferred


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an execution ended: ``Outcome.success()``, ``failure()``, ``ignored()``, ``cooldown(s)``.

    ``duration`` (seconds) feeds slow-call detection; when omitted the store measures
    from admission to record.
    """

    kind: OutcomeKind
    duration: float | None = None
    retry_after: float = 0.0
    overload: bool = False
    """The upstream said it is overloaded (an adaptive rate limit's signal): cut the rate."""

    @classmethod
    def success(cls, duration: float | None = None) -> Outcome:
        return cls("success", duration)

    @classmethod
    def failure(cls, duration: float | None = None, *, overload: bool = False) -> Outcome:
        return cls("failure", duration, overload=overload)

    @classmethod
    def ignored(cls, duration: float | None = None) -> Outcome:
        return cls("ignored", duration)

    @classmethod
    def cooldown(cls, seconds: float, duration: float | None = None) -> Outcome:
        return cls("cooldown", duration, max(0.0, float(seconds)))


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What recording changed: the transitions this caller caused (possibly none)."""

    now: float
    transitions: tuple[Transition, ...] = ()
    recorded: bool = True
    rate_changes: tuple[RateChange, ...] = ()


@dataclass(frozen=True, slots=True)
class RateChange:
    """An adaptive rate limit changed its key's rate (calls per second), fleet-wide.

    ``reason`` is ``"overload"`` for a cut, ``"increase"`` when successes raised the rate
    by a tenth since the last change reported (increases are continuous; events are not).
    """

    policy: str
    key: str
    limit: str
    from_rate: float
    to_rate: float
    at: float
    reason: Literal["overload", "increase"]


@dataclass(frozen=True, slots=True)
class AdaptiveStatus:
    """An adaptive limit's state under one key: its rate now, and its last change."""

    rate: float
    previous: float
    changed_at: float


@dataclass(frozen=True, slots=True)
class RateOverride:
    """An operator's rate for one limit of one key, fleet-wide, until ``until`` (``None``: permanent).

    It replaces the limit's rate and burst while it is in force; the key's schedule
    carries on (slots already booked stay booked).
    """

    rate: Rate
    burst: int = 1
    until: float | None = None

    @property
    def interval(self) -> float:
        return self.rate.interval

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now

    def __str__(self) -> str:
        per = exact(self.rate.per)
        return f"{exact(self.rate.limit)}/{'s' if per == '1' else per + 's'} burst {self.burst}"


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """A snapshot of everything kept under one key (for ``status`` and tests)."""

    key: str
    breaker: BreakerState
    generation: int = 0
    open_until: float | None = None
    calls: int = 0
    failures: int = 0
    slow_calls: int = 0
    in_flight: int = 0
    probes_in_flight: int = 0
    paused_until: float | None = None
    pause_reason: str | None = None
    rates: Mapping[str, float] = field(default_factory=dict)
    """The booking schedule (theoretical arrival time) of each rate limit, by limit id."""
    overrides: Mapping[str, RateOverride] = field(default_factory=dict)
    """Operator rate overrides in force, by limit id."""
    policy: str | None = None
    """The policy that last asked for an admission under this key."""
    adaptive: Mapping[str, AdaptiveStatus] = field(default_factory=dict)
    """Adaptive rate limits' current rates, by limit id."""
    at: float | None = None
    """The store's time of this snapshot (what ``open_until`` and the schedules compare to)."""
