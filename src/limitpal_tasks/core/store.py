"""The contract every state store fulfils, and the pieces of it that are the same for all.

A store persists and applies the rules of :mod:`limitpal_tasks.core.rules` atomically;
it never decides jitter, deferral bounds or fail modes (the :class:`Pipeline` does).
Every operation has an ``async`` twin with the ``_async`` suffix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .deadletter import DeadLetter
from .decisions import (
    AdmitRequest,
    BreakerState,
    DeferReason,
    GroupResult,
    KeyStatus,
    Outcome,
    RecordResult,
    Ticket,
    Transition,
)
from .parking import ParkedEntry, ParkSummary
from .policy import RetryBudget
from .units import Rate

__all__ = ["AdmitResult", "Store", "merge_admission", "reservation_id"]


def reservation_id(key: str, slot_id: str) -> str:
    """How a booked rate-limit slot is named in a message's headers."""
    return f"{key}|{slot_id}"


@dataclass(slots=True)
class AdmitResult:
    """A store's answer to :meth:`Store.admit`, before the pipeline adds jitter and bounds."""

    admitted: bool
    now: float
    reason: DeferReason | None = None
    delay: float = 0.0
    early: bool = False
    reservations: dict[str, float] = field(default_factory=dict)
    generations: tuple[int, ...] = ()
    probe: bool = False
    transitions: tuple[Transition, ...] = ()


def merge_admission(request: AdmitRequest, results: Sequence[GroupResult]) -> AdmitResult:
    """Fold per-group answers (evaluated in order, stopping at the first deferral) into one."""
    last = results[-1]
    if len(results) == 1 and last.admitted:
        return AdmitResult(
            True, last.now, generations=(last.generation,), probe=last.probe, transitions=last.transitions
        )
    transitions = tuple(t for r in results for t in r.transitions)
    if not last.admitted:
        reservations: dict[str, float] = {}
        # Slots booked by the deferring group, and slots carried from an earlier deferral
        # that groups admitted before it had used: nothing was consumed, so all stay valid.
        for group, result in zip(request.groups, results):
            for limit, slot in zip(group.rates, result.reservations):
                if slot:
                    reservations[reservation_id(group.key, limit.slot_id)] = slot
        # The deferring group stopped before its rate limits (a pause, its breaker, its
        # bulkhead) and groups after it were not evaluated: their carried slots stand.
        unread = request.groups[len(results) :]
        if not last.reservations:
            unread = (request.groups[len(results) - 1], *unread)
        for group in unread:
            for limit, carried in zip(group.rates, group.reservations):
                if carried is not None:
                    reservations[reservation_id(group.key, limit.slot_id)] = carried
        return AdmitResult(
            False, last.now, last.reason, last.delay, last.early, reservations, transitions=transitions
        )
    return AdmitResult(
        True,
        last.now,
        generations=tuple(r.generation for r in results),
        probe=any(r.probe for r in results),
        transitions=transitions,
    )


@runtime_checkable
class Store(Protocol):
    """Shared state for the pipeline: atomic, keyed, expiring.

    ``now=None`` means "the store's own clock" (for Redis, the server's ``TIME``); tests
    pass an explicit ``now`` from a :class:`MockClock`.
    """

    def admit(self, request: AdmitRequest) -> AdmitResult: ...
    async def admit_async(self, request: AdmitRequest) -> AdmitResult: ...

    def record(self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float) -> RecordResult: ...
    async def record_async(
        self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float
    ) -> RecordResult: ...

    def spend_retry(self, key: str, budget: RetryBudget, now: float | None) -> bool: ...
    async def spend_retry_async(self, key: str, budget: RetryBudget, now: float | None) -> bool: ...

    def pause(self, key: str, seconds: float, reason: str, now: float | None = None) -> None: ...
    def resume(self, key: str) -> None: ...
    def status(self, key: str, now: float | None = None) -> KeyStatus: ...
    def keys(self, match: str = "*") -> Iterator[str]:
        """The keys that hold state, those matching the glob ``match`` (no order)."""
        ...

    def override(
        self,
        key: str,
        limit_id: str,
        rate: Rate | None,
        burst: int = 1,
        seconds: float | None = None,
        now: float | None = None,
    ) -> None:
        """Run limit ``limit_id`` of ``key`` at ``rate`` fleet-wide for ``seconds`` (``None``:
        until lifted); ``rate=None`` lifts it."""
        ...

    def reset(self, key: str, policy: str = "", now: float | None = None) -> tuple[Transition, ...]: ...
    def force(
        self, key: str, state: BreakerState, policy: str = "", now: float | None = None
    ) -> tuple[Transition, ...]: ...

    def put_dead(self, letter: DeadLetter) -> None: ...
    def list_dead(self, limit: int = 100) -> list[DeadLetter]: ...
    def take_dead(self, letter_id: str) -> DeadLetter | None: ...
    def purge_dead(self) -> int:
        """Delete every dead letter; how many there were."""
        ...

    def park(self, entry: ParkedEntry, limit: int, now: float | None = None) -> ParkedEntry | None:
        """Keep ``entry`` in the park named ``entry.park`` until ``entry.delay`` from now; the
        stored entry (its ``id`` and ``due`` set), or ``None`` when ``entry.key`` already
        holds ``limit`` parked tasks there."""
        ...

    def take_parked(self, park: str, limit: int, lease: float, now: float | None = None) -> list[ParkedEntry]:
        """Claim up to ``limit`` due entries, each for ``lease`` seconds: in due order, each
        key paced at its entries' ``interval``. An entry claimed but not confirmed within
        its lease (its releaser died) is due again."""
        ...

    def confirm_parked(self, park: str, entry_id: str) -> None:
        """A claimed entry was published: forget it."""
        ...

    def parked(self, park: str, now: float | None = None) -> list[ParkSummary]:
        """Per key with parked tasks: how many, and the next due time."""
        ...

    def release_parked(self, park: str, key: str, now: float | None = None) -> int:
        """Make every parked task of ``key`` due now (still paced); how many."""
        ...

    def purge_parked(self, park: str, key: str | None = None) -> int:
        """Delete the parked tasks of ``key`` (of every key when ``None``); how many."""
        ...

    def close(self) -> None: ...
