"""Names and settings shared by the worker app (``celery_tasks``) and the tests.

Free of Celery on purpose: the test process imports this module, never ``celery_tasks``,
whose shared tasks would otherwise be attached to every Celery app of the pytest session.
"""

from __future__ import annotations

from typing import Any

TENANT_TASK = "limitpal_it.tenant_call"
UPSTREAM_TASK = "limitpal_it.upstream_call"
STRICT_TASK = "limitpal_it.strict_call"
PARTNER_TASK = "limitpal_it.partner_call"
STEP_TASK = "limitpal_it.step"
SQUARE_TASK = "limitpal_it.square"
COLLECT_TASK = "limitpal_it.collect"
PLAIN_TASK = "limitpal_it.plain_sync"
LATE_TASK = "limitpal_it.late_call"

TENANT_RATE = 5.0
"""Executions per second and tenant of :data:`TENANT_TASK` (a ``Policy`` object in code)."""
PIPELINE_RATE = 2.0
"""Executions per second and tenant of the ``pipeline`` policy (chains, chords, acks_late)."""
SETTINGS_RATE = 2.0
"""Executions per second and tenant of the ``settings_only`` policy (the undecorated task)."""
UPSTREAM_OPEN_FOR = 1.0
"""How long a (forced-)open breaker of the ``upstream`` policy defers, before spreading."""

POLICIES: dict[str, dict[str, Any]] = {
    "upstream": {
        "key": "service:{service}",
        "breaker": {"minimum_calls": 20, "window": 20, "open_for": UPSTREAM_OPEN_FOR},
        "retry": {"max_attempts": 3, "backoff": 0.2, "backoff_max": 0.2, "jitter": "none"},
        "defer": {"open_spread": 0.2},
    },
    "strict": {
        "key": "service:{service}",
        "breaker": {"open_for": 0.5},
        "defer": {"max_deferrals": 2, "open_spread": 0.1},
    },
    "partner": {"key": "partner:{partner}", "defer": {"jitter": 0.05}},
    "pipeline": {"key": "tenant:{tenant_id}", "rate": f"{PIPELINE_RATE:g}/s"},
    "settings_only": {"key": "tenant:{tenant_id}", "rate": f"{SETTINGS_RATE:g}/s"},
}
"""``limitpal_policies``: plain data in ``Policy.from_dict`` format, as settings hold it."""

TASK_POLICIES = {PLAIN_TASK: "settings_only"}
"""``limitpal_task_policies``: :data:`PLAIN_TASK` is protected by settings alone."""


def record_key(kind: str, prefix: str) -> str:
    """The Redis list of records of ``kind``: ``runs``, ``events``, ``failures``, ``cooldowns``."""
    return f"{prefix}:rec:{kind}"


def health_key(service: str, prefix: str) -> str:
    """The Redis key saying whether ``service`` is ``"up"`` (the default), ``"down"`` or ``"flaky"``."""
    return f"{prefix}:health:{service}"
