"""``limitpal_tasks.dramatiq``: the Dramatiq integration (see :mod:`limitpal_tasks.integrations.dramatiq`)."""

from __future__ import annotations

from .integrations.dramatiq import ActorConfigurationError, Cooldown, LimitpalMiddleware, install, replay

__all__ = ["ActorConfigurationError", "Cooldown", "LimitpalMiddleware", "install", "replay"]
