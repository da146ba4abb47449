"""MemoryStore: the embedded store and the reference semantics, for one process."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

from ..core.clock import Clock, MonotonicClock
from ..core.deadletter import DeadLetter
from ..core.decisions import (
    AdmitRequest,
    BreakerState,
    GroupResult,
    KeyStatus,
    Outcome,
    RecordResult,
    Ticket,
    Transition,
)
from ..core.policy import RetryBudget
from ..core.rules import (
    KeyState,
    admit_group,
    force_breaker,
    record_group,
    release_group,
    reset_breaker,
    spend_retry,
    status_of,
)
from ..core.store import AdmitResult, merge_admission
from ..errors import ConfigurationError

__all__ = ["MemoryStore"]

_SWEEP_PER_CALL = 32
_SHARDS = 16  # independent locks, so threads working on different keys rarely wait


class _Shard:
    """A slice of the keys with its own lock and LRU order."""

    __slots__ = ("evicted", "idle_ttl", "keys", "lock", "max_keys", "ops")

    def __init__(self, idle_ttl: float, max_keys: int) -> None:
        self.lock = threading.Lock()
        self.keys: OrderedDict[str, tuple[KeyState, list[float]]] = OrderedDict()
        self.idle_ttl = idle_ttl
        self.max_keys = max_keys
        self.evicted = 0
        self.ops = 0

    # The caller holds ``lock`` for both methods.

    def state(self, key: str, now: float) -> KeyState:
        entry = self.keys.get(key)
        if entry is None:
            self.sweep(now)
            entry = (KeyState(), [now])
            self.keys[key] = entry
            if len(self.keys) > self.max_keys:
                self.keys.popitem(last=False)
                self.evicted += 1
        else:
            entry[1][0] = now
            self.keys.move_to_end(key)
            self.ops += 1
            if not self.ops & 15:  # look at the oldest keys every 16 operations: amortized O(1)
                self.sweep(now)
        return entry[0]

    def sweep(self, now: float) -> None:
        keys = self.keys
        for _ in range(_SWEEP_PER_CALL):
            if not keys:
                return
            key, (state, touched) = next(iter(keys.items()))
            if touched[0] + self.idle_ttl > now:
                return
            if state.horizon() > now:
                touched[0] = now
                keys.move_to_end(key)
            else:
                del keys[key]
                self.evicted += 1


class MemoryStore:
    """State for one process: thread-safe, O(1) per decision, bounded in memory.

    A key idle for ``idle_ttl`` seconds (and with nothing pending: no open breaker, pause,
    lease or booked slot) is evicted; beyond ``max_keys`` keys the least recently used go
    first. Every worker process has its own ``MemoryStore``: use :class:`RedisStore` to
    share state across processes and hosts.

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
        count = min(_SHARDS, int(max_keys))
        self._shards = tuple(_Shard(float(idle_ttl), int(max_keys) // count) for _ in range(count))
        self._dead_lock = threading.Lock()
        self._dead: OrderedDict[str, DeadLetter] = OrderedDict()
        self._dead_limit = dead_letter_limit

    def __len__(self) -> int:
        return sum(len(shard.keys) for shard in self._shards)

    @property
    def evicted(self) -> int:
        """Keys evicted so far (idle past ``idle_ttl``, or beyond ``max_keys``)."""
        return sum(shard.evicted for shard in self._shards)

    def _shard(self, key: str) -> _Shard:
        return self._shards[hash(key) % len(self._shards)]

    def _now(self, now: float | None) -> float:
        return self._clock.now() if now is None else now

    # -- the pipeline's operations --------------------------------------------

    def admit(self, request: AdmitRequest) -> AdmitResult:
        now = self._now(request.now)
        groups = request.groups
        if len(groups) == 1:  # one key: one lock, nothing to compensate
            group = groups[0]
            shard = self._shard(group.key)
            with shard.lock:
                result = admit_group(
                    shard.state(group.key, now), group, request.ticket_id, request.policy, now, request.rand
                )
            return merge_admission(request, (result,))
        shards = [self._shard(group.key) for group in groups]
        locks = sorted({id(shard): shard.lock for shard in shards}.items())  # one global order: no deadlock
        results: list[GroupResult] = []
        for _, lock in locks:
            lock.acquire()
        try:
            states = [shard.state(group.key, now) for shard, group in zip(shards, groups)]
            for state, group in zip(states, groups):
                result = admit_group(state, group, request.ticket_id, request.policy, now, request.rand)
                results.append(result)
                if not result.admitted:
                    for done_state, done_group, done in zip(states, groups, results):
                        if done.admitted:
                            release_group(done_state, done_group, request.ticket_id, done)
                    break
        finally:
            for _, lock in locks:
                lock.release()
        return merge_admission(request, results)

    async def admit_async(self, request: AdmitRequest) -> AdmitResult:
        return self.admit(request)

    def record(self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float) -> RecordResult:
        now = self._now(now)
        transitions: tuple[Transition, ...] = ()
        recorded = False
        for group, generation in zip(ticket.groups, ticket.generations):
            shard = self._shard(group.key)
            with shard.lock:
                done, changed = record_group(
                    shard.state(group.key, now),
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
        return RecordResult(now, transitions, recorded)

    async def record_async(
        self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float
    ) -> RecordResult:
        return self.record(ticket, outcome, now, rand)

    def spend_retry(self, key: str, budget: RetryBudget, now: float | None) -> bool:
        now = self._now(now)
        shard = self._shard(key)
        with shard.lock:
            return spend_retry(shard.state(key, now), budget, now)

    async def spend_retry_async(self, key: str, budget: RetryBudget, now: float | None) -> bool:
        return self.spend_retry(key, budget, now)

    # -- operations for operators ---------------------------------------------

    def pause(self, key: str, seconds: float, reason: str, now: float | None = None) -> None:
        now = self._now(now)
        shard = self._shard(key)
        with shard.lock:
            state = shard.state(key, now)
            state.paused_until = now + seconds
            state.pause_reason = reason

    def resume(self, key: str) -> None:
        shard = self._shard(key)
        with shard.lock:
            entry = shard.keys.get(key)
            if entry is not None:
                entry[0].paused_until = 0.0
                entry[0].pause_reason = None

    def status(self, key: str, now: float | None = None) -> KeyStatus:
        now = self._now(now)
        shard = self._shard(key)
        with shard.lock:
            entry = shard.keys.get(key)
            return status_of(entry[0] if entry else KeyState(), key, now)

    def reset(self, key: str, policy: str = "", now: float | None = None) -> tuple[Transition, ...]:
        now = self._now(now)
        shard = self._shard(key)
        with shard.lock:
            return reset_breaker(shard.state(key, now), policy, key, now)

    def force(
        self, key: str, state: BreakerState, policy: str = "", now: float | None = None
    ) -> tuple[Transition, ...]:
        if state not in ("forced_open", "disabled", "closed"):
            raise ConfigurationError("state", state, 'expected "forced_open", "disabled" or "closed"')
        now = self._now(now)
        shard = self._shard(key)
        with shard.lock:
            return force_breaker(shard.state(key, now), state, policy, key, now)

    # -- dead letters ---------------------------------------------------------

    def put_dead(self, letter: DeadLetter) -> None:
        with self._dead_lock:
            self._dead[letter.id] = letter
            while len(self._dead) > self._dead_limit:
                self._dead.popitem(last=False)

    def list_dead(self, limit: int = 100) -> list[DeadLetter]:
        with self._dead_lock:
            newest: deque[DeadLetter] = deque(self._dead.values(), maxlen=limit)
        return list(reversed(newest))

    def take_dead(self, letter_id: str) -> DeadLetter | None:
        with self._dead_lock:
            return self._dead.pop(letter_id, None)

    def close(self) -> None:
        """Nothing to release; present for the :class:`Store` contract."""
