"""Prometheus metrics as :class:`~limitpal_tasks.Hooks` (needs ``pip install 'limitpal-tasks[prometheus]'``).

::

    from limitpal_tasks.metrics import PrometheusHooks
    app.conf.limitpal_hooks = [PrometheusHooks()]                  # Celery
    LimitpalMiddleware(..., hooks=(PrometheusHooks(),))            # Dramatiq

and expose the registry as usual (``prometheus_client.start_http_server(9100)``).

- ``limitpal_decisions_total{policy,reason}``: admission decisions (``admitted`` or the
  deferral reason);
- ``limitpal_defer_delay_seconds{policy,reason}``: histogram of deferral delays;
- ``limitpal_breaker_transitions_total{policy,from,to}``: breaker state changes;
- ``limitpal_breaker_open{policy}``: keys whose breaker is not closed (see below);
- ``limitpal_store_latency_seconds{operation}``: histogram of calls to the shared store,
  ``admit``, ``record`` or ``retry``, failed ones included (50µs to 1s buckets);
- ``limitpal_store_errors_total{policy,handled_as}``: store failures, handled as
  ``open``, ``closed`` or ``record``;
- ``limitpal_dead_letters_total{policy,reason}``: dead letters;
- ``limitpal_hook_errors_total``: hook calls that raised, every hook of this process;
- ``limitpal_rate_current{policy}``: an adaptive rate limit's rate (calls/s) as last changed
  by this process (``{policy,key}`` with ``PrometheusHooks(rate_per_key=True)``, for
  policies whose keys are few — a breaker per upstream, not a rate per tenant);
- ``limitpal_rate_changes_total{policy,reason}``: adaptive cuts (``overload``) and the
  increases reported (``increase``).

Labels are bounded: the policy name, the decision reason, the breaker states, the store
operation — never a tenant key.

A breaker transition is reported once fleet-wide, by the process that made it (the one
whose failure opened the breaker, or whose probe closed it), so the transition counters
and ``limitpal_breaker_open`` only make sense summed over the fleet:
``sum by (policy) (limitpal_breaker_open)`` is the number of keys whose breaker is open,
half-open or forced open. One process's value may be negative (another process opened
the breaker this one closed). Caveats: a process that restarts loses its contribution,
so the sum is off by that much until the other processes restart too; transitions made
by ``limitpal-tasks trip``/``reset`` (the CLI has no hooks) or lost with an expired store
key are not counted. Read exact states with ``limitpal-tasks status``.
"""

from __future__ import annotations

from collections.abc import Iterator

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "limitpal_tasks.metrics needs prometheus_client: pip install 'limitpal-tasks[prometheus]'"
    ) from exc

from .core.deadletter import DeadLetter
from .core.decisions import Decision, Deferred, RateChange, Transition
from .core.events import Hooks, StoreOperation, hook_errors_total
from .core.keys import TaskContext

__all__ = ["PrometheusHooks"]

_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))
# From an in-process MemoryStore (tens of µs) to a Redis round trip at its timeout.
_LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    float("inf"),
)
# States in which a key's breaker keeps (some) tasks from running.
_OPEN_STATES = frozenset({"open", "half_open", "forced_open"})


class _HookErrors(Collector):
    """``limitpal_hook_errors_total``, read from the process-wide count when scraped."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "limitpal_hook_errors",
            "Hook calls that raised in this process (the task was not affected).",
            value=hook_errors_total(),
        )


class PrometheusHooks(Hooks):
    """Counts decisions, deferral delays, breaker transitions and open breakers, store
    latency and errors, dead letters and hook errors, into ``registry``.

    Build one per registry: the metrics are registered when it is constructed.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY, *, rate_per_key: bool = False) -> None:
        self.rate_per_key = rate_per_key
        self.rate_current = Gauge(
            "limitpal_rate_current",
            "An adaptive rate limit's rate in calls per second, as last changed by this process.",
            ["policy", "key"] if rate_per_key else ["policy"],
            registry=registry,
        )
        self.rate_changes = Counter(
            "limitpal_rate_changes",
            "Adaptive rate changes: cuts on overload, and reported increases.",
            ["policy", "reason"],
            registry=registry,
        )
        self.decisions = Counter(
            "limitpal_decisions",
            "Admission decisions by policy and reason ('admitted' when run).",
            ["policy", "reason"],
            registry=registry,
        )
        self.transitions = Counter(
            "limitpal_breaker_transitions",
            "Breaker state changes made by this process (each is counted once fleet-wide).",
            ["policy", "from", "to"],
            registry=registry,
        )
        self.breaker_open = Gauge(
            "limitpal_breaker_open",
            "Keys whose breaker this process opened minus those it closed; sum over the fleet.",
            ["policy"],
            registry=registry,
        )
        self.defer_delay = Histogram(
            "limitpal_defer_delay_seconds",
            "Delay of each deferral.",
            ["policy", "reason"],
            buckets=_DELAY_BUCKETS,
            registry=registry,
        )
        self.store_latency = Histogram(
            "limitpal_store_latency_seconds",
            "Duration of calls to the shared store, failed ones included.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "limitpal_store_errors",
            "Store failures, by the fail mode that handled them.",
            ["policy", "handled_as"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "limitpal_dead_letters",
            "Dead-lettered tasks by policy and reason.",
            ["policy", "reason"],
            registry=registry,
        )
        registry.register(_HookErrors())

    def on_decision(self, policy: str, decision: Decision) -> None:
        self.decisions.labels(policy, "admitted" if decision.admitted else decision.reason).inc()

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        self.defer_delay.labels(policy, decision.reason).observe(decision.delay)

    def on_transition(self, transition: Transition) -> None:
        self.transitions.labels(transition.policy, transition.from_state, transition.to_state).inc()
        # Resolved on every transition so a policy's series exists (at 0) once it has any.
        gauge = self.breaker_open.labels(transition.policy)
        was_open = transition.from_state in _OPEN_STATES
        is_open = transition.to_state in _OPEN_STATES
        if is_open and not was_open:
            gauge.inc()
        elif was_open and not is_open:
            gauge.dec()

    def on_store_call(self, operation: StoreOperation, seconds: float, ok: bool) -> None:
        self.store_latency.labels(operation).observe(seconds)

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        self.store_errors.labels(policy, fallback).inc()

    def on_rate_change(self, change: RateChange) -> None:
        labels = (change.policy, change.key) if self.rate_per_key else (change.policy,)
        self.rate_current.labels(*labels).set(change.to_rate)
        self.rate_changes.labels(change.policy, change.reason).inc()

    def on_dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.labels(letter.policy, letter.reason).inc()
