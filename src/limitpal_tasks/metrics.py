"""Prometheus metrics as :class:`~limitpal_tasks.Hooks` (needs ``pip install 'limitpal-tasks[prometheus]'``).

::

    from limitpal_tasks.metrics import PrometheusHooks
    app.conf.limitpal_hooks = [PrometheusHooks()]                  # Celery
    LimitpalMiddleware(..., hooks=(PrometheusHooks(),))            # Dramatiq

Labels are bounded: the policy name, the decision reason, the breaker states — never a
tenant key.
"""

from __future__ import annotations

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "limitpal_tasks.metrics needs prometheus_client: pip install 'limitpal-tasks[prometheus]'"
    ) from exc

from .core.decisions import Decision, Deferred, Transition
from .core.events import Hooks
from .core.keys import TaskContext

__all__ = ["PrometheusHooks"]

_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


class PrometheusHooks(Hooks):
    """Counts decisions, deferral delays, breaker transitions and store errors."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.decisions = Counter(
            "limitpal_decisions",
            "Admission decisions by policy and reason ('admitted' when run).",
            ["policy", "reason"],
            registry=registry,
        )
        self.transitions = Counter(
            "limitpal_breaker_transitions",
            "Breaker state changes made by this process.",
            ["policy", "from_state", "to_state"],
            registry=registry,
        )
        self.defer_delay = Histogram(
            "limitpal_defer_delay_seconds",
            "Delay of each deferral.",
            ["policy", "reason"],
            buckets=_DELAY_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "limitpal_store_errors",
            "Store failures, by the fail mode that handled them.",
            ["policy", "handled_as"],
            registry=registry,
        )

    def on_decision(self, policy: str, decision: Decision) -> None:
        self.decisions.labels(policy, "admitted" if decision.admitted else decision.reason).inc()

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        self.defer_delay.labels(policy, decision.reason).observe(decision.delay)

    def on_transition(self, transition: Transition) -> None:
        self.transitions.labels(transition.policy, transition.from_state, transition.to_state).inc()

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        self.store_errors.labels(policy, fallback).inc()
