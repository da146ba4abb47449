"""MemoryStore: the embedded store and the reference semantics, for one process."""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator

from ..core.clock import Clock, MonotonicClock
from ..core.deadletter import DeadLetter
from ..core.decisions import (
    AdmitRequest,
    BreakerState,
    GroupResult,
    KeyStatus,
    Outcome,
    RateChange,
    RateOverride,
    RecordResult,
    Ticket,
    Transition,
)
from ..core.parking import ParkedEntry, ParkSummary
from ..core.policy import RetryBudget
from ..core.rules import (
    KeyState,
    adapt_rates,
    admit_group,
    force_breaker,
    record_group,
    release_group,
    reset_breaker,
    set_override,
    spend_retry,
    status_of,
)
from ..core.store import AdmitResult, merge_admission
from ..core.units import Rate
from ..errors import ConfigurationError

__all__ = ["MemoryStore"]

log = logging.getLogger("limitpal_tasks.stores.memory")

_SWEEP_EVERY = 16  # operations between two looks at the least recently used keys
_SWEEP_PER_CALL = 32


class MemoryStore:
    """State for one process: thread-safe, O(1) per decision, bounded in memory.

    A key idle for ``idle_ttl`` seconds (and with nothing pending: no open breaker, pause,
    live lease or booked slot) is evicted; beyond ``max_keys`` keys the least recently
    used goes first. Every worker process has its own ``MemoryStore``: use ``RedisStore``
    to share state across processes and hosts.

    >>> store = MemoryStore()
    >>> store.status("tenant:acme").breaker
    'closed'
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        idle_ttl: float = 3600.0,
        max_keys: int = 100_000,
        dead_letter_limit: int = 10_000,
    ) -> None:
        if not idle_ttl > 0:
            raise ConfigurationError("MemoryStore.idle_ttl", idle_ttl, "expected seconds > 0")
        if not max_keys >= 1:
            raise ConfigurationError("MemoryStore.max_keys", max_keys, "expected an integer >= 1")
        self._clock = clock or MonotonicClock()
        self._idle_ttl = float(idle_ttl)
        self._max_keys = int(max_keys)
        self._lock = threading.Lock()
        # key -> (state, [last touched]); ordered from least to most recently used
        self._keys: OrderedDict[str, tuple[KeyState, list[float]]] = OrderedDict()
        self._ops = 0
        self._dead: OrderedDict[str, DeadLetter] = OrderedDict()
        self._dead_limit = dead_letter_limit
        self.evicted = 0
        """Keys evicted so far (idle past ``idle_ttl``, or beyond ``max_keys``)."""
        self.dead_dropped = 0
        """Dead letters dropped (oldest first) beyond ``dead_letter_limit``."""
        self._parks: dict[str, _Park] = {}

    def __len__(self) -> int:
        return len(self._keys)

    # -- bookkeeping (the caller holds the lock) --------------------------------

    def _state(self, key: str, now: float) -> KeyState:
        entry = self._keys.get(key)
        if entry is None:
            entry = (KeyState(), [now])
            self._keys[key] = entry
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
                self.evicted += 1
        else:
            entry[1][0] = now
            self._keys.move_to_end(key)
        return entry[0]

    def _sweep(self, now: float) -> None:
        """Evict idle keys from the least recently used end: amortized O(1)."""
        self._ops += 1
        if self._ops % _SWEEP_EVERY:
            return
        keys = self._keys
        for _ in range(_SWEEP_PER_CALL):
            if not keys:
                return
            key, (state, touched) = next(iter(keys.items()))
            if touched[0] + self._idle_ttl > now:
                return
            if state.horizon() > now:
                touched[0] = now  # still pending: look again after another idle_ttl
                keys.move_to_end(key)
            else:
                del keys[key]
                self.evicted += 1

    def _now(self, now: float | None) -> float:
        return self._clock.now() if now is None else now

    # -- the pipeline's operations --------------------------------------------

    def admit(self, request: AdmitRequest) -> AdmitResult:
        now = self._now(request.now)
        groups = request.groups
        results: list[GroupResult] = []
        with self._lock:
            self._sweep(now)
            if len(groups) == 1:  # one key: nothing to compensate
                group = groups[0]
                state = self._state(group.key, now)
                results.append(
                    admit_group(state, group, request.ticket_id, request.policy, now, request.rand)
                )
            else:
                states = [self._state(group.key, now) for group in groups]
                for state, group in zip(states, groups):
                    result = admit_group(state, group, request.ticket_id, request.policy, now, request.rand)
                    results.append(result)
                    if not result.admitted:
                        for done_state, done_group, done in zip(states, groups, results):
                            if done.admitted:
                                release_group(done_state, done_group, request.ticket_id, done)
                        break
        return merge_admission(request, results)

    async def admit_async(self, request: AdmitRequest) -> AdmitResult:
        return self.admit(request)

    def record(self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float) -> RecordResult:
        now = self._now(now)
        transitions: tuple[Transition, ...] = ()
        rate_changes: tuple[RateChange, ...] = ()
        recorded = False
        with self._lock:
            self._sweep(now)
            for group, generation in zip(ticket.groups, ticket.generations):
                state = self._state(group.key, now)
                done, changed = record_group(
                    state,
                    group,
                    ticket.id,
                    generation,
                    outcome,
                    ticket.admitted_at,
                    ticket.policy.name,
                    now,
                    rand,
                )
                recorded = recorded or done
                transitions += changed
                if done and ticket.policy.adaptive:
                    duration = outcome.duration if outcome.duration is not None else now - ticket.admitted_at
                    rate_changes += adapt_rates(
                        state, group, outcome, ticket.admitted_at, duration, ticket.policy.name, now
                    )
        return RecordResult(now, transitions, recorded, rate_changes)

    async def record_async(
        self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float
    ) -> RecordResult:
        return self.record(ticket, outcome, now, rand)

    def spend_retry(self, key: str, budget: RetryBudget, now: float | None) -> bool:
        now = self._now(now)
        with self._lock:
            return spend_retry(self._state(key, now), budget, now)

    async def spend_retry_async(self, key: str, budget: RetryBudget, now: float | None) -> bool:
        return self.spend_retry(key, budget, now)

    # -- operations for operators ---------------------------------------------

    def pause(self, key: str, seconds: float, reason: str, now: float | None = None) -> None:
        now = self._now(now)
        with self._lock:
            state = self._state(key, now)
            state.paused_until = now + seconds
            state.pause_reason = reason

    def resume(self, key: str) -> None:
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None:
                entry[0].paused_until = 0.0
                entry[0].pause_reason = None

    def status(self, key: str, now: float | None = None) -> KeyStatus:
        now = self._now(now)
        with self._lock:
            entry = self._keys.get(key)
            return status_of(entry[0] if entry else KeyState(), key, now)

    def keys(self, match: str = "*") -> Iterator[str]:
        with self._lock:
            keys = list(self._keys)
        return iter([k for k in keys if fnmatch.fnmatchcase(k, match)] if match != "*" else keys)

    def override(
        self,
        key: str,
        limit_id: str,
        rate: Rate | None,
        burst: int = 1,
        seconds: float | None = None,
        now: float | None = None,
    ) -> None:
        now = self._now(now)
        with self._lock:
            state = self._state(key, now)
            until = None if seconds is None else now + seconds
            set_override(state, limit_id, None if rate is None else RateOverride(rate, burst, until))

    def reset(self, key: str, policy: str = "", now: float | None = None) -> tuple[Transition, ...]:
        now = self._now(now)
        with self._lock:
            return reset_breaker(self._state(key, now), policy, key, now)

    def force(
        self, key: str, state: BreakerState, policy: str = "", now: float | None = None
    ) -> tuple[Transition, ...]:
        if state not in ("forced_open", "disabled", "closed"):
            raise ConfigurationError("state", state, 'expected "forced_open", "disabled" or "closed"')
        now = self._now(now)
        with self._lock:
            return force_breaker(self._state(key, now), state, policy, key, now)

    # -- dead letters ---------------------------------------------------------

    def put_dead(self, letter: DeadLetter) -> None:
        with self._lock:
            self._dead[letter.id] = letter
            while len(self._dead) > self._dead_limit:
                dropped = self._dead.popitem(last=False)[1]
                self.dead_dropped += 1
                log.warning(
                    "dead letter full (%d entries): dropped the oldest, %s %s",
                    self._dead_limit,
                    dropped.task_name,
                    dropped.id,
                )

    def list_dead(self, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            newest: deque[DeadLetter] = deque(self._dead.values(), maxlen=limit)
        return list(reversed(newest))

    def take_dead(self, letter_id: str) -> DeadLetter | None:
        with self._lock:
            return self._dead.pop(letter_id, None)

    def purge_dead(self) -> int:
        with self._lock:
            count = len(self._dead)
            self._dead.clear()
        return count

    # -- parked deferrals -------------------------------------------------------

    def _park(self, name: str) -> _Park:
        park = self._parks.get(name)
        if park is None:
            park = self._parks[name] = _Park()
        return park

    def park(self, entry: ParkedEntry, limit: int, now: float | None = None) -> ParkedEntry | None:
        now = self._now(now)
        with self._lock:
            return self._park(entry.park).put(entry, limit, now)

    def take_parked(self, park: str, limit: int, lease: float, now: float | None = None) -> list[ParkedEntry]:
        now = self._now(now)
        with self._lock:
            return self._park(park).take(limit, lease, now)

    def confirm_parked(self, park: str, entry_id: str) -> None:
        with self._lock:
            self._park(park).confirm(entry_id)

    def parked(self, park: str, now: float | None = None) -> list[ParkSummary]:
        with self._lock:
            return self._park(park).summary()

    def release_parked(self, park: str, key: str, now: float | None = None) -> int:
        now = self._now(now)
        with self._lock:
            return self._park(park).release(key, now)

    def purge_parked(self, park: str, key: str | None = None) -> int:
        with self._lock:
            return self._park(park).purge(key)

    def close(self) -> None:
        """Nothing to release; present for the :class:`Store` contract."""


class _Park:
    """Parked entries (see :class:`~limitpal_tasks.Store.take_parked`); the caller holds the lock.

    The RedisStore's ``park.lua`` keeps the same structures: entries by id, their due
    times, claims, the entries already given a paced slot, a count and a pace per key.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.entries: dict[str, ParkedEntry] = {}
        self.due: dict[str, float] = {}
        self.heap: list[tuple[float, str]] = []  # (due, id), stale items skipped
        self.claims: dict[str, float] = {}
        self.slotted: set[str] = set()
        self.count: dict[str, int] = {}
        self.pace: dict[str, float] = {}

    def schedule(self, entry_id: str, due: float) -> None:
        self.due[entry_id] = due
        heapq.heappush(self.heap, (due, entry_id))

    def put(self, entry: ParkedEntry, limit: int, now: float) -> ParkedEntry | None:
        if self.count.get(entry.key, 0) >= limit:
            return None
        self.seq += 1
        stored = dataclasses.replace(entry, id=f"{self.seq:016d}", due=now + entry.delay)
        self.entries[stored.id] = stored
        self.count[stored.key] = self.count.get(stored.key, 0) + 1
        self.schedule(stored.id, stored.due)
        return stored

    def take(self, limit: int, lease: float, now: float) -> list[ParkedEntry]:
        for entry_id, expiry in list(self.claims.items()):
            if expiry <= now:  # its releaser died before confirming: due again, at once
                del self.claims[entry_id]
                self.slotted.add(entry_id)
                self.schedule(entry_id, now)
        taken: list[ParkedEntry] = []
        scanned = 0
        while self.heap and len(taken) < limit and scanned < 4 * limit:
            due, entry_id = self.heap[0]
            if due > now:
                break
            heapq.heappop(self.heap)
            if self.due.get(entry_id) != due:
                continue  # rescheduled, claimed or gone since
            scanned += 1
            entry = self.entries[entry_id]
            if entry_id in self.slotted:
                self.slotted.discard(entry_id)
            elif entry.interval > 0:  # paced: it takes the key's next release slot
                pace = self.pace.get(entry.key, 0.0)
                if pace > now:  # the key's next release slot is this entry's
                    self.slotted.add(entry_id)
                    self.schedule(entry_id, pace)
                    self.pace[entry.key] = pace + entry.interval
                    continue
                self.pace[entry.key] = max(pace, now) + entry.interval
            del self.due[entry_id]
            self.claims[entry_id] = now + lease
            taken.append(dataclasses.replace(entry, due=due))
        return taken

    def confirm(self, entry_id: str) -> None:
        self.claims.pop(entry_id, None)
        self.forget(entry_id)

    def forget(self, entry_id: str) -> None:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return
        self.due.pop(entry_id, None)
        self.slotted.discard(entry_id)
        left = self.count.get(entry.key, 1) - 1
        if left > 0:
            self.count[entry.key] = left
        else:
            self.count.pop(entry.key, None)
            self.pace.pop(entry.key, None)

    def summary(self) -> list[ParkSummary]:
        out: dict[str, list[float]] = {}
        for entry_id, entry in self.entries.items():
            out.setdefault(entry.key, [])
            if entry_id in self.due:
                out[entry.key].append(self.due[entry_id])
        return [
            ParkSummary(key, self.count.get(key, 0), min(times) if times else None)
            for key, times in sorted(out.items())
        ]

    def release(self, key: str, now: float) -> int:
        ids = [i for i, e in self.entries.items() if e.key == key and i in self.due]
        for entry_id in ids:
            self.slotted.discard(entry_id)
            self.schedule(entry_id, now)
        self.pace.pop(key, None)
        return len(ids)

    def purge(self, key: str | None) -> int:
        ids = [i for i, e in self.entries.items() if key is None or e.key == key]
        for entry_id in ids:
            self.claims.pop(entry_id, None)
            self.forget(entry_id)
        return len(ids)
