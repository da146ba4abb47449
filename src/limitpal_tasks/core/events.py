"""Hooks: how the pipeline tells the outside world what it decided.

Subclass :class:`Hooks` and override what you need; every method is a no-op by default.
A hook that raises is logged and counted, never allowed to break the task.

Logging, under ``limitpal_tasks.*``:

- ``limitpal_tasks.events``: each breaker transition at INFO; each deferral at DEBUG, and
  at most one INFO summary of the deferrals per ``summary_interval`` (so an outage that
  defers thousands of tasks a second writes one line every ten seconds, not thousands);
  a raising hook at ERROR, with its traceback, at most once per interval per hook and event.
- ``limitpal_tasks.deadletter``: each dead letter at WARNING (task, policy, key, reason,
  attempts, deferrals, id — never the task's arguments).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

from ..errors import ConfigurationError
from .clock import Clock, MonotonicClock
from .deadletter import DeadLetter
from .decisions import Decision, Deferred, RateChange, Transition
from .keys import TaskContext

__all__ = ["HookRunner", "Hooks", "StoreOperation", "hook_errors_total"]

log = logging.getLogger("limitpal_tasks.events")
dead_letter_log = logging.getLogger("limitpal_tasks.deadletter")

StoreOperation = Literal["admit", "record", "retry"]
"""The store calls :meth:`Hooks.on_store_call` times: ``Store.admit``, ``record``, ``spend_retry``."""

_SUMMARY_TOP = 5  # (policy, reason) pairs named in a deferral summary; the rest are summed

_errors_lock = threading.Lock()
_errors_total = 0


def hook_errors_total() -> int:
    """How many times a hook raised in this process, over every :class:`HookRunner`."""
    return _errors_total


class Hooks:
    """Receives the pipeline's events; override the methods you need.

    Every argument is an immutable value (frozen, slotted dataclasses, strings, numbers):
    keep it, send it elsewhere, but do not expect to change what the pipeline does.

    >>> class PrintTransitions(Hooks):
    ...     def on_transition(self, transition: Transition) -> None:
    ...         print(transition.key, transition.from_state, "->", transition.to_state)
    """

    def on_transition(self, transition: Transition) -> None:
        """A breaker changed state (emitted once fleet-wide, by the process that changed it)."""

    def on_rate_change(self, change: RateChange) -> None:
        """An adaptive rate limit cut its key's rate on overload, or successes raised it by a
        tenth (emitted once fleet-wide, by the process whose record changed it)."""

    def on_decision(self, policy: str, decision: Decision) -> None:
        """Every admission decision, admitted or deferred."""

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        """An execution was deferred (``decision.reason``, ``decision.delay``); ``context``
        says which task and arguments."""

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        """The store failed; ``fallback`` is ``"open"`` (ran locally) or ``"closed"`` (deferred)."""

    def on_dead_letter(self, letter: DeadLetter) -> None:
        """A task was dead-lettered (once per letter, whether or not the store kept it)."""

    def on_store_call(self, operation: StoreOperation, seconds: float, ok: bool) -> None:
        """A call to the shared store took ``seconds``; ``ok`` is false when it raised.

        ``operation`` is ``"admit"``, ``"record"`` or ``"retry"``. Calls to the per-process
        fallback store are not reported; a success that ``RedisStore`` batches is timed
        as the time to queue it (its round trip is paid by a later call). The pipeline
        only times store calls when some hook overrides this method, so leaving it alone
        costs nothing.
        """


def _overrides(hook: Hooks, name: str) -> bool:
    """Whether ``hook``'s class replaces the no-op :class:`Hooks` method ``name``."""
    return getattr(type(hook), name, None) is not getattr(Hooks, name)


