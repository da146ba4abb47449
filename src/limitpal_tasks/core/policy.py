"""Policies: named, immutable, validated descriptions of how a group of tasks is protected.

Every component validates itself when constructed and raises :class:`ConfigurationError`
naming the field and the bad value. ``Policy.from_dict`` builds the same objects from the
plain data that Celery/Django settings and environment files hold.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, cast

from ..errors import ConfigurationError, Cooldown
from .keys import KeySpec, KeyTemplate
from .units import Duration, Rate, RateLike, exact, parse_duration

__all__ = [
    "AdaptiveRate",
    "Breaker",
    "Bulkhead",
    "DeferPolicy",
    "DeferTransport",
    "FailMode",
    "FailurePolicy",
    "Policy",
    "RateLimit",
    "RetryBudget",
    "RetryPolicy",
    "Verdict",
]

FailMode = Literal["open", "closed"]
DeferTransport = Literal["broker", "park"]
Verdict = Literal["retry", "fail", "ignore"]
JitterKind = Literal["full", "equal", "decorrelated", "none"]
ExceptionTypes = tuple[type[BaseException], ...]
_HUGE = 1e300
_T = TypeVar("_T")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _number(
    field: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = math.nan
    if ok:
        try:
            number = float(cast(float, value))
        except OverflowError:
            ok = False
    if ok and integer:
        ok = number.is_integer()
    if ok:
        ok = math.isfinite(number)
        if ok and low is not None:
            ok = number > low if low_open else number >= low
        if ok and high is not None:
            ok = number <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ConfigurationError(field, value, f"expected {kind}{' ' + rng if rng else ''}")
    return number


def _key(field: str, value: KeySpec | None) -> KeyTemplate | None:
    return None if value is None else KeyTemplate.of(value, field)


def _exception_types(field: str, value: object) -> ExceptionTypes:
    items: Iterable[object]
    if isinstance(value, (str, type)):
        items = (value,)
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ConfigurationError(field, value, "expected exception classes or dotted names")
    out: list[type[BaseException]] = []
    for item in items:
        cls: object = item
        if isinstance(item, str):
            module, _, name = item.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module or "builtins"), name)
            except (ImportError, AttributeError, ValueError, TypeError):
                raise ConfigurationError(field, item, "expected an importable exception class") from None
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ConfigurationError(field, item, "expected an exception class")
        out.append(cls)
    return tuple(out)


@dataclass(frozen=True, slots=True, init=False)
class Breaker:
    """A circuit breaker with Resilience4j semantics and names.

    CLOSED counts outcomes in a sliding window (``window_type="count"``: the last
    ``window`` calls; ``"time"``: the last ``window`` seconds) and opens once at least
    ``minimum_calls`` were seen and the failure rate (or the slow-call rate) reaches its
    threshold. OPEN defers everything for ``open_for`` (growing by ``multiplier`` on each
    consecutive re-open, up to ``open_for_max``, randomized by ``open_jitter``). Then up to
    ``half_open_probes`` executions probe the upstream at once, fleet-wide; that many
    successes close it, one failure re-opens it.

    >>> Breaker(failure_rate_threshold=50, minimum_calls=20, window=100, open_for=30)
    ... # doctest: +ELLIPSIS
    Breaker(...)
    """

    failure_rate_threshold: float
    minimum_calls: int
    window_type: Literal["count", "time"]
    window: float
    slow_call_duration: float
    slow_call_rate_threshold: float
    open_for: float
    open_for_max: float
    multiplier: float
    open_jitter: float
    half_open_probes: int
    busy_delay: float
    key: KeyTemplate | None

    def __init__(
        self,
        *,
        failure_rate_threshold: float = 50.0,
        minimum_calls: int = 100,
        window_type: Literal["count", "time"] = "count",
        window: int | Duration = 100,
        slow_call_duration: Duration | None = None,
        slow_call_rate_threshold: float = 100.0,
        open_for: Duration = 60.0,
        open_for_max: Duration | None = None,
        multiplier: float = 2.0,
        open_jitter: float = 0.0,
        half_open_probes: int = 10,
        busy_delay: Duration = 1.0,
        key: KeySpec | None = None,
    ) -> None:
        _set(
            self,
            "failure_rate_threshold",
            _number("breaker.failure_rate_threshold", failure_rate_threshold, low=0, high=100, low_open=True),
        )
        _set(self, "minimum_calls", int(_number("breaker.minimum_calls", minimum_calls, low=1, integer=True)))
        if window_type not in ("count", "time"):
            raise ConfigurationError("breaker.window_type", window_type, 'expected "count" or "time"')
        _set(self, "window_type", window_type)
        if window_type == "count":
            size = _number("breaker.window", window, low=1, high=100_000, integer=True)
        else:
            size = parse_duration("breaker.window", window, allow_zero=False)
            if not 1 <= size <= 86_400:
                raise ConfigurationError(
                    "breaker.window", window, "expected a time window between 1s and 1 day"
                )
            size = float(math.ceil(size))
        _set(self, "window", size)
        if window_type == "count" and self.minimum_calls > size:
            # As in Resilience4j: a count window can never hold more calls than its size.
            _set(self, "minimum_calls", int(size))
        _set(
            self,
            "slow_call_duration",
            parse_duration(
                "breaker.slow_call_duration", slow_call_duration, allow_zero=False, allow_none=True
            ),
        )
        _set(
            self,
            "slow_call_rate_threshold",
            _number(
                "breaker.slow_call_rate_threshold", slow_call_rate_threshold, low=0, high=100, low_open=True
            ),
        )
        base = parse_duration("breaker.open_for", open_for, allow_zero=False)
        _set(self, "open_for", base)
        cap = (
            base
            if open_for_max is None
            else parse_duration("breaker.open_for_max", open_for_max, allow_zero=False)
        )
        if cap < base:
            raise ConfigurationError(
                "breaker.open_for_max", open_for_max, f"expected a duration >= open_for ({base:g}s)"
            )
        _set(self, "open_for_max", cap)
        _set(self, "multiplier", _number("breaker.multiplier", multiplier, low=1))
        _set(self, "open_jitter", _number("breaker.open_jitter", open_jitter, low=0, high=1))
        _set(
            self,
            "half_open_probes",
            int(_number("breaker.half_open_probes", half_open_probes, low=1, high=10_000, integer=True)),
        )
        _set(self, "busy_delay", parse_duration("breaker.busy_delay", busy_delay, allow_zero=False))
        _set(self, "key", _key("breaker.key", key))

    def break_duration(self, consecutive_opens: int, rand: float) -> float:
        """How long the breaker stays OPEN after its ``consecutive_opens``-th opening (1-based)."""
        try:
            grown = self.open_for * self.multiplier ** max(0, consecutive_opens - 1)
        except OverflowError:
            grown = math.inf
        duration = min(self.open_for_max, grown)
        return duration * (1.0 - self.open_jitter * rand)


@dataclass(frozen=True, slots=True, init=False)
class Bulkhead:
    """At most ``max_concurrent`` executions of a key at once across the fleet.

    Each slot is a lease that expires after ``lease`` seconds (default: the policy's), so a
    killed worker cannot hold it forever. A deferred execution comes back after at most
    ``retry_delay`` seconds (or when the oldest lease expires, if sooner).
    """

    max_concurrent: int
    lease: float | None
    retry_delay: float
    key: KeyTemplate | None

    def __init__(
        self,
        max_concurrent: int,
        *,
        lease: Duration | None = None,
        retry_delay: Duration = 1.0,
        key: KeySpec | None = None,
    ) -> None:
        _set(
            self,
            "max_concurrent",
            int(_number("bulkhead.max_concurrent", max_concurrent, low=1, integer=True)),
        )
        _set(
            self,
            "lease",
            None if lease is None else parse_duration("bulkhead.lease", lease, allow_zero=False),
        )
        _set(self, "retry_delay", parse_duration("bulkhead.retry_delay", retry_delay, allow_zero=False))
        _set(self, "key", _key("bulkhead.key", key))


_OVERLOAD_STATUS = frozenset({429, 503})


def is_overload(exc: BaseException) -> bool:
    """The default overload signal: a :class:`Cooldown`, or an error carrying HTTP 429 or 503.

    The status is looked for where HTTP clients keep it: ``exc.status_code``,
    ``exc.status``, or ``exc.response.status_code`` / ``.status`` (requests, httpx, aiohttp).
    """
    if isinstance(exc, Cooldown):
        return True
    response = getattr(exc, "response", None)
    for holder in (exc, response):
        for name in ("status_code", "status"):
            status = getattr(holder, name, None)
            if isinstance(status, int) and status in _OVERLOAD_STATUS:
                return True
    return False


@dataclass(frozen=True, slots=True, init=False)
class AdaptiveRate:
    """Let the fleet find an upstream's real capacity between ``floor`` and ``ceiling``.

    The key's current rate lives in the store, shared by every worker. An overload signal
    (a :class:`Cooldown`, an exception ``signal`` recognizes — by default HTTP 429/503 —
    or, with ``slow``, a call at least that slow) cuts it, at most once per ``cooldown``:
    to 95% of the successes per second measured over the last second, but never by more
    than the factor ``decrease`` at once. Every success raises it by ``increase / rate``,
    i.e. by ``increase`` calls/s per second of saturated success (default: a 30th of
    ``ceiling - floor``) — not within ``cooldown`` of a cut, and not while successes come
    at less than three quarters of the rate (traffic below the rate says nothing about
    the capacity above it). An operator's override pins the rate and suspends adaptation
    until it expires.

    >>> RateLimit("50/s", adaptive=AdaptiveRate(floor="5/s", ceiling="200/s")).adaptive.increase
    6.5
    """

    floor: Rate
    ceiling: Rate
    decrease: float
    increase: float
    cooldown: float
    slow: float | None
    signal: Callable[[BaseException], bool]

    def __init__(
        self,
        *,
        floor: RateLike,
        ceiling: RateLike,
        decrease: float = 0.5,
        increase: float | None = None,
        cooldown: Duration = 1.0,
        slow: Duration | None = None,
        signal: Callable[[BaseException], bool] | Iterable[type[BaseException] | str] | None = None,
    ) -> None:
        _set(self, "floor", Rate.parse(floor, "rate_limit.adaptive.floor"))
        _set(self, "ceiling", Rate.parse(ceiling, "rate_limit.adaptive.ceiling"))
        if not self.ceiling.per_second > self.floor.per_second:
            raise ConfigurationError(
                "rate_limit.adaptive.ceiling", ceiling, f"expected a rate above floor ({floor})"
            )
        factor = _number("rate_limit.adaptive.decrease", decrease, low=0, high=1, low_open=True)
        if factor == 1:
            raise ConfigurationError(
                "rate_limit.adaptive.decrease", decrease, "expected a number > 0 and < 1"
            )
        _set(self, "decrease", factor)
        if increase is None:
            increase = (self.ceiling.per_second - self.floor.per_second) / 30
        _set(self, "increase", _number("rate_limit.adaptive.increase", increase, low=0, low_open=True))
        _set(self, "cooldown", parse_duration("rate_limit.adaptive.cooldown", cooldown, allow_zero=False))
        _set(
            self,
            "slow",
            None if slow is None else parse_duration("rate_limit.adaptive.slow", slow, allow_zero=False),
        )
        if signal is None:
            signal = is_overload
        elif not callable(signal) or isinstance(signal, type):
            types = _exception_types("rate_limit.adaptive.signal", signal)

            def signal(exc: BaseException, types: ExceptionTypes = types) -> bool:
                return isinstance(exc, types)

        _set(self, "signal", signal)

    def clamp(self, per_second: float) -> float:
        """``per_second`` within ``[floor, ceiling]``."""
        return min(max(per_second, self.floor.per_second), self.ceiling.per_second)


@dataclass(frozen=True, slots=True, init=False)
class RateLimit:
    """A GCRA rate limit per key: ``RateLimit("100/s", burst=10)``.

    A non-conforming execution is deferred to a *reserved* future slot, booked now, so it
    is admitted without contending when it comes back (up to ``grace`` seconds late;
    a crowd of late returns still runs at the rate). Slots further than ``reserve_ahead``
    seconds away are not booked: the execution is deferred until its slot would enter
    that horizon, and contends again.
    """

    rate: Rate
    burst: int
    reserve_ahead: float
    grace: float
    key: KeyTemplate | None
    adaptive: AdaptiveRate | None
    interval: float
    slot_id: str
    exec_id: str

    def __init__(
        self,
        rate: RateLike,
        *,
        burst: int = 1,
        reserve_ahead: Duration = 60.0,
        grace: Duration = 60.0,
        key: KeySpec | None = None,
        adaptive: AdaptiveRate | Mapping[str, Any] | None = None,
    ) -> None:
        _set(self, "rate", Rate.parse(rate, "rate_limit.rate"))
        _set(self, "burst", int(_number("rate_limit.burst", burst, low=1, integer=True)))
        _set(self, "reserve_ahead", parse_duration("rate_limit.reserve_ahead", reserve_ahead))
        _set(self, "grace", parse_duration("rate_limit.grace", grace))
        _set(self, "key", _key("rate_limit.key", key))
        if isinstance(adaptive, Mapping):
            adaptive = _build(AdaptiveRate, "rate_limit.adaptive", adaptive)
        if adaptive is not None:
            if not isinstance(adaptive, AdaptiveRate):
                raise ConfigurationError("rate_limit.adaptive", adaptive, "expected an AdaptiveRate")
            if adaptive.clamp(self.rate.per_second) != self.rate.per_second:
                raise ConfigurationError(
                    "rate_limit.rate",
                    rate,
                    "expected the starting rate within the adaptive floor and ceiling",
                )
        _set(self, "adaptive", adaptive)
        # Derived once: the GCRA emission interval, and the name of this limit's state
        # under a key (two limits of one key never share it).
        _set(self, "interval", self.rate.interval)
        _set(self, "slot_id", f"{exact(self.rate.limit)}/{exact(self.rate.per)}/{self.burst}")
        _set(self, "exec_id", self.slot_id + "#x")


@dataclass(frozen=True, slots=True, init=False)
class RetryBudget:
    """Fleet-wide cap on retries per key, over the last ``window`` seconds.

    Retries ≤ ``ratio`` × admissions + ``min_per_second`` × ``window``: an outage cannot
    multiply the load on an upstream by more than ``1 + ratio``.
    """

    ratio: float
    min_per_second: float
    window: float
    key: KeyTemplate | None

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 1.0,
        window: Duration = 10.0,
        key: KeySpec | None = None,
    ) -> None:
        _set(self, "ratio", _number("retry.budget.ratio", ratio, low=0))
        _set(self, "min_per_second", _number("retry.budget.min_per_second", min_per_second, low=0))
        _set(self, "window", parse_duration("retry.budget.window", window, allow_zero=False))
        _set(self, "key", _key("retry.budget.key", key))


@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """What happens after a failure: which exceptions retry, how often, and how long to wait.

    Backoff is ``backoff × multiplier^(attempt-1)`` with jitter applied *before* the cap
    ``backoff_max``, so the cap always holds. An exception carrying ``retry_after``
    (seconds) is retried after that delay instead (still capped).
    """

    max_attempts: int
    backoff: float
    backoff_max: float
    multiplier: float
    jitter: JitterKind
    retry_on: ExceptionTypes
    give_up_on: ExceptionTypes
    budget: RetryBudget | None

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        backoff: Duration = 1.0,
        backoff_max: Duration = 300.0,
        multiplier: float = 2.0,
        jitter: JitterKind = "full",
        retry_on: Iterable[type[BaseException] | str] | type[BaseException] | str = (Exception,),
        give_up_on: Iterable[type[BaseException] | str] | type[BaseException] | str = (),
        budget: RetryBudget | None = None,
    ) -> None:
        _set(self, "max_attempts", int(_number("retry.max_attempts", max_attempts, low=1, integer=True)))
        _set(self, "backoff", parse_duration("retry.backoff", backoff))
        cap = parse_duration("retry.backoff_max", backoff_max)
        if cap < self.backoff:
            raise ConfigurationError(
                "retry.backoff_max", backoff_max, f"expected a duration >= backoff ({self.backoff:g}s)"
            )
        _set(self, "backoff_max", cap)
        _set(self, "multiplier", _number("retry.multiplier", multiplier, low=1))
        if jitter not in ("full", "equal", "decorrelated", "none"):
            raise ConfigurationError(
                "retry.jitter", jitter, 'expected "full", "equal", "decorrelated" or "none"'
            )
        _set(self, "jitter", jitter)
        _set(self, "retry_on", _exception_types("retry.retry_on", retry_on))
        _set(self, "give_up_on", _exception_types("retry.give_up_on", give_up_on))
        if budget is not None and not isinstance(budget, RetryBudget):
            raise ConfigurationError("retry.budget", budget, "expected a RetryBudget")
        _set(self, "budget", budget)

    def delay(self, attempt: int, rand: float, previous: float | None = None) -> float:
        """The backoff before retry number ``attempt`` (1-based), jittered, then capped.

        ``rand`` is a uniform draw in [0, 1); ``previous`` is the last delay (decorrelated).
        """
        try:
            exp = self.backoff * self.multiplier ** max(0, attempt - 1)
        except OverflowError:
            exp = math.inf
        exp = min(exp, _HUGE)  # finite, so full jitter with rand == 0 stays 0, never nan
        if self.jitter == "full":
            value = exp * rand
        elif self.jitter == "equal":
            value = exp / 2 + exp / 2 * rand
        elif self.jitter == "decorrelated":
            low = self.backoff
            high = max(low, (previous if previous is not None else low) * 3)
            value = low + (high - low) * rand
        else:
            value = exp
        return min(self.backoff_max, value)

    def wants_retry(self, exc: BaseException) -> bool:
        if isinstance(exc, self.give_up_on):
            return False
        return isinstance(exc, self.retry_on)


@dataclass(frozen=True, slots=True, init=False)
class DeferPolicy:
    """Bounds on deferral: how often, for how long, and how far ahead in one hop.

    ``max_delay`` caps a single countdown (keep it under the Redis broker's
    ``visibility_timeout``); ``jitter`` stretches every deferral by up to that fraction;
    deferrals for an open breaker are spread over ``open_spread`` seconds after it may
    half-open (default: ``jitter`` × the break duration, at least one second).

    ``transport`` is how a deferred task waits: ``"broker"`` re-publishes it with a
    countdown (the broker and the worker hold it meanwhile), ``"park"`` writes it into the
    store and acknowledges it, and a releaser in every worker re-publishes it when due —
    in due order and at the key's rate. ``None`` takes the worker's setting
    (``limitpal_defer_transport``, default ``"broker"``). A key holds at most
    ``park_limit`` parked tasks; beyond that a deferral is dead-lettered (``park_full``).
    """

    max_deferrals: int
    deadline: float
    max_delay: float
    jitter: float
    open_spread: float | None
    transport: DeferTransport | None
    park_limit: int

    def __init__(
        self,
        *,
        max_deferrals: int = 100,
        deadline: Duration | None = None,
        max_delay: Duration = 300.0,
        jitter: float = 0.1,
        open_spread: Duration | None = None,
        transport: DeferTransport | None = None,
        park_limit: int = 100_000,
    ) -> None:
        if transport not in (None, "broker", "park"):
            raise ConfigurationError("defer.transport", transport, 'expected "broker" or "park"')
        _set(self, "transport", transport)
        _set(self, "park_limit", int(_number("defer.park_limit", park_limit, low=1, integer=True)))
        _set(self, "max_deferrals", int(_number("defer.max_deferrals", max_deferrals, low=0, integer=True)))
        _set(self, "deadline", parse_duration("defer.deadline", deadline, allow_zero=False, allow_none=True))
        _set(self, "max_delay", parse_duration("defer.max_delay", max_delay, allow_zero=False))
        _set(self, "jitter", _number("defer.jitter", jitter, low=0, high=1))
        _set(
            self,
            "open_spread",
            None if open_spread is None else parse_duration("defer.open_spread", open_spread),
        )


@dataclass(frozen=True, slots=True, init=False)
class FailurePolicy:
    """Which exceptions count against the breaker.

    ``ignore`` lists exceptions that are the caller's fault (validation errors): they are
    neither successes nor failures and are never retried. ``predicate`` may return a
    :data:`Verdict` (``"retry"``, ``"fail"``, ``"ignore"``) or ``None`` to fall through.
    """

    ignore: ExceptionTypes
    predicate: Callable[[BaseException], Verdict | None] | None

    def __init__(
        self,
        *,
        ignore: Iterable[type[BaseException] | str] | type[BaseException] | str = (),
        predicate: Callable[[BaseException], Verdict | None] | None = None,
    ) -> None:
        _set(self, "ignore", _exception_types("failure.ignore", ignore))
        if predicate is not None and not callable(predicate):
            raise ConfigurationError("failure.predicate", predicate, "expected a callable")
        _set(self, "predicate", predicate)


_DEFAULT_DEFER = DeferPolicy()
_DEFAULT_FAILURE = FailurePolicy()


@dataclass(frozen=True, slots=True, init=False)
class Policy:
    """A named, immutable description of the resilience of a group of tasks.

    >>> Policy(
    ...     "payments",
    ...     key="tenant:{tenant_id}",
    ...     breaker=Breaker(failure_rate_threshold=50, minimum_calls=20, key="service:stripe"),
    ...     rate="100/s",
    ...     retry=RetryPolicy(max_attempts=5),
    ... ).name
    'payments'

    ``key`` is the default scope of every component; a component with its own ``key``
    uses that instead. ``lease`` bounds how long an admitted execution holds its slots
    (a record after it changes nothing).
    """

    name: str
    key: KeyTemplate
    breaker: Breaker | None
    bulkhead: Bulkhead | None
    rates: tuple[RateLimit, ...]
    retry: RetryPolicy | None
    defer: DeferPolicy
    failure: FailurePolicy
    fail_mode: FailMode
    lease: float

    def __init__(
        self,
        name: str,
        *,
        key: KeySpec | None = None,
        breaker: Breaker | None = None,
        bulkhead: Bulkhead | int | None = None,
        rate: RateLimit | RateLike | Sequence[RateLimit | RateLike] | None = None,
        retry: RetryPolicy | None = None,
        defer: DeferPolicy | None = None,
        failure: FailurePolicy | None = None,
        fail_mode: FailMode = "open",
        lease: Duration = 300.0,
    ) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in "{}\n\r\t "):
            raise ConfigurationError(
                "policy.name", name, "expected a non-empty name without spaces or braces"
            )
        _set(self, "name", name)
        _set(self, "key", KeyTemplate.of(key if key is not None else name, "policy.key"))
        _check_type("breaker", breaker, Breaker)
        _set(self, "breaker", breaker)
        if isinstance(bulkhead, int) and not isinstance(bulkhead, bool):
            bulkhead = Bulkhead(bulkhead)
        _check_type("bulkhead", bulkhead, Bulkhead)
        _set(self, "bulkhead", bulkhead)
        _set(self, "rates", _rates(rate))
        _check_type("retry", retry, RetryPolicy)
        _set(self, "retry", retry)
        _check_type("defer", defer, DeferPolicy)
        _set(self, "defer", defer or _DEFAULT_DEFER)
        _check_type("failure", failure, FailurePolicy)
        _set(self, "failure", failure or _DEFAULT_FAILURE)
        if fail_mode not in ("open", "closed"):
            raise ConfigurationError("policy.fail_mode", fail_mode, 'expected "open" or "closed"')
        _set(self, "fail_mode", fail_mode)
        _set(self, "lease", parse_duration("policy.lease", lease, allow_zero=False))

    # -- keys -----------------------------------------------------------------

    @property
    def adaptive(self) -> tuple[AdaptiveRate, ...]:
        """The adaptive settings of this policy's rate limits (empty: none adapts)."""
        return tuple(limit.adaptive for limit in self.rates if limit.adaptive is not None)

    def is_overload(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an overload signal for any of this policy's adaptive limits."""
        return any(adaptive.signal(exc) for adaptive in self.adaptive)

    def key_templates(self) -> dict[str, KeyTemplate]:
        """Every key template in use, by the component it scopes."""
        out = {"policy": self.key}
        if self.breaker is not None:
            out["breaker"] = self.breaker.key or self.key
        if self.bulkhead is not None:
            out["bulkhead"] = self.bulkhead.key or self.key
        for i, limit in enumerate(self.rates):
            out[f"rate[{i}]"] = limit.key or self.key
        if self.retry is not None and self.retry.budget is not None:
            out["retry.budget"] = self.retry.budget.key or self.key
        return out

    def check_keys(self, func: Callable[..., Any]) -> None:
        """Raise :class:`ConfigurationError` if a key template names a parameter ``func`` lacks."""
        for component, template in self.key_templates().items():
            field = "key" if component == "policy" else f"{component}.key"
            template.check(func, f"policy {self.name!r}: {field}")

    # -- classification -------------------------------------------------------

    def classify(self, exc: BaseException) -> Verdict:
        """``"retry"``, ``"fail"`` or ``"ignore"`` for an exception raised by a task."""
        if self.failure.predicate is not None:
            verdict = self.failure.predicate(exc)
            if verdict is not None:
                return verdict
        if isinstance(exc, self.failure.ignore):
            return "ignore"
        if isinstance(exc, Cooldown):
            return "retry"
        if self.retry is not None and self.retry.wants_retry(exc):
            return "retry"
        return "fail"

    # -- settings -------------------------------------------------------------

    def evolve(self, **changes: Any) -> Policy:
        """A copy with some fields changed, validated like a new policy.

        >>> Policy("api", rate="5/s").evolve(key="tenant:{tenant_id}").key
        KeyTemplate('tenant:{tenant_id}')
        """
        current: dict[str, Any] = {
            "name": self.name,
            "key": self.key,
            "breaker": self.breaker,
            "bulkhead": self.bulkhead,
            "rate": list(self.rates) or None,
            "retry": self.retry,
            "defer": self.defer,
            "failure": self.failure,
            "fail_mode": self.fail_mode,
            "lease": self.lease,
        }
        unknown = sorted(set(changes) - set(current))
        if unknown:
            raise ConfigurationError("policy", unknown, f"expected fields among {', '.join(sorted(current))}")
        current.update(changes)
        return Policy(**current)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> Policy:
        """Build a policy from plain settings data, rejecting unknown fields.

        >>> Policy.from_dict({"key": "tenant:{tenant_id}", "rate": "5/s",
        ...                   "breaker": {"minimum_calls": 10}}, name="api").rates[0].rate
        Rate(limit=5, per=1.0)
        """
        where = f"policies.{name}" if name else "policy"
        if not isinstance(data, Mapping):
            raise ConfigurationError(where, data, "expected a mapping of policy fields")
        data = dict(data)
        policy_name = data.pop("name", name)
        _reject_unknown(where, data, {f.name for f in fields(cls)} | {"rate"} - {"rates"})
        kwargs: dict[str, Any] = {}
        try:
            for field, value in data.items():
                if field == "breaker":
                    kwargs[field] = _build(Breaker, f"{where}.breaker", value)
                elif field == "bulkhead":
                    kwargs[field] = (
                        value if isinstance(value, int) else _build(Bulkhead, f"{where}.bulkhead", value)
                    )
                elif field in ("rate", "rates"):
                    items = list(value) if isinstance(value, (list, tuple)) else [value]
                    kwargs["rate"] = [
                        _build(RateLimit, f"{where}.rate", v) if isinstance(v, Mapping) else v for v in items
                    ]
                elif field == "retry":
                    retry = dict(_mapping(f"{where}.retry", value))
                    if isinstance(retry.get("budget"), Mapping):
                        retry["budget"] = _build(RetryBudget, f"{where}.retry.budget", retry["budget"])
                    kwargs[field] = _build(RetryPolicy, f"{where}.retry", retry)
                elif field == "defer":
                    kwargs[field] = _build(DeferPolicy, f"{where}.defer", value)
                elif field == "failure":
                    kwargs[field] = _build(FailurePolicy, f"{where}.failure", value)
                else:
                    kwargs[field] = value
            return cls(cast(str, policy_name), **kwargs)
        except ConfigurationError as exc:
            if exc.field.startswith(where):
                raise
            raise ConfigurationError(
                f"{where}.{exc.field.removeprefix('policy.')}", exc.value, exc.expected
            ) from None


def _check_type(field: str, value: object, cls: type) -> None:
    if value is not None and not isinstance(value, cls):
        raise ConfigurationError(f"policy.{field}", value, f"expected a {cls.__name__}")


def _rates(value: RateLimit | RateLike | Sequence[RateLimit | RateLike] | None) -> tuple[RateLimit, ...]:
    if value is None:
        return ()
    items: Sequence[object] = value if isinstance(value, (list, tuple)) else [value]
    out: list[RateLimit] = []
    for item in items:
        if isinstance(item, RateLimit):
            out.append(item)
        elif isinstance(item, (str, Rate)):
            out.append(RateLimit(item))
        else:
            raise ConfigurationError(
                "policy.rate", item, 'expected a RateLimit, a Rate or a string like "100/s"'
            )
    if len({limit.slot_id + repr(limit.key) for limit in out}) != len(out):
        raise ConfigurationError("policy.rate", value, "expected distinct rate limits")
    return tuple(out)


def _mapping(field: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(field, value, "expected a mapping")
    return value


def _reject_unknown(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    for field in data:
        if field not in allowed:
            raise ConfigurationError(
                f"{where}.{field}",
                data[field],
                f"unknown field; expected one of {', '.join(sorted(allowed))}",
            )


def _build(cls: Callable[..., _T], where: str, value: object) -> _T:
    data = dict(_mapping(where, value))
    params = inspect.signature(cls).parameters
    _reject_unknown(where, data, set(params))
    positional = [name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    args = [data.pop(name) for name in positional if name in data]
    try:
        return cls(*args, **data)
    except ConfigurationError as exc:
        parts = exc.field.split(".")
        leaf = parts[-1]
        if "adaptive" in parts[:-1] and not where.endswith(".adaptive"):  # built inside the RateLimit
            leaf = "adaptive." + leaf
        raise ConfigurationError(f"{where}.{leaf}", exc.value, exc.expected) from None
    except TypeError as exc:
        raise ConfigurationError(
            where, value, f"expected the fields of {getattr(cls, '__name__', cls)} ({exc})"
        ) from None
