"""Parked deferrals: a deferred task kept in the store until it is due, instead of in the broker.

A parked entry holds everything needed to publish the task again exactly as it was
(JSON only: the integration's own serialized bytes are carried as base64 inside it).
The store keeps entries ordered by due time, hands each due entry to exactly one
releaser under a claim that expires (an entry whose releaser died is released again),
and paces each key's releases at ``interval`` so a recovering upstream sees a ramp.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ParkSummary", "ParkedEntry"]


@dataclass(frozen=True, slots=True)
class ParkedEntry:
    """One parked task.

    ``park`` names the park it waits in (one per integration and broker: the releasers
    of that park can publish it), ``key`` the key its releases are paced on (the
    policy's rate-limit key, else its key), ``interval`` the seconds between two releases
    of that key (``0``: unpaced), ``delay`` how long it waits from parking, ``payload``
    what the integration needs to publish it again. ``id`` and ``due`` are set by the
    store (the id orders entries due together).
    """

    park: str
    task_name: str
    policy: str
    key: str
    delay: float
    interval: float
    payload: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    due: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ParkedEntry:
        return cls(**json.loads(text))


@dataclass(frozen=True, slots=True)
class ParkSummary:
    """What is parked under one key: how many, and when the next one is due (store time)."""

    key: str
    count: int
    next_due: float | None
