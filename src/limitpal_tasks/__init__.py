"""limitpal_tasks: resilient Celery and Dramatiq workers.

Every task execution passes one pipeline, keyed by tenant or target service —
pause/cooldown → circuit breaker → bulkhead → rate limit → run → record — with state
shared by the fleet, and tasks that may not run now are deferred instead of sleeping.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .core.clock import Clock, MockClock, MonotonicClock
from .core.deadletter import DeadLetter
from .core.decisions import (
    AdaptiveStatus,
    Admitted,
    Decision,
    Deferred,
    KeyStatus,
    Outcome,
    RateChange,
    RateOverride,
    Ticket,
    Transition,
)
from .core.events import HookRunner, Hooks
from .core.keys import KeyTemplate, TaskContext
from .core.pipeline import Pipeline, RetryDecision
from .core.policy import (
    AdaptiveRate,
    Breaker,
    Bulkhead,
    DeferPolicy,
    FailurePolicy,
    Policy,
    RateLimit,
    RetryBudget,
    RetryPolicy,
)
from .core.store import Store
from .core.testing import set_testing
from .core.units import Rate
from .errors import (
    ConfigurationError,
    Cooldown,
    DeferralLimitExceeded,
    LimitpalError,
    RetryBudgetExhausted,
    StoreError,
)
from .stores.factory import store_from_url
from .stores.memory import MemoryStore

try:
    __version__ = version("limitpal-tasks")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "AdaptiveRate",
    "AdaptiveStatus",
    "Admitted",
    "Breaker",
    "Bulkhead",
    "Clock",
    "ConfigurationError",
    "Cooldown",
    "DeadLetter",
    "Decision",
    "DeferPolicy",
    "DeferralLimitExceeded",
    "Deferred",
    "FailurePolicy",
    "HookRunner",
    "Hooks",
    "KeyStatus",
    "KeyTemplate",
    "LimitpalError",
    "MemoryStore",
    "MockClock",
    "MonotonicClock",
    "Outcome",
    "Pipeline",
    "Policy",
    "Rate",
    "RateChange",
    "RateLimit",
    "RateOverride",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryDecision",
    "RetryPolicy",
    "Store",
    "StoreError",
    "TaskContext",
    "Ticket",
    "Transition",
    "__version__",
    "set_testing",
    "store_from_url",
]
