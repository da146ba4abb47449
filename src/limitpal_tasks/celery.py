"""``limitpal_tasks.celery``: the Celery integration (see :mod:`limitpal_tasks.integrations.celery`)."""

from __future__ import annotations

from .integrations.celery import (
    Cooldown,
    ResilientTask,
    install,
    park_name,
    releaser,
    replay,
    resilient_task,
    runtime,
)

__all__ = [
    "Cooldown",
    "ResilientTask",
    "install",
    "park_name",
    "releaser",
    "replay",
    "resilient_task",
    "runtime",
]
