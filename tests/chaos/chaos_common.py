"""What the chaos worker apps (``chaos_celery``, ``chaos_dramatiq``) and the tests share.

Free of Celery and Dramatiq imports: the test process imports it for the policies and the
record names. Worker processes are configured through environment variables, so every
test points its workers at its own servers:

- ``LPC_BROKER``: the broker (``redis://...`` or ``amqp://...``), one of the test's servers;
- ``LPC_STORE``: the limitpal store (``redis://...``), one of the test's servers;
- ``LPC_RECORDER``: a Redis server that is never disturbed, where workers write what they
  saw (so a record survives the fault being injected on the store or the broker);
- ``LPC_PREFIX``: the key prefix of the store and of the records; ``LPC_QUEUE``: the queue;
- ``LPC_STORE_TIMEOUT``: ``store_timeout`` in seconds;
- ``LPC_VISIBILITY``: the Celery Redis transport's visibility timeout in seconds;
- ``LPC_HEARTBEAT_MS``: the Dramatiq Redis broker's heartbeat timeout.

Every task and actor takes ``(job, tenant)``: ``job`` is unique per enqueued message and is
what the records count. Records are JSON lines in Redis lists ``{prefix}:rec:{kind}``:

- ``starts``/``runs``: a task body began / finished (``fallback``: it was admitted by the
  per-process fallback store, not the shared one; ``admitted_at``: the store's clock at the
  admission, immune to a worker's scheduling delays; ``header``: the ``limitpal`` header it
  ran with);
- ``holding``: a body is holding its slots until the test releases it (or kills the worker);
- ``defers``/``deads``/``store_errors``/``store_calls``: the pipeline's hooks (``on_defer``,
  ``on_dead_letter``, ``on_store_error`` with the error's text, ``on_store_call`` with each
  call's latency);
- ``failures``: a task failed (Celery ``task_failure``, a Dramatiq message failed).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from limitpal_tasks import Admitted, DeadLetter, Decision, Deferred, Hooks, TaskContext
from limitpal_tasks.core.events import StoreOperation

BROKER_URL = os.environ.get("LPC_BROKER", "redis://127.0.0.1:7100/0")
STORE_URL = os.environ.get("LPC_STORE", "redis://127.0.0.1:7101/0")
RECORDER_URL = os.environ.get("LPC_RECORDER", "redis://127.0.0.1:7102/0")
PREFIX = os.environ.get("LPC_PREFIX", "lpc")
QUEUE = os.environ.get("LPC_QUEUE", "lpc")
STORE_TIMEOUT = float(os.environ.get("LPC_STORE_TIMEOUT", "0.25"))
VISIBILITY_TIMEOUT = float(os.environ.get("LPC_VISIBILITY", "30"))
HEARTBEAT_MS = int(os.environ.get("LPC_HEARTBEAT_MS", "15000"))

MAX_DELAY = 3.0
"""``defer.max_delay`` of every policy: one hop stays well under the visibility timeout."""
PROBE_LEASE = 3.0
"""``lease`` of the ``probe`` policy: how long a killed worker's slots stay taken."""
PACED_RATE = 4.0
"""Executions per second and tenant of the ``paced`` policy."""
GUARDED_RATE = 5.0
"""Executions per second and tenant of the ``guarded`` policy."""

POLICIES: dict[str, dict[str, Any]] = {
    # A breaker that never trips and a generous rate: every admission is a store round trip.
    "open": {
        "key": "tenant:{tenant}",
        "breaker": {"minimum_calls": 1000, "window": 1000},
        "rate": {"rate": "1000/s", "burst": 100},
        "defer": {"max_delay": MAX_DELAY},
        "fail_mode": "open",
    },
    "closed": {
        "key": "tenant:{tenant}",
        "breaker": {"minimum_calls": 1000, "window": 1000},
        "rate": {"rate": "1000/s", "burst": 100},
        "defer": {"max_delay": MAX_DELAY},
        "fail_mode": "closed",
    },
    # One probe at a time once half-open, one execution at a time, short leases.
    "probe": {
        "key": "svc:{tenant}",
        "breaker": {
            "failure_rate_threshold": 50,
            "minimum_calls": 2,
            "window": 2,
            "open_for": 1.0,
            "half_open_probes": 1,
            "busy_delay": 0.5,
        },
        "bulkhead": {"max_concurrent": 1, "retry_delay": 0.5},
        "lease": PROBE_LEASE,
        "defer": {"max_delay": MAX_DELAY, "open_spread": 0.2},
        "fail_mode": "closed",
    },
    # A backlog drains through deferrals: most messages wait in the broker at any time.
    "paced": {
        "key": "pace:{tenant}",
        "rate": f"{PACED_RATE:g}/s",
        "defer": {"max_delay": MAX_DELAY},
        "fail_mode": "closed",
    },
    # Bounded deferrals and deadline: what forged headers try to get around.
    "guarded": {
        "key": "hdr:{tenant}",
        "rate": f"{GUARDED_RATE:g}/s",
        "defer": {"max_deferrals": 5, "deadline": 60, "max_delay": MAX_DELAY},
        "fail_mode": "closed",
    },
}
"""``limitpal_policies`` of both worker apps (``Policy.from_dict`` format)."""

