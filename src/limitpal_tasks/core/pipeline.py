"""The pipeline: pause → breaker → bulkhead → rate limit → run → record.

:class:`Pipeline` turns a policy and a task's context into a store request, and the
store's answer into a :class:`Decision`: it adds jitter, applies the deferral bounds and
the fail mode, and reports events. The rules themselves live in :mod:`.rules` (and the
Redis store's scripts); the sync and async methods share every line of logic.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from ..errors import Cooldown, StoreError
from .clock import Clock, MonotonicClock
from .decisions import (
    STAGE_BREAKER,
    STAGE_BULKHEAD,
    STAGE_RATE,
    AdmitRequest,
    Admitted,
    Decision,
    DeferReason,
    Deferred,
    Group,
    Outcome,
    RecordResult,
    Ticket,
)
from .events import HookRunner, Hooks, StoreOperation
from .keys import KeyTemplate, TaskContext
from .policy import Breaker, Bulkhead, Policy, RateLimit, RetryBudget
from .store import AdmitResult, Store, reservation_id
from .testing import is_testing

__all__ = ["Pipeline", "RetryDecision"]

log = logging.getLogger("limitpal_tasks.pipeline")

_STAGE_PAUSE = -1
_STORE_RETRY_DELAY = 5.0
_OUTAGE_LOG_INTERVAL = 10.0  # seconds between two "store unavailable" lines of one pipeline
_LAYOUT_CACHE = 4096  # distinct keys per policy whose groups are kept ready

_T = TypeVar("_T")
_P = ParamSpec("_P")


class _TicketIds:
    """Unique ticket ids, cheap to make: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = secrets.token_hex(6) + ":"
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return self.prefix + str(next(self.counter))


_ticket_ids = _TicketIds()


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether a failed execution is retried, and after how long; ``reason`` when it is not."""

    retry: bool
    delay: float = 0.0
    reason: str = ""


class _Part:
    """The components of one policy that share a rendered key."""

    __slots__ = ("breaker", "budget", "bulkhead", "rates")

    def __init__(self) -> None:
        self.breaker: Breaker | None = None
        self.bulkhead: Bulkhead | None = None
        self.rates: list[RateLimit] = []
        self.budget: RetryBudget | None = None


class _Layout:
    """A policy's components by key template, computed once per policy."""

    __slots__ = ("cache", "policy", "slots", "templates")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        templates: dict[KeyTemplate, int] = {policy.key: 0}

        def index(template: KeyTemplate | None) -> int:
            return templates.setdefault(template or policy.key, len(templates))

        retry_budget = policy.retry.budget if policy.retry is not None else None
        # (template index, breaker, bulkhead, rate, budget): one component per entry.
        self.slots: list[
            tuple[int, Breaker | None, Bulkhead | None, RateLimit | None, RetryBudget | None]
        ] = []
        if policy.breaker is not None:
            self.slots.append((index(policy.breaker.key), policy.breaker, None, None, None))
        if policy.bulkhead is not None:
            self.slots.append((index(policy.bulkhead.key), None, policy.bulkhead, None, None))
        for limit in policy.rates:
            self.slots.append((index(limit.key), None, None, limit, None))
        if retry_budget is not None:
            self.slots.append((index(retry_budget.key), None, None, None, retry_budget))
        self.templates = tuple(templates)
        self.cache: dict[tuple[str, ...], tuple[Group, ...]] = {}

    def groups(self, context: TaskContext) -> tuple[Group, ...]:
        rendered = tuple([template.render(context) for template in self.templates])
        if context.reservations:
            return self._build(rendered, context.reservations)
        groups = self.cache.get(rendered)
        if groups is None:
            if len(self.cache) >= _LAYOUT_CACHE:
                self.cache.clear()
            groups = self.cache[rendered] = self._build(rendered, None)
        return groups

    def _build(self, rendered: tuple[str, ...], carried: Mapping[str, float] | None) -> tuple[Group, ...]:
        parts: dict[str, _Part] = {rendered[0]: _Part()}
        for i, breaker, bulkhead, limit, budget in self.slots:
            part = parts.get(rendered[i]) or parts.setdefault(rendered[i], _Part())
            if breaker is not None:
                part.breaker = breaker
            elif bulkhead is not None:
                part.bulkhead = bulkhead
            elif limit is not None:
                part.rates.append(limit)
            else:
                part.budget = budget
        groups = [
            Group(
                key=key,
                stage=(
                    STAGE_BREAKER
                    if part.breaker is not None
                    else STAGE_BULKHEAD
                    if part.bulkhead is not None
                    else STAGE_RATE
                    if part.rates
                    else _STAGE_PAUSE
                ),
                breaker=part.breaker,
                bulkhead=part.bulkhead,
                rates=tuple(part.rates),
                budget=part.budget,
                lease=self.policy.lease,
                reservations=(
                    tuple(carried.get(reservation_id(key, r.slot_id)) for r in part.rates) if carried else ()
                ),
                pause_target=key == rendered[0],
            )
            for key, part in parts.items()
        ]
        if len(groups) > 1:
            groups.sort(key=lambda g: (g.stage, g.key))
        return tuple(groups)