class HookRunner:
    """Calls every hook, isolating their failures, and writes the pipeline's log lines.

    ``clock`` paces the deferral summary and the hook-error log lines (default: a
    monotonic clock; give tests a ``MockClock``); ``summary_interval`` is the least time
    between two of those lines. ``timer`` measures store calls for
    :meth:`Hooks.on_store_call` (default ``time.perf_counter``).
    Pass a runner as ``Pipeline(store, hooks=HookRunner([...], summary_interval=60))``
    to change them.
    """

    __slots__ = (
        "_clock",
        "_deferred",
        "_error_logged",
        "_lock",
        "_window_start",
        "errors",
        "hooks",
        "summary_interval",
        "timer",
        "times_store_calls",
    )

    def __init__(
        self,
        hooks: Sequence[Hooks] = (),
        *,
        clock: Clock | None = None,
        summary_interval: float = 10.0,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(summary_interval, bool) or not summary_interval > 0:
            raise ConfigurationError("summary_interval", summary_interval, "expected seconds > 0")
        self.hooks = tuple(hooks)
        self.errors = 0
        self.summary_interval = float(summary_interval)
        self.timer = timer
        # Decided once: the pipeline reads this flag before every store call, and skips
        # both clock reads when no hook would receive the measurement.
        self.times_store_calls = any(_overrides(hook, "on_store_call") for hook in self.hooks)
        self._clock: Clock = clock or MonotonicClock()
        self._lock = threading.Lock()  # worker threads defer concurrently
        self._deferred: dict[tuple[str, str], int] = {}
        self._window_start: float | None = None
        self._error_logged: dict[tuple[int, str], float] = {}

    def _failed(self, hook: Hooks, event: str) -> None:
        global _errors_total  # noqa: PLW0603 - one process-wide count, read by the metrics
        now = self._clock.now()
        with _errors_lock:
            self.errors += 1
            _errors_total += 1
            # A hook broken for every task must not write a traceback per task.
            key = (id(hook), event)
            last = self._error_logged.get(key)
            if last is not None and now - last < self.summary_interval:
                return
            self._error_logged[key] = now
            errors = self.errors
        log.exception(
            "hook %r raised in %s; the task is not affected (%d hook errors so far)", hook, event, errors
        )

    def transition(self, transitions: Sequence[Transition]) -> None:
        """Log and report breaker transitions."""
        if not transitions:
            return
        for transition in transitions:
            log.info(
                "breaker %s [%s] %s -> %s (generation %d)",
                transition.key,
                transition.policy,
                transition.from_state,
                transition.to_state,
                transition.generation,
            )
            for hook in self.hooks:
                try:
                    hook.on_transition(transition)
                except Exception:
                    self._failed(hook, "on_transition")

    def rate_change(self, changes: Sequence[RateChange]) -> None:
        """Log and report adaptive rate changes."""
        for change in changes:
            log.info(
                "rate %s [%s] %s: %.3g/s -> %.3g/s (%s)",
                change.key,
                change.policy,
                change.limit,
                change.from_rate,
                change.to_rate,
                change.reason,
            )
            for hook in self.hooks:
                try:
                    hook.on_rate_change(change)
                except Exception:
                    self._failed(hook, "on_rate_change")

    def decision(self, policy: str, decision: Decision) -> None:
        """Report an admission decision."""
        if not self.hooks:
            return
        for hook in self.hooks:
            try:
                hook.on_decision(policy, decision)
            except Exception:
                self._failed(hook, "on_decision")

    def defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        """Log (DEBUG, and the periodic INFO summary) and report a deferral."""
        log.debug(
            "deferred %s [%s] by %.3fs: %s (deferral %d)",
            context.task_name,
            policy,
            decision.delay,
            decision.reason,
            decision.deferrals,
        )
        self._count_deferral(policy, decision.reason)
        for hook in self.hooks:
            try:
                hook.on_defer(policy, decision, context)
            except Exception:
                self._failed(hook, "on_defer")

    def _count_deferral(self, policy: str, reason: str) -> None:
        # Emitted by the deferral that finds the interval elapsed, not by a timer thread:
        # no thread to start per process (or to restart after a fork), and no line at all
        # while nothing is deferred.
        now = self._clock.now()
        pair = (policy, reason)
        with self._lock:
            self._deferred[pair] = self._deferred.get(pair, 0) + 1
            start = self._window_start
            if start is None:
                self._window_start = now
                return
            if now - start < self.summary_interval:
                return
            counts, self._deferred, self._window_start = self._deferred, {}, None
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        parts = [f"{p}/{r}={n}" for (p, r), n in ranked[:_SUMMARY_TOP]]
        if len(ranked) > _SUMMARY_TOP:
            rest = ranked[_SUMMARY_TOP:]
            parts.append(f"{len(rest)} others={sum(n for _, n in rest)}")
        log.info(
            "deferred %d tasks in the last %.1fs: %s", sum(counts.values()), now - start, ", ".join(parts)
        )

    def store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        """Report a store failure and how it was handled."""
        for hook in self.hooks:
            try:
                hook.on_store_error(policy, error, fallback)
            except Exception:
                self._failed(hook, "on_store_error")

    def store_call(self, operation: StoreOperation, seconds: float, ok: bool) -> None:
        """Report the duration of one store call (only called when ``times_store_calls``)."""
        for hook in self.hooks:
            try:
                hook.on_store_call(operation, seconds, ok)
            except Exception:
                self._failed(hook, "on_store_call")

    def dead_letter(self, letter: DeadLetter) -> None:
        """Log and report a dead letter; the log line never shows the task's arguments."""
        dead_letter_log.warning(
            "dead-lettered %s [%s] key=%s: %s after %d attempt(s) and %d deferral(s) (id %s)",
            letter.task_name,
            letter.policy,
            letter.key,
            letter.reason,
            letter.attempts,
            letter.deferrals,
            letter.id,
        )
        for hook in self.hooks:
            try:
                hook.on_dead_letter(letter)
            except Exception:
                self._failed(hook, "on_dead_letter")
