"""RedisStore: state shared by every worker process on every host, one Lua round trip per decision.

Each key's state lives under ``{prefix}:{<key>}:<part>`` — the key inside a hash tag, so
all of it sits in one Redis Cluster slot — and carries a TTL re-armed by every write.
Scripts read the server's ``TIME`` so hosts with skewed clocks agree; tests pass an
explicit ``now`` through a :class:`~limitpal_tasks.MockClock`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.cluster
from redis.commands.core import AsyncScript, Script

from ..core.clock import Clock, MonotonicClock
from ..core.deadletter import DeadLetter
from ..core.decisions import (
    AdaptiveStatus,
    AdmitRequest,
    BreakerState,
    DeferReason,
    Group,
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
from ..core.store import AdmitResult, merge_admission
from ..core.units import Rate, exact
from ..errors import ConfigurationError, StoreError

__all__ = ["RedisStore"]

log = logging.getLogger("limitpal_tasks.stores.redis")

_T = TypeVar("_T")
_SCRIPTS = ("admit", "record", "retry", "control", "dead", "park")
_ENCODE_CACHE = 8192
_SEP = "\x1f"  # packs a group's fields into one argument; keys never contain it


_Record = tuple[list[str], list[str]]  # the KEYS and packed ARGV of one record
_MAX_PENDING = 10_000  # batched successes kept while the store is unreachable


def _transitions(policy: str, items: Sequence[Any], now: float) -> tuple[Transition, ...]:
    """Transitions from a script reply: {key, from, to, generation[, policy]} each."""
    return tuple(
        Transition(
            _s(t[4]) if len(t) > 4 else policy,
            _s(t[0]),
            cast(BreakerState, _s(t[1])),
            cast(BreakerState, _s(t[2])),
            int(float(t[3])),
            now,
        )
        for t in items
    )


def _allowed(reply: Any) -> bool:
    if reply not in (0, 1):
        raise ValueError(f"expected 0 or 1, got {reply!r}")
    return bool(reply == 1)


def _load(name: str) -> str:
    folder = resources.files("limitpal_tasks.stores") / "lua"
    return (folder / "_lib.lua").read_text("utf-8") + "\n" + (folder / f"{name}.lua").read_text("utf-8")


def _f(value: float) -> str:
    return repr(float(value))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _merge_records(results: Sequence[RecordResult]) -> RecordResult:
    """One ticket's result from its per-key records (Redis Cluster: one call per key)."""
    return RecordResult(
        results[-1].now,
        tuple(t for r in results for t in r.transitions),
        any(r.recorded for r in results),
        tuple(c for r in results for c in r.rate_changes),
    )


def _adaptive(value: str) -> AdaptiveStatus:
    rate, _, previous, changed_at = value.split(":")[:4]
    return AdaptiveStatus(float(rate), float(previous), float(changed_at))


def _override(value: str) -> RateOverride:
    limit, per, burst, until = value.split(":")
    rate = Rate(float(limit) if "." in limit or "e" in limit else int(limit), float(per))
    return RateOverride(rate, int(burst), None if float(until) == 0 else float(until))


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Guard:
    """A local breaker around the store: after repeated failures, fail fast for a while.

    During an outage this keeps every task from paying ``store_timeout``; one call is let
    through after each pause (growing from 0.5 s to 10 s) to find out whether Redis is back.
    """

    def __init__(self, clock: Clock, threshold: int = 3, pause: float = 0.5, max_pause: float = 10.0) -> None:
        self._clock = clock
        self._threshold = threshold
        self._base = pause
        self._max = max_pause
        self._lock = threading.Lock()
        self._failures = 0
        self._pause = pause
        self._until = 0.0

    def check(self) -> None:
        if self._failures >= self._threshold:
            now = self._clock.now()
            with self._lock:
                if now < self._until:
                    raise StoreError(f"store unavailable (failing fast for {self._until - now:.2f}s more)")
                self._until = now + self._pause  # let this one call through; others keep failing fast

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= self._threshold:
                self._until = self._clock.now() + self._pause
                self._pause = min(self._max, self._pause * 2)

    def succeeded(self) -> None:
        if self._failures:
            with self._lock:
                self._failures = 0
                self._pause = self._base


