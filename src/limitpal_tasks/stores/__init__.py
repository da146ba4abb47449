"""State stores: :class:`MemoryStore` (embedded) and ``RedisStore`` (shared by the fleet)."""

from __future__ import annotations

from .memory import MemoryStore

__all__ = ["MemoryStore"]
