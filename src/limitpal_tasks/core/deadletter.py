"""Dead letters: tasks that exhausted their attempts, deferrals or deadline, kept with the reason."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DeadLetter"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered task, serializable as JSON (never pickle) so any worker can replay it."""

    id: str
    task_name: str
    reason: str
    policy: str = ""
    key: str = ""
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)
    attempts: int = 0
    deferrals: int = 0
    first_seen: float | None = None
    dead_at: float = 0.0
    error: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["args"] = list(self.args)
        return json.dumps(data, separators=(",", ":"), sort_keys=True, default=repr)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        data = json.loads(text)
        data["args"] = tuple(data.get("args", ()))
        return cls(**data)
