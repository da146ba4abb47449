"""Hooks: how the pipeline tells the outside world what it decided.

Subclass :class:`Hooks` and override what you need; every method is a no-op by default.
A hook that raises is logged and counted, never allowed to break the task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .decisions import Decision, Deferred, Transition
from .keys import TaskContext

__all__ = ["HookRunner", "Hooks"]

log = logging.getLogger("limitpal_tasks.events")


class Hooks:
    """Receives the pipeline's events; override the methods you need."""

    def on_transition(self, transition: Transition) -> None:
        """A breaker changed state (emitted once fleet-wide, by the process that changed it)."""

    def on_decision(self, policy: str, decision: Decision) -> None:
        """Every admission decision, admitted or deferred."""

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        """An execution was deferred (``decision.reason``, ``decision.delay``); ``context``
        says which task and arguments."""

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        """The store failed; ``fallback`` is ``"open"`` (ran locally) or ``"closed"`` (deferred)."""


class HookRunner:
    """Calls every hook, isolating their failures."""

    __slots__ = ("errors", "hooks")

    def __init__(self, hooks: Sequence[Hooks] = ()) -> None:
        self.hooks = tuple(hooks)
        self.errors = 0

    def _failed(self, hook: Hooks, event: str) -> None:
        self.errors += 1
        log.exception("hook %r raised in %s; the task is not affected", hook, event)

    def transition(self, transitions: Sequence[Transition]) -> None:
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

    def decision(self, policy: str, decision: Decision) -> None:
        if not self.hooks:
            return
        for hook in self.hooks:
            try:
                hook.on_decision(policy, decision)
            except Exception:
                self._failed(hook, "on_decision")

    def defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        log.debug(
            "deferred %s [%s] by %.3fs: %s (deferral %d)",
            context.task_name,
            policy,
            decision.delay,
            decision.reason,
            decision.deferrals,
        )
        for hook in self.hooks:
            try:
                hook.on_defer(policy, decision, context)
            except Exception:
                self._failed(hook, "on_defer")

    def store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        for hook in self.hooks:
            try:
                hook.on_store_error(policy, error, fallback)
            except Exception:
                self._failed(hook, "on_store_error")
