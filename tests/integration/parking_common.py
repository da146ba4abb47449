"""What the parking worker apps and ``test_parking.py`` share: configuration and records.

Free of Celery and Dramatiq on purpose: the test process imports this module, never the
worker apps (``parking_celery_app``, ``parking_dramatiq_app``).

A test describes its workers with a :class:`WorkerConfig`, passed to each spawned worker
as JSON in the ``LIMITPAL_PARK_CONFIG`` environment variable. Workers record what they
did as JSON lines in Redis lists ``{prefix}:rec:<kind>`` on the store's server:

- ``runs``: each execution of the task body (``id``, ``tenant``, ``n``, ``t``, ``pid``);
- ``outcomes``: how each delivery ended: ``deferred`` (parked), ``done`` or ``failed``;
- ``releases``: each message a worker published (only its releaser publishes), in order;
- ``stalls``: a releaser stopped on purpose in the middle of a batch (see ``stall_at``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis

from limitpal_tasks import Breaker, DeferPolicy, Policy, RateLimit

CELERY_TASK = "limitpal_park.call"
DRAMATIQ_ACTOR = "limitpal_park_call"
IDLE_ACTOR = "limitpal_park_idle"
POLICY_KEY = "tenant:{tenant}"
ENV = "LIMITPAL_PARK_CONFIG"
STALL_FOR = 300.0
"""How long a stalled releaser waits (it is SIGKILLed long before)."""


def tenant_key(tenant: str) -> str:
    """The key the policy gives a task of ``tenant`` (its breaker, rate limit and park pacing)."""
    return POLICY_KEY.format(tenant=tenant)


def record_key(prefix: str, kind: str) -> str:
    return f"{prefix}:rec:{kind}"


@dataclass(frozen=True)
class WorkerConfig:
    """One spawned worker's broker, queue, store, policy and test hooks.

    ``transport_in`` says where ``park`` is chosen: the policy's ``DeferPolicy(transport=)``
    or the worker setting ``limitpal_defer_transport``. ``lease`` is ``limitpal_park_lease``,
    the releaser's claim (``None``: the default, 30 s). ``stall_at`` > 0 stops this worker's
    releaser for good at its ``stall_at``-th publish, ``before`` or ``after`` the broker
    took the message (that is, before the entry is confirmed either way).
    """

    broker_url: str
    store_url: str
    prefix: str
    queue: str
    open_for: float = 60.0
    open_spread: float = 0.0
    rate: str | None = None
    park_limit: int = 10_000
    transport_in: Literal["policy", "setting"] = "policy"
    lease: float | None = None
    stall_at: int = 0
    stall_when: Literal["before", "after"] = "before"

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerConfig:
        env = os.environ if environ is None else environ
        raw = env.get(ENV)
        if raw is None:  # imported outside a spawned worker (e.g. by a linter): harmless defaults
            return cls("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3", "lpk-none", "lpk-none")
        return cls(**json.loads(raw))

    def policy(self) -> Policy:
        """The ``parked`` policy: a breaker (forced open by the tests), an optional rate, parking."""
        return Policy(
            "parked",
            key=POLICY_KEY,
            breaker=Breaker(minimum_calls=100, window=100, open_for=self.open_for),
            rate=RateLimit(self.rate) if self.rate else None,
            defer=DeferPolicy(
                transport="park" if self.transport_in == "policy" else None,
                park_limit=self.park_limit,
                open_spread=self.open_spread,
                jitter=0.0,
            ),
            fail_mode="closed",
        )

    @property
    def defer_transport(self) -> Literal["broker", "park"]:
        """The worker setting ``limitpal_defer_transport``."""
        return "park" if self.transport_in == "setting" else "broker"


class Recorder:
    """Appends JSON records to ``{prefix}:rec:<kind>``; one Redis client per process (forks)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._clients: dict[int, redis.Redis] = {}
        self._lock = threading.Lock()

    def client(self) -> redis.Redis:
        pid = os.getpid()
        with self._lock:
            found = self._clients.get(pid)
            if found is None:
                found = self._clients[pid] = redis.Redis.from_url(self.url)
        return found

    def __call__(self, kind: str, **data: Any) -> None:
        data.setdefault("t", time.time())
        data.setdefault("pid", os.getpid())
        self.client().rpush(record_key(self.prefix, kind), json.dumps(data, default=repr))


class Stall:
    """Stops the calling thread for good at the ``at``-th call of :meth:`hit` in ``phase``.

    Installed in a releaser's publish path (``before``: the message is not sent yet;
    ``after``: the broker has it, the entry is not confirmed yet). The stall is recorded
    first, so a test can wait for it and then SIGKILL the worker.
    """

    def __init__(self, config: WorkerConfig, record: Recorder) -> None:
        self.at = config.stall_at
        self.when = config.stall_when
        self.record = record
        self.seen = 0
        self._lock = threading.Lock()

    def hit(self, phase: Literal["before", "after"], message_id: str) -> None:
        if self.at <= 0 or phase != self.when:
            return
        with self._lock:
            self.seen += 1
            stop = self.seen == self.at
        if stop:
            self.record("stalls", id=message_id, phase=phase, seen=self.seen)
            threading.Event().wait(STALL_FOR)