class RedisStore:
    """The fleet-wide store. Build it with :meth:`from_url`::

        store = RedisStore.from_url("redis://localhost:6379/0", prefix="limitpal", store_timeout=0.25)

    Works with Redis ≥ 6.2, Valkey, Redis Cluster (``redis+cluster://`` or ``cluster=True``),
    ``rediss://`` TLS and ACL users (``redis://user:password@host``). ``admit`` and
    ``record`` cost one round trip each (on a cluster, one per distinct key of the policy).

    Successes that free no bulkhead slot and are neither half-open probes nor slow-call
    candidates are batched: they ride along with this process's next round trip, or are
    written after ``batch_delay`` seconds at the latest (``batch_delay=0`` turns batching
    off; :meth:`flush` and :meth:`close` write them now). A transition such a success
    causes (it can complete ``minimum_calls`` at a failing rate) is reported when written.
    """

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        *,
        prefix: str = "limitpal",
        clock: Clock | None = None,
        idle_ttl: float = 3600.0,
        async_factory: Callable[[], redis.asyncio.Redis | redis.asyncio.RedisCluster] | None = None,
        dead_letter_limit: int = 10_000,
        dead_letter_ttl: float = 30 * 86400,
        batch_delay: float = 0.05,
        batch_size: int = 64,
        park_ttl: float = 7 * 86400,
    ) -> None:
        if not prefix or any(c in prefix for c in "{} \n"):
            raise ConfigurationError("prefix", prefix, "expected a non-empty name without braces or spaces")
        if not idle_ttl > 0:
            raise ConfigurationError("idle_ttl", idle_ttl, "expected seconds > 0")
        self._client = client
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self.prefix = prefix
        self._clock = clock
        self._idle = _f(idle_ttl)
        self._scripts: dict[str, Script] = {name: client.register_script(_load(name)) for name in _SCRIPTS}
        self._async_factory = async_factory
        self._async_client: redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None
        self._async_scripts: dict[str, AsyncScript] = {}
        self._guard = _Guard(clock or MonotonicClock())
        self._encoded: dict[int, tuple[Group, tuple[str, str, str]]] = {}
        self._dead_limit = str(int(dead_letter_limit))
        self._dead_ttl = str(int(dead_letter_ttl))
        self._dead_keys = [f"{prefix}:{{dead}}:h", f"{prefix}:{{dead}}:z"]
        self._park_ttl = str(int(park_ttl))
        if batch_delay < 0 or batch_size < 1:
            raise ConfigurationError(
                "batch_delay", (batch_delay, batch_size), "expected batch_delay >= 0 and batch_size >= 1"
            )
        self._batch_delay = float(batch_delay)
        self._batch_size = int(batch_size)
        self._pending: list[_Record] = []
        self._sink: Callable[[Sequence[Transition]], None] | None = None
        self._pending_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        ref = weakref.ref(self)

        def forget_in_child() -> None:
            store = ref()
            if store is not None:
                store._forget_pending()

        os.register_at_fork(after_in_child=forget_in_child)

    # -- construction -----------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "limitpal",
        store_timeout: float = 0.25,
        clock: Clock | None = None,
        cluster: bool | None = None,
        idle_ttl: float = 3600.0,
        batch_delay: float = 0.05,
        batch_size: int = 64,
        dead_letter_limit: int = 10_000,
        dead_letter_ttl: float = 30 * 86400,
        park_ttl: float = 7 * 86400,
        **client_options: Any,
    ) -> RedisStore:
        """Connect to ``redis://``, ``rediss://``, ``unix://`` or ``redis+cluster://`` (``?cluster=true``).

        ``store_timeout`` bounds every call (connect and reply); other keyword arguments
        go to the redis-py client (``password``, ``ssl_ca_certs``, ...).
        """
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        scheme = parts.scheme
        if scheme in ("redis+cluster", "rediss+cluster"):
            scheme = scheme.split("+")[0]
            cluster = True if cluster is None else cluster
        if "cluster" in query:
            flag = query.pop("cluster")[0].lower()
            if flag not in ("1", "true", "yes", "0", "false", "no"):
                raise ConfigurationError("store_url", url, "expected ?cluster=true or ?cluster=false")
            cluster = flag in ("1", "true", "yes")
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError(
                "store_url", url, "expected a redis://, rediss://, unix:// or redis+cluster:// URL"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
        except ValueError:
            raise ConfigurationError("store_url", url, "expected a port number between 0 and 65535") from None
        database = parts.path.strip("/")
        if scheme != "unix" and database and not database.isdigit():
            raise ConfigurationError("store_url", url, "expected a database number after the host, e.g. /0")
        if not store_timeout > 0:
            raise ConfigurationError("store_timeout", store_timeout, "expected seconds > 0")
        clean = urlunsplit((scheme, parts.netloc, parts.path, urlencode(query, doseq=True), parts.fragment))
        options: dict[str, Any] = {
            "socket_timeout": store_timeout,
            "socket_connect_timeout": store_timeout,
            **client_options,
        }
        client: redis.Redis | redis.cluster.RedisCluster
        async_factory: Callable[[], redis.asyncio.Redis | redis.asyncio.RedisCluster]
        if cluster:
            client = redis.cluster.RedisCluster.from_url(clean, **options)

            def async_factory() -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
                return redis.asyncio.RedisCluster.from_url(clean, **options)
        else:
            client = redis.Redis.from_url(clean, **options)

            def async_factory() -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
                return redis.asyncio.Redis.from_url(clean, **options)

        return cls(
            client,
            prefix=prefix,
            clock=clock,
            idle_ttl=idle_ttl,
            async_factory=async_factory,
            batch_delay=batch_delay,
            batch_size=batch_size,
            dead_letter_limit=dead_letter_limit,
            dead_letter_ttl=dead_letter_ttl,
            park_ttl=park_ttl,
        )

    @property
    def client(self) -> redis.Redis | redis.cluster.RedisCluster:
        return self._client

    # -- plumbing -----------------------------------------------------------------

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}:{{{key}}}:"
        return [base + "s", base + "l", base + "p", base + "w"]

    def _now(self, now: float | None) -> str:
        if now is None and self._clock is not None:
            now = self._clock.now()
        return "" if now is None else _f(now)

    def _call(self, name: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        self._guard.check()
        try:
            reply = self._scripts[name](keys=keys, args=args)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            self._guard.failed()
            raise StoreError(f"redis {name} failed: {exc}") from exc
        self._guard.succeeded()
        return reply

    async def _call_async(self, name: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        self._guard.check()
        try:
            script = self._async_scripts.get(name)
            if script is None:
                script = self._async_script(name)
            reply = await script(keys=keys, args=args)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            self._guard.failed()
            raise StoreError(f"redis {name} failed: {exc}") from exc
        self._guard.succeeded()
        return reply

    def _async_script(self, name: str) -> AsyncScript:
        if self._async_client is None:
            if self._async_factory is None:
                raise StoreError("this RedisStore has no asyncio client; build it with RedisStore.from_url")
            self._async_client = self._async_factory()
        script = self._async_scripts[name] = self._async_client.register_script(_load(name))
        return script

    @staticmethod
    def _parse(what: str, parse: Callable[[], _T]) -> _T:
        try:
            return parse()
        except (ValueError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as exc:
            raise StoreError(f"garbled reply from redis to {what}: {exc!r}") from exc

    def _encode(self, group: Group) -> tuple[str, str, str]:
        """A group's packed admit argument, and its record argument around the generation.

        Cached per group object when it carries no reservations (the common, reusable case).
        """
        cached = self._encoded.get(id(group))
        if cached is not None and cached[0] is group:
            return cached[1]
        b, bh = group.breaker, group.bulkhead
        admit = [
            group.key,
            _f(group.lease),
            "1" if b else "0",
            _f(b.open_for) if b else "0",
            str(b.half_open_probes) if b else "0",
            _f(b.busy_delay) if b else "0",
            "1" if bh else "0",
            str(bh.max_concurrent) if bh else "0",
            _f(bh.lease) if bh is not None and bh.lease is not None else "",
            _f(bh.retry_delay) if bh else "0",
            _f(group.budget.window) if group.budget else "",
            str(len(group.rates)),
        ]
        carried = group.reservations or (None,) * len(group.rates)
        for limit, slot in zip(group.rates, carried):
            adaptive = limit.adaptive
            admit += [
                limit.slot_id,
                _f(limit.interval),
                str(limit.burst),
                _f(limit.reserve_ahead),
                _f(limit.grace),
                "" if adaptive is None else _f(adaptive.floor.per_second),
                "" if adaptive is None else _f(adaptive.ceiling.per_second),
                "" if slot is None else _f(slot),
            ]
        if b is None:
            rest = ["0"] * 12
        else:
            rest = [
                "1",
                b.window_type,
                _f(b.window),
                str(b.minimum_calls),
                _f(b.failure_rate_threshold),
                "" if b.slow_call_duration == float("inf") else _f(b.slow_call_duration),
                _f(b.slow_call_rate_threshold),
                _f(b.open_for),
                _f(b.open_for_max),
                _f(b.multiplier),
                _f(b.open_jitter),
                str(b.half_open_probes),
            ]
        adaptive_limits = [limit for limit in group.rates if limit.adaptive is not None]
        rest.append(str(len(adaptive_limits)))
        for limit in adaptive_limits:
            a = limit.adaptive
            assert a is not None
            rest += [
                limit.slot_id,
                _f(limit.rate.per_second),
                _f(a.floor.per_second),
                _f(a.ceiling.per_second),
                _f(a.decrease),
                _f(a.increase),
                _f(a.cooldown),
                "" if a.slow is None else _f(a.slow),
            ]
        packed = (
            _SEP.join(admit),
            _SEP.join([group.key, "1" if group.pause_target else "0", ""]),
            _SEP + _SEP.join(rest),
        )
        if not group.reservations:
            if len(self._encoded) >= _ENCODE_CACHE:
                self._encoded.clear()
            self._encoded[id(group)] = (group, packed)
        return packed

    # -- admit --------------------------------------------------------------------

    def _admit_calls(
        self, request: AdmitRequest, pending: list[_Record]
    ) -> list[tuple[list[str], list[str]]]:
        """The script calls for a request: one for all groups (with the batched successes
        piggybacked), or one per group on a cluster."""
        head = [self._now(request.now), request.ticket_id, _f(request.rand), request.policy, self._idle]
        batches = [list(request.groups)] if not self._cluster else [[g] for g in request.groups]
        calls = []
        for batch in batches:
            keys: list[str] = []
            args = [*head, str(len(batch))]
            for group in batch:
                keys += self._keys(group.key)
                args.append(self._encode(group)[0])
            args.append(str(len(pending)))
            for record_keys, record_args in pending:
                keys += record_keys
                args += record_args
            pending = []
            calls.append((keys, args))
        return calls

    def _admit_reply(self, request: AdmitRequest, replies: list[Any]) -> AdmitResult:
        def parse() -> AdmitResult:
            results: list[GroupResult] = []
            recorded: tuple[Transition, ...] = ()
            for reply in replies:
                now = float(reply[0])
                recorded += _transitions(request.policy, reply[1], now)
                for item in reply[2:]:
                    results.append(
                        GroupResult(
                            admitted=item[0] == 1,
                            now=now,
                            reason=cast(DeferReason, _s(item[1])) if item[0] != 1 else None,
                            delay=float(item[2]),
                            generation=int(float(item[3])),
                            probe=item[4] == 1,
                            early=item[5] == 1,
                            reservations=tuple(float(x) for x in item[6]),
                            transitions=_transitions(request.policy, item[7], now),
                        )
                    )
            result = merge_admission(request, results)
            if recorded:
                result.transitions = recorded + result.transitions
            return result

        return self._parse("admit", parse)

    def admit(self, request: AdmitRequest) -> AdmitResult:
        pending = self._take_pending()
        replies: list[Any] = []
        try:
            for i, (keys, args) in enumerate(self._admit_calls(request, pending)):
                reply = self._call("admit", keys, args)
                replies.append(reply)
                if self._deferred(reply):  # cluster: give back what earlier groups took
                    if i:
                        self._release(request, replies[:-1])
                    break
        except StoreError:
            if not replies:
                self._restore_pending(pending)
            raise
        return self._admit_reply(request, replies)

    async def admit_async(self, request: AdmitRequest) -> AdmitResult:
        pending = self._take_pending()
        replies: list[Any] = []
        try:
            for i, (keys, args) in enumerate(self._admit_calls(request, pending)):
                reply = await self._call_async("admit", keys, args)
                replies.append(reply)
                if self._deferred(reply):
                    if i:
                        await self._release_async(request, replies[:-1])
                    break
        except StoreError:
            if not replies:
                self._restore_pending(pending)
            raise
        return self._admit_reply(request, replies)

    @staticmethod
    def _deferred(reply: Any) -> bool:
        try:
            return bool(reply[-1][0] != 1)
        except (TypeError, IndexError) as exc:
            raise StoreError(f"garbled reply from redis to admit: {reply!r}") from exc

    def _release_calls(self, request: AdmitRequest, replies: list[Any]) -> list[tuple[list[str], list[str]]]:
        calls = []
        for group, reply in zip(request.groups, replies):
            used = reply[2][6]
            refunds = [
                item
                for limit, slot in zip(group.rates, used)
                for item in (
                    limit.slot_id,
                    _f(limit.interval),
                    "1" if float(slot) == 0.0 else "0",
                    "" if limit.adaptive is None else _f(limit.adaptive.floor.per_second),
                    "" if limit.adaptive is None else _f(limit.adaptive.ceiling.per_second),
                )
            ]
            args = [self._now(request.now), "release", group.key, request.ticket_id, "", self._idle, *refunds]
            calls.append((self._keys(group.key), args))
        return calls

    def _release(self, request: AdmitRequest, replies: list[Any]) -> None:
        for keys, args in self._release_calls(request, replies):
            self._call("control", keys, args)

    async def _release_async(self, request: AdmitRequest, replies: list[Any]) -> None:
        for keys, args in self._release_calls(request, replies):
            await self._call_async("control", keys, args)

    # -- record -------------------------------------------------------------------

    def _records(self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float) -> list[_Record]:
        """KEYS and packed ARGV of a record: one, or one per group on a cluster."""
        pairs = list(zip(ticket.groups, ticket.generations))
        batches = [pairs] if not self._cluster else [[p] for p in pairs]
        records = []
        for batch in batches:
            header = _SEP.join(
                [
                    self._now(now),
                    ticket.id,
                    _f(rand),
                    outcome.kind,
                    "" if outcome.duration is None else _f(outcome.duration),
                    _f(ticket.admitted_at),
                    _f(outcome.retry_after),
                    str(len(batch)),
                    ticket.policy.name,
                    "1" if outcome.overload else "0",
                ]
            )
            keys: list[str] = []
            args = [header]
            for group, generation in batch:
                keys += self._keys(group.key)
                _, before, after = self._encode(group)
                args.append(f"{before}{generation}{after}")
            records.append((keys, args))
        return records

    def _batchable(self, ticket: Ticket, outcome: Outcome) -> bool:
        """A success that frees no bulkhead slot, is no probe and is not slow may wait."""
        if self._batch_delay <= 0 or self._cluster or outcome.kind != "success" or ticket.probe:
            return False
        if ticket.policy.adaptive:  # a success moves the shared rate: write it at once
            return False
        return all(
            g.bulkhead is None and (g.breaker is None or g.breaker.slow_call_duration == float("inf"))
            for g in ticket.groups
        )

    def _record_payload(self, records: list[_Record]) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args = [self._idle, str(len(records))]
        for record_keys, record_args in records:
            keys += record_keys
            args += record_args
        return keys, args

    def _record_reply(self, policy: str, reply: Any) -> RecordResult:
        def parse() -> RecordResult:
            now = float(reply[0])
            changes = tuple(
                RateChange(
                    _s(c[5]),
                    _s(c[0]),
                    _s(c[1]),
                    float(c[2]),
                    float(c[3]),
                    now,
                    cast(Literal["overload", "increase"], _s(c[4])),
                )
                for c in (reply[3] if len(reply) > 3 else ())
            )
            return RecordResult(
                now, _transitions(policy, reply[2], now), bool(reply[1]) and reply[1][-1] == 1, changes
            )

        return self._parse("record", parse)

    def record(self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float) -> RecordResult:
        records = self._records(ticket, outcome, now, rand)
        if self._batchable(ticket, outcome) and self._defer_records(records):
            return RecordResult(now if now is not None else ticket.admitted_at)
        batch = self._take_pending() + records
        result = RecordResult(0.0)
        try:
            if self._cluster:
                results = [
                    self._record_reply(
                        ticket.policy.name, self._call("record", *self._record_payload([record]))
                    )
                    for record in batch
                ]
                result = _merge_records(results[-len(records) :])
            else:
                result = self._record_reply(
                    ticket.policy.name, self._call("record", *self._record_payload(batch))
                )
        except StoreError:
            self._restore_pending(batch[: -len(records)])
            raise
        return result

    async def record_async(
        self, ticket: Ticket, outcome: Outcome, now: float | None, rand: float
    ) -> RecordResult:
        records = self._records(ticket, outcome, now, rand)
        if self._batchable(ticket, outcome) and self._defer_records(records):
            return RecordResult(now if now is not None else ticket.admitted_at)
        batch = self._take_pending() + records
        result = RecordResult(0.0)
        try:
            if self._cluster:
                results = []
                for record in batch:
                    reply = await self._call_async("record", *self._record_payload([record]))
                    results.append(self._record_reply(ticket.policy.name, reply))
                result = _merge_records(results[-len(records) :])
            else:
                reply = await self._call_async("record", *self._record_payload(batch))
                result = self._record_reply(ticket.policy.name, reply)
        except StoreError:
            self._restore_pending(batch[: -len(records)])
            raise
        return result

    # -- batched successes ----------------------------------------------------------

    def _defer_records(self, records: list[_Record]) -> bool:
        """Queue successes for the next round trip; False when the batch is full (send now)."""
        with self._pending_lock:
            if len(self._pending) + len(records) > self._batch_size:
                return False
            self._pending += records
            if self._timer is None:
                self._timer = threading.Timer(self._batch_delay, self._flush_from_timer)
                self._timer.daemon = True
                self._timer.start()
        return True

    def _take_pending(self) -> list[_Record]:
        if not self._pending:
            return []
        with self._pending_lock:  # the timer, if running, finds nothing and stops
            pending, self._pending = self._pending, []
        return pending

    def _restore_pending(self, records: list[_Record]) -> None:
        if not records:
            return
        with self._pending_lock:
            self._pending = (records + self._pending)[-_MAX_PENDING:]

    def _flush_from_timer(self) -> None:
        with self._pending_lock:
            self._timer = None
        try:
            self.flush()
        except StoreError as exc:
            log.warning(
                "could not flush %d batched successes (kept for the next round trip): %s",
                len(self._pending),
                exc,
            )

    def set_transition_sink(self, sink: Callable[[Sequence[Transition]], None]) -> None:
        """Where transitions caused by a flushed batch go (the pipeline's hooks)."""
        self._sink = sink

    def flush(self) -> None:
        """Write batched successes now (called on a timer, at ``close`` and at shutdown).

        A batched success can still open a breaker (it may complete ``minimum_calls`` at a
        failing rate): such a transition goes to the transition sink, once.
        """
        pending = self._take_pending()
        if not pending:
            return
        try:
            reply = self._call("record", *self._record_payload(pending))
        except StoreError:
            self._restore_pending(pending)
            raise
        transitions = self._parse("record", lambda: _transitions("", reply[2], float(reply[0])))
        if transitions and self._sink is not None:
            self._sink(transitions)

    def _forget_pending(self) -> None:
        # In a forked child the parent's batch is not ours to write.
        self._pending = []
        self._timer = None
        self._pending_lock = threading.Lock()

    # -- retry budget -------------------------------------------------------------

    def _retry_args(self, budget: RetryBudget, now: float | None) -> list[str]:
        return [self._now(now), _f(budget.ratio), _f(budget.min_per_second), _f(budget.window), self._idle]

    def spend_retry(self, key: str, budget: RetryBudget, now: float | None) -> bool:
        reply = self._call("retry", self._keys(key), self._retry_args(budget, now))
        return self._parse("spend_retry", lambda: _allowed(reply))

    async def spend_retry_async(self, key: str, budget: RetryBudget, now: float | None) -> bool:
        reply = await self._call_async("retry", self._keys(key), self._retry_args(budget, now))
        return self._parse("spend_retry", lambda: _allowed(reply))

    # -- operators ------------------------------------------------------------------

    def _control(
        self,
        key: str,
        action: str,
        now: float | None,
        seconds: float = 0.0,
        reason: str = "",
        policy: str = "",
        extra: Sequence[str] = (),
    ) -> tuple[Transition, ...]:
        reply = self._call(
            "control",
            self._keys(key),
            [self._now(now), action, key, _f(seconds), reason, self._idle, *extra],
        )
        return self._parse(action, lambda: _transitions(policy, reply[1], float(reply[0])))

    def pause(self, key: str, seconds: float, reason: str, now: float | None = None) -> None:
        self._control(key, "pause", now, seconds, reason)

    def resume(self, key: str) -> None:
        self._control(key, "resume", None)

    def reset(self, key: str, policy: str = "", now: float | None = None) -> tuple[Transition, ...]:
        return self._control(key, "reset", now, policy=policy)

    def force(
        self, key: str, state: BreakerState, policy: str = "", now: float | None = None
    ) -> tuple[Transition, ...]:
        if state not in ("forced_open", "disabled", "closed"):
            raise ConfigurationError("state", state, 'expected "forced_open", "disabled" or "closed"')
        return self._control(key, "reset" if state == "closed" else state, now, policy=policy)

    def override(
        self,
        key: str,
        limit_id: str,
        rate: Rate | None,
        burst: int = 1,
        seconds: float | None = None,
        now: float | None = None,
    ) -> None:
        if rate is None:
            self._control(key, "unoverride", now, reason=limit_id)
            return
        self._call(
            "control",
            self._keys(key),
            [
                self._now(now),
                "override",
                key,
                "" if seconds is None else _f(seconds),
                limit_id,
                self._idle,
                exact(rate.limit),
                exact(rate.per),
                str(int(burst)),
            ],
        )

    def keys(self, match: str = "*") -> Iterator[str]:
        """Keys holding state, found by ``SCAN`` over this store's prefix (never ``KEYS``)."""
        pattern = f"{_glob_escape(self.prefix)}:{{{match}}}:s"
        start = len(self.prefix) + 2
        try:
            for name in self._client.scan_iter(match=pattern, count=1000):
                yield _s(name)[start:-3]
        except redis.RedisError as exc:
            raise StoreError(f"redis scan failed: {exc}") from exc

    def status(self, key: str, now: float | None = None) -> KeyStatus:
        self.flush()  # read this process's own writes
        scalars, leases, probes_key, _ = self._keys(key)
        self._guard.check()
        try:
            if now is None and self._clock is not None:
                now = self._clock.now()
            if now is None:
                seconds, micros = self._client.time()
                now = seconds + micros / 1_000_000
            fields = cast(dict[bytes, bytes], self._client.hgetall(scalars))
            in_flight = int(self._client.zcount(leases, f"({_f(now)}", "+inf"))
            probes = int(self._client.zcount(probes_key, f"({_f(now)}", "+inf"))
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            self._guard.failed()
            raise StoreError(f"redis status failed: {exc}") from exc
        at = now

        def parse() -> KeyStatus:
            data = {_s(k): _s(v) for k, v in fields.items()}
            state = cast(BreakerState, data.get("bs", "closed"))
            open_until = float(data.get("bo", 0))
            shown: BreakerState = "half_open" if state == "open" and at >= open_until else state
            paused = float(data.get("pu", 0))
            return KeyStatus(
                key,
                shown,
                generation=int(float(data.get("bg", 0))),
                open_until=open_until if state == "open" else None,
                calls=int(float(data.get("tc", 0))),
                failures=int(float(data.get("tf", 0))),
                slow_calls=int(float(data.get("tl", 0))),
                in_flight=in_flight,
                probes_in_flight=probes,
                paused_until=paused if paused > at else None,
                pause_reason=data.get("pr") if paused > at else None,
                rates={
                    k[2:]: float(v) for k, v in data.items() if k.startswith("r:") and not k.endswith("#x")
                },
                overrides={
                    k[2:]: override
                    for k, v in data.items()
                    if k.startswith("o:") and (override := _override(v)).active(at)
                },
                adaptive={k[2:]: _adaptive(v) for k, v in data.items() if k.startswith("a:")},
                policy=data.get("po"),
                at=at,
            )

        return self._parse("status", parse)

    # -- dead letters -----------------------------------------------------------------

    def put_dead(self, letter: DeadLetter) -> None:
        self._call(
            "dead",
            self._dead_keys,
            ["put", letter.id, letter.to_json(), _f(letter.dead_at), self._dead_limit, self._dead_ttl],
        )

    def list_dead(self, limit: int = 100) -> list[DeadLetter]:
        h, z = self._dead_keys
        try:
            ids = cast(list[bytes], self._client.zrevrange(z, 0, limit - 1))
            entries = cast(list[bytes | None], self._client.hmget(h, ids)) if ids else []
        except redis.RedisError as exc:
            raise StoreError(f"redis dead-letter list failed: {exc}") from exc
        return self._parse("dead list", lambda: [DeadLetter.from_json(e) for e in entries if e is not None])

    def take_dead(self, letter_id: str) -> DeadLetter | None:
        entry = self._call("dead", self._dead_keys, ["take", letter_id])
        if not entry:
            return None
        return self._parse("dead take", lambda: DeadLetter.from_json(entry))

    # -- parked deferrals -------------------------------------------------------------

    def _park_keys(self, park: str) -> list[str]:
        """The park's keys, in one cluster slot: ``{prefix}:{park:<name>}:<part>``."""
        if not park or any(c in park for c in "{} "):
            raise ConfigurationError("park", park, "expected a non-empty name without braces or spaces")
        parts = ("due", "msg", "meta", "claims", "slotted", "count", "pace", "seq")
        return [f"{self.prefix}:{{park:{park}}}:{part}" for part in parts]

    def park(self, entry: ParkedEntry, limit: int, now: float | None = None) -> ParkedEntry | None:
        payload = dataclasses.replace(entry, id="", due=0.0).to_json()
        args = ["put", self._now(now), entry.key, _f(entry.delay), _f(entry.interval), payload]
        reply = self._call("park", self._park_keys(entry.park), [*args, str(int(limit)), self._park_ttl])
        if not reply:
            return None
        return self._parse("park", lambda: dataclasses.replace(entry, id=_s(reply[0]), due=float(reply[1])))

    def take_parked(self, park: str, limit: int, lease: float, now: float | None = None) -> list[ParkedEntry]:
        reply = self._call(
            "park",
            self._park_keys(park),
            ["take", self._now(now), str(int(limit)), _f(lease), self._park_ttl],
        )

        def parse() -> list[ParkedEntry]:
            return [
                dataclasses.replace(
                    ParkedEntry.from_json(reply[i + 2]), id=_s(reply[i]), due=float(reply[i + 1])
                )
                for i in range(0, len(reply), 3)
            ]

        return self._parse("take parked", parse)

    def confirm_parked(self, park: str, entry_id: str) -> None:
        self._call("park", self._park_keys(park), ["confirm", "", entry_id])

    def parked(self, park: str, now: float | None = None) -> list[ParkSummary]:
        names = self._park_keys(park)
        due, meta, count_key = names[0], names[2], names[5]
        try:
            counts = cast(dict[bytes, bytes], self._client.hgetall(count_key))
            scheduled = cast(list[tuple[bytes, float]], self._client.zrange(due, 0, -1, withscores=True))
            keys = (
                cast(list[bytes | None], self._client.hmget(meta, [i for i, _ in scheduled]))
                if scheduled
                else []
            )
        except redis.RedisError as exc:
            raise StoreError(f"redis parked failed: {exc}") from exc

        def parse() -> list[ParkSummary]:
            first: dict[str, float] = {}
            for (_, at), m in zip(scheduled, keys):
                if m is not None:
                    key = _s(m).split("|", 1)[1]
                    first.setdefault(key, at)  # zrange is in due order
            return [
                ParkSummary(key, int(n), first.get(key))
                for key, n in sorted((_s(k), v) for k, v in counts.items())
            ]

        return self._parse("parked", parse)

    def release_parked(self, park: str, key: str, now: float | None = None) -> int:
        return int(self._call("park", self._park_keys(park), ["release", self._now(now), key]))

    def purge_parked(self, park: str, key: str | None = None) -> int:
        return int(self._call("park", self._park_keys(park), ["purge", "", "" if key is None else key]))

    def purge_dead(self) -> int:
        count = self._call("dead", self._dead_keys, ["purge"])
        return self._parse("dead purge", lambda: int(count))

    def close(self) -> None:
        """Write batched successes, then close the connections (the asyncio client is dropped)."""
        try:
            self.flush()
        except StoreError as exc:
            log.warning("closing with %d batched successes unwritten: %s", len(self._pending), exc)
        self._client.close()
        self._async_client = None
        self._async_scripts.clear()

    def reconnect(self) -> None:
        """Drop pooled connections, e.g. in a freshly forked worker process."""
        self._forget_pending()
        pool = getattr(self._client, "connection_pool", None)
        if pool is not None:
            pool.reset()
        self._async_client = None
        self._async_scripts.clear()
