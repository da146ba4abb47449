"""State stores: :class:`MemoryStore` (embedded) and ``RedisStore`` (shared by the fleet)."""

from __future__ import annotations

from .factory import store_from_url
from .memory import MemoryStore

__all__ = ["MemoryStore", "RedisStore", "store_from_url"]


def __getattr__(name: str) -> object:
    # RedisStore needs the optional redis-py client: import it only when asked for.
    if name == "RedisStore":
        try:
            from .redis import RedisStore  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            if exc.name != "redis":
                raise
            raise ImportError("RedisStore needs redis-py: pip install 'limitpal-tasks[redis]'") from exc
        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