KINDS = tuple(POLICIES)
"""One task (Celery ``chaos.<kind>``) and one actor (Dramatiq ``chaos_<kind>``) per policy."""


def celery_task_name(kind: str) -> str:
    return f"chaos.{kind}"


def dramatiq_actor_name(kind: str) -> str:
    return f"chaos_{kind}"


def record_key(prefix: str, kind: str) -> str:
    """The Redis list holding the records of ``kind``."""
    return f"{prefix}:rec:{kind}"


def hold_key(prefix: str) -> str:
    """The Redis set of jobs whose body holds its slots until released."""
    return f"{prefix}:hold"


def release_key(prefix: str, job: str) -> str:
    """Set by the test to let a held body finish."""
    return f"{prefix}:release:{job}"


# -- recording (worker side) -----------------------------------------------------------

_clients: dict[int, redis.Redis] = {}
_clients_lock = threading.Lock()
_local = threading.local()


def recorder() -> redis.Redis:
    """This process's client of the recorder (forked worker processes must not share sockets)."""
    pid = os.getpid()
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            client = _clients[pid] = redis.Redis.from_url(RECORDER_URL, socket_timeout=5)
    return client


def record(what: str, **data: Any) -> None:
    recorder().rpush(record_key(PREFIX, what), json.dumps({"pid": os.getpid(), "t": time.time(), **data}))


def _job_of(context: TaskContext) -> str:
    if context.args:
        return str(context.args[0])
    return str(context.kwargs.get("job", "?"))


class RecordingHooks(Hooks):
    """Records deferrals, dead letters and store errors, and keeps each thread's last decision.

    The decision is read back by the task body, which runs on the same thread right after
    it was admitted, to tell a run on the fallback store from one on the shared store.
    """

    def __init__(self, framework: str) -> None:
        self.framework = framework

    def on_decision(self, policy: str, decision: Decision) -> None:
        _local.decision = decision

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        record(
            "defers",
            fw=self.framework,
            kind=policy,
            job=_job_of(context),
            reason=decision.reason,
            delay=decision.delay,
            deferrals=decision.deferrals,
            exhausted=decision.exhausted,
        )

    def on_dead_letter(self, letter: DeadLetter) -> None:
        job = str(letter.args[0]) if letter.args else str(letter.kwargs.get("job", "?"))
        record("deads", fw=self.framework, kind=letter.policy, job=job, reason=letter.reason)

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        recorder().incr(record_key(PREFIX, f"store_errors:{self.framework}:{fallback}"))
        record("store_errors", fw=self.framework, kind=policy, error=str(error)[:200])

    def on_store_call(self, operation: StoreOperation, seconds: float, ok: bool) -> None:
        record("store_calls", fw=self.framework, op=operation, seconds=seconds, ok=ok)


def body(framework: str, kind: str, job: str, tenant: str, header: object) -> str:
    """The body of every chaos task: record the start, hold if asked, record the run."""
    decision = getattr(_local, "decision", None)
    _local.decision = None
    fallback = decision.ticket.fallback if isinstance(decision, Admitted) else None
    admitted_at = decision.ticket.admitted_at if isinstance(decision, Admitted) else None
    record("starts", fw=framework, kind=kind, job=job, admitted_at=admitted_at)
    client = recorder()
    if client.sismember(hold_key(PREFIX), job) and not client.exists(release_key(PREFIX, job)):
        record("holding", fw=framework, kind=kind, job=job)
        while not client.exists(release_key(PREFIX, job)):  # until released, or killed
            time.sleep(0.02)
    record(
        "runs",
        fw=framework,
        kind=kind,
        job=job,
        tenant=tenant,
        fallback=fallback,
        admitted_at=admitted_at,
        header=header if isinstance(header, Mapping) else None if header is None else repr(header),
    )
    return job
