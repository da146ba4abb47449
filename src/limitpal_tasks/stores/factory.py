"""``store_from_url``: one string in settings picks and configures the store."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..core.clock import Clock
from ..core.store import Store
from ..errors import ConfigurationError
from .memory import MemoryStore

__all__ = ["store_from_url"]


def store_from_url(url: str, *, clock: Clock | None = None, **options: Any) -> Store:
    """Build a store from a URL.

    - ``memory://`` (optionally ``?idle_ttl=600&max_keys=10000``): a :class:`MemoryStore`;
    - ``redis://``, ``rediss://``, ``unix://``: a ``RedisStore`` (``?cluster=true`` or
      ``redis+cluster://`` for Redis Cluster); ``options`` go to ``RedisStore.from_url``
      (``prefix``, ``store_timeout``, ...).

    >>> store_from_url("memory://").status("k").breaker
    'closed'
    """
    if not isinstance(url, str):
        raise ConfigurationError("store_url", url, "expected a URL string such as redis://localhost:6379/0")
    parts = urlsplit(url)
    if parts.scheme == "memory":
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"idle_ttl", "max_keys"}
        if unknown:
            raise ConfigurationError(
                "store_url", url, f"expected only idle_ttl and max_keys options, got {sorted(unknown)}"
            )
        try:
            return MemoryStore(
                clock=clock,
                idle_ttl=float(query.get("idle_ttl", 3600.0)),
                max_keys=int(query.get("max_keys", 100_000)),
            )
        except ValueError:
            raise ConfigurationError("store_url", url, "expected numeric idle_ttl and max_keys") from None
    if parts.scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        try:
            from .redis import RedisStore  # noqa: PLC0415 - redis-py is an optional extra
        except ModuleNotFoundError as exc:
            if exc.name != "redis":
                raise
            raise ImportError("a redis:// store needs redis-py: pip install 'limitpal-tasks[redis]'") from exc
        return RedisStore.from_url(url, clock=clock, **options)
    raise ConfigurationError(
        "store_url", url, "expected a memory://, redis://, rediss://, unix:// or redis+cluster:// URL"
    )