class Pipeline:
    """Admits task executions against a :class:`Store` and records their outcomes.

    >>> from limitpal_tasks import MemoryStore, MockClock, Policy, TaskContext
    >>> clock = MockClock()
    >>> pipeline = Pipeline(MemoryStore(clock=clock), clock=clock)
    >>> policy = Policy("api", rate="1/s")
    >>> decision = pipeline.admit(policy, TaskContext("send"))
    >>> decision.admitted
    True
    >>> pipeline.record(decision.ticket, Outcome.success())
    >>> pipeline.admit(policy, TaskContext("send")).reason
    'rate_limited'

    ``clock`` is passed to the store as an explicit ``now`` (tests); without it the store
    uses its own clock (Redis: the server's). ``fallback`` serves ``fail_mode="open"``
    policies while the store is unreachable (default: a per-process ``MemoryStore``).
    ``hooks`` is a sequence of :class:`Hooks`, or a :class:`HookRunner` built with other
    than the default summary interval or clocks.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        fallback: Store | None = None,
        hooks: Sequence[Hooks] | HookRunner = (),
    ) -> None:
        self.store = store
        self.clock = clock
        self._local_clock: Clock = clock or MonotonicClock()
        self._rng = rng or random.Random()
        self._fallback = fallback
        self._outage_logged = -math.inf
        self._outage_count = 0
        self.hooks = hooks if isinstance(hooks, HookRunner) else HookRunner(hooks, clock=self._local_clock)
        self._timed = self.hooks.times_store_calls
        self._layouts: dict[int, _Layout] = {}
        self.store_errors = 0
        # A store that writes some outcomes later (batching) reports what they changed here.
        set_sink = getattr(store, "set_transition_sink", None)
        if callable(set_sink):
            set_sink(self.hooks.transition)

    # -- admission --------------------------------------------------------------

    def admit(self, policy: Policy, context: TaskContext) -> Decision:
        """Admit or defer one execution; nothing is consumed when it is deferred."""
        request = self._request(policy, context)
        try:
            if self._timed:
                result = self._timed_call("admit", self.store.admit, request)
            else:
                result = self.store.admit(request)
        except StoreError as exc:
            return self._store_failed(policy, context, request, exc)
        return self._decide(policy, context, request, result, fallback=False)

    async def admit_async(self, policy: Policy, context: TaskContext) -> Decision:
        """The asyncio twin of :meth:`admit`."""
        request = self._request(policy, context)
        try:
            if self._timed:
                result = await self._timed_call_async("admit", self.store.admit_async(request))
            else:
                result = await self.store.admit_async(request)
        except StoreError as exc:
            return self._store_failed(policy, context, request, exc)
        return self._decide(policy, context, request, result, fallback=False)

    def _request(self, policy: Policy, context: TaskContext) -> AdmitRequest:
        layout = self._layouts.get(id(policy))
        if layout is None or layout.policy is not policy:
            layout = self._layouts[id(policy)] = _Layout(policy)
        now = self.clock.now() if self.clock is not None else None
        return AdmitRequest(policy.name, _ticket_ids(), layout.groups(context), now, self._rng.random())

    def _decide(
        self, policy: Policy, context: TaskContext, request: AdmitRequest, result: AdmitResult, fallback: bool
    ) -> Decision:
        self.hooks.transition(result.transitions)
        decision: Decision
        if result.admitted:
            ticket = Ticket(
                request.ticket_id,
                policy,
                request.groups,
                result.generations,
                result.probe,
                result.now,
                fallback,
            )
            decision = Admitted(ticket, result.transitions)
        else:
            decision = self._deferred(policy, context, result)
            self.hooks.defer(policy.name, decision, context)
        self.hooks.decision(policy.name, decision)
        return decision

    def deferral(
        self, policy: Policy, context: TaskContext, reason: DeferReason, delay: float, now: float
    ) -> Deferred:
        """A deferral decided outside ``admit`` (e.g. the task raised ``Cooldown``), with the
        same jitter and bounds as any other."""
        decision = self._deferred(policy, context, AdmitResult(False, now, reason, delay))
        self.hooks.defer(policy.name, decision, context)
        self.hooks.decision(policy.name, decision)
        return decision

    def _deferred(self, policy: Policy, context: TaskContext, result: AdmitResult) -> Deferred:
        defer = policy.defer
        raw = result.delay
        draw = self._rng.random()
        if result.reason == "breaker_open":
            spread = defer.open_spread
            if spread is None:
                spread = max(1.0, defer.jitter * (policy.breaker.open_for if policy.breaker else raw))
            delay = raw + spread * draw
        elif result.reason == "rate_limited" and result.reservations:
            delay = raw  # a booked slot is already spread; jitter would make it miss
        else:
            delay = raw * (1.0 + defer.jitter * draw)
        delay = 0.0 if is_testing() else min(delay, defer.max_delay)
        deferrals = context.deferrals + (0 if result.early else 1)
        first_seen = context.first_seen if context.first_seen is not None else result.now
        exhausted = None
        if deferrals > defer.max_deferrals:
            exhausted = "max_deferrals"
        elif result.now + delay - first_seen > defer.deadline:
            exhausted = "deadline"
        assert result.reason is not None
        return Deferred(
            delay, result.reason, deferrals, first_seen, result.reservations, exhausted, result.transitions
        )

    def _store_failed(
        self, policy: Policy, context: TaskContext, request: AdmitRequest, exc: StoreError
    ) -> Decision:
        self.store_errors += 1
        self.hooks.store_error(policy.name, exc, policy.fail_mode)
        self._log_outage(policy, exc)
        if policy.fail_mode == "closed":
            now = request.now if request.now is not None else self._local_clock.now()
            result = AdmitResult(False, now, "store_unavailable", _STORE_RETRY_DELAY)
            return self._decide(policy, context, request, result, fallback=False)
        fallback = self._local()
        return self._decide(policy, context, request, fallback.admit(request), fallback=True)

    def _log_outage(self, policy: Policy, exc: StoreError) -> None:
        """One WARNING per outage interval, with how many admissions it covered (an outage at
        a thousand tasks a second must not write a thousand lines a second)."""
        now = self._local_clock.now()
        self._outage_count += 1
        if now - self._outage_logged < _OUTAGE_LOG_INTERVAL:
            return
        action = "deferring" if policy.fail_mode == "closed" else "admitting on this process's state"
        log.warning(
            "store unavailable (%s); %s [%s] and %d admissions since the last such line",
            exc,
            action,
            policy.name,
            self._outage_count - 1,
        )
        self._outage_logged = now
        self._outage_count = 0

    def _local(self) -> Store:
        if self._fallback is None:
            from ..stores.memory import MemoryStore  # noqa: PLC0415 - stores depend on core; load on first need

            self._fallback = MemoryStore(clock=self.clock)
        return self._fallback

    # -- outcomes ---------------------------------------------------------------

    def record(self, ticket: Ticket, outcome: Outcome) -> None:
        """Give back what ``ticket`` holds and feed the breaker; never raises for store errors."""
        store = self._local() if ticket.fallback else self.store
        try:
            if self._timed and not ticket.fallback:
                result = self._timed_call(
                    "record", store.record, ticket, outcome, self._now(), self._rng.random()
                )
            else:
                result = store.record(ticket, outcome, self._now(), self._rng.random())
        except StoreError as exc:
            self._record_failed(ticket, exc)
            return
        self._recorded(result)

    async def record_async(self, ticket: Ticket, outcome: Outcome) -> None:
        """The asyncio twin of :meth:`record`."""
        store = self._local() if ticket.fallback else self.store
        try:
            call = store.record_async(ticket, outcome, self._now(), self._rng.random())
            if self._timed and not ticket.fallback:
                result = await self._timed_call_async("record", call)
            else:
                result = await call
        except StoreError as exc:
            self._record_failed(ticket, exc)
            return
        self._recorded(result)

    def _recorded(self, result: RecordResult) -> None:
        self.hooks.transition(result.transitions)
        if result.rate_changes:
            self.hooks.rate_change(result.rate_changes)

    def _record_failed(self, ticket: Ticket, exc: StoreError) -> None:
        self.store_errors += 1
        self.hooks.store_error(ticket.policy.name, exc, "record")
        log.warning(
            "could not record an outcome for %s (its leases expire on their own): %s", ticket.policy.name, exc
        )

    def _now(self) -> float | None:
        return self.clock.now() if self.clock is not None else None

    # -- store latency ------------------------------------------------------------

    def _timed_call(
        self, operation: StoreOperation, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        timer = self.hooks.timer
        start = timer()
        ok = False
        try:
            result = call(*args, **kwargs)
            ok = True
            return result
        finally:
            self.hooks.store_call(operation, timer() - start, ok)

    async def _timed_call_async(self, operation: StoreOperation, call: Awaitable[_T]) -> _T:
        # The coroutine is created before timing starts but runs only when awaited here.
        timer = self.hooks.timer
        start = timer()
        ok = False
        try:
            result = await call
            ok = True
            return result
        finally:
            self.hooks.store_call(operation, timer() - start, ok)

    # -- retries ----------------------------------------------------------------

    def outcome_of(self, policy: Policy, exc: BaseException | None, duration: float | None = None) -> Outcome:
        """The outcome to record for an execution that returned (``None``) or raised ``exc``."""
        if exc is None:
            return Outcome.success(duration)
        if isinstance(exc, Cooldown):
            return Outcome.cooldown(exc.retry_after, duration)
        if policy.classify(exc) == "ignore":
            return Outcome.ignored(duration)
        return Outcome.failure(duration, overload=bool(policy.rates) and policy.is_overload(exc))

    def retry(
        self,
        policy: Policy,
        exc: BaseException,
        attempt: int,
        context: TaskContext,
        previous: float | None = None,
    ) -> RetryDecision:
        """Whether attempt number ``attempt`` (1-based), which raised ``exc``, is retried."""
        decision, budget_key = self._retry_plan(policy, exc, attempt, context, previous)
        if budget_key is None or not decision.retry:
            return decision
        budget = policy.retry.budget if policy.retry is not None else None
        assert budget is not None
        try:
            if self._timed:
                allowed = self._timed_call("retry", self.store.spend_retry, budget_key, budget, self._now())
            else:
                allowed = self.store.spend_retry(budget_key, budget, self._now())
        except StoreError as exc_:
            allowed = self._budget_failed(policy, exc_)
        return decision if allowed else RetryDecision(False, reason="retry_budget")

    async def retry_async(
        self,
        policy: Policy,
        exc: BaseException,
        attempt: int,
        context: TaskContext,
        previous: float | None = None,
    ) -> RetryDecision:
        """The asyncio twin of :meth:`retry`."""
        decision, budget_key = self._retry_plan(policy, exc, attempt, context, previous)
        if budget_key is None or not decision.retry:
            return decision
        budget = policy.retry.budget if policy.retry is not None else None
        assert budget is not None
        try:
            call = self.store.spend_retry_async(budget_key, budget, self._now())
            allowed = await (self._timed_call_async("retry", call) if self._timed else call)
        except StoreError as exc_:
            allowed = self._budget_failed(policy, exc_)
        return decision if allowed else RetryDecision(False, reason="retry_budget")

    def _retry_plan(
        self, policy: Policy, exc: BaseException, attempt: int, context: TaskContext, previous: float | None
    ) -> tuple[RetryDecision, str | None]:
        retry = policy.retry
        if retry is None:
            return RetryDecision(False, reason="no_retry_policy"), None
        verdict = policy.classify(exc)
        if verdict != "retry":
            return RetryDecision(False, reason=verdict), None
        if attempt >= retry.max_attempts:
            return RetryDecision(False, reason="max_attempts"), None
        carried = getattr(exc, "retry_after", None)
        if isinstance(carried, (int, float)) and not isinstance(carried, bool) and carried >= 0:
            delay = min(float(carried), retry.backoff_max)
        else:
            delay = retry.delay(attempt, self._rng.random(), previous)
        if is_testing():
            delay = 0.0
        budget_key = None
        if retry.budget is not None:
            budget_key = (retry.budget.key or policy.key).render(context)
        return RetryDecision(True, delay), budget_key

    def _budget_failed(self, policy: Policy, exc: StoreError) -> bool:
        self.store_errors += 1
        self.hooks.store_error(policy.name, exc, policy.fail_mode)
        return policy.fail_mode == "open"
