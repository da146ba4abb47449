"""The Celery app that the integration tests run in real workers.

Spawned with ``celery -A tests.integration.celery_tasks worker ...`` (cwd: the repository
root); each test points its worker at its own broker, queue and key prefix through
environment variables, so no state leaks from one test into another:

- ``LIMITPAL_TEST_BROKER`` / ``LIMITPAL_TEST_BACKEND``: Celery's broker and result backend;
- ``LIMITPAL_TEST_STORE``: ``limitpal_store_url`` (also where tasks record what they saw);
- ``LIMITPAL_TEST_PREFIX``: ``limitpal_key_prefix``, and the prefix of every recording key;
- ``LIMITPAL_TEST_QUEUE``: the default queue (re-published and chained tasks land there);
- ``LIMITPAL_TEST_POLICY_OVERRIDES``: JSON merged over :data:`POLICIES` (bad-settings tests).

Tasks record each execution of their body (``runs``), every delivery the worker handled
(``events``, from ``task_prerun``/``task_postrun``; a deferral shows as a postrun in
state ``IGNORED``) and every ``task_failure`` signal (``failures``) as JSON lines in
Redis lists under ``{prefix}:rec:``. Task names, policies and key names live in
``celery_config``, which the tests import instead of this module.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
from celery import Celery, signals

from limitpal_tasks import Policy, RateLimit
from limitpal_tasks.celery import Cooldown, ResilientTask, install, resilient_task

from .celery_config import (
    COLLECT_TASK,
    LATE_TASK,
    PARTNER_TASK,
    PLAIN_TASK,
    POLICIES,
    SQUARE_TASK,
    STEP_TASK,
    STRICT_TASK,
    TASK_POLICIES,
    TENANT_RATE,
    TENANT_TASK,
    UPSTREAM_TASK,
    health_key,
    record_key,
)

BROKER_URL = os.environ.get("LIMITPAL_TEST_BROKER", "redis://127.0.0.1:6379/4")
BACKEND_URL = os.environ.get("LIMITPAL_TEST_BACKEND", "redis://127.0.0.1:6379/5")
STORE_URL = os.environ.get("LIMITPAL_TEST_STORE", "redis://127.0.0.1:6379/6")
PREFIX = os.environ.get("LIMITPAL_TEST_PREFIX", "limitpal-it")
QUEUE = os.environ.get("LIMITPAL_TEST_QUEUE", "limitpal-it")


def _policies() -> dict[str, Any]:
    overrides: Mapping[str, Any] = json.loads(os.environ.get("LIMITPAL_TEST_POLICY_OVERRIDES") or "{}")
    return {**POLICIES, **overrides}


app = Celery("limitpal_it")
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=BACKEND_URL,
    result_expires=3600,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    limitpal_store_url=STORE_URL,
    limitpal_key_prefix=PREFIX,
    limitpal_policies=_policies(),
    limitpal_task_policies=TASK_POLICIES,
    limitpal_fail_mode="closed",  # a broken store must show up as stuck tasks, not pass silently
)
install(app)


# -- recording ------------------------------------------------------------------

_clients: dict[int, redis.Redis] = {}
_clients_lock = threading.Lock()


def _redis() -> redis.Redis:
    """A Redis client for this process (prefork children must not share the parent's sockets)."""
    pid = os.getpid()
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            client = _clients[pid] = redis.Redis.from_url(STORE_URL)
    return client


def _record(kind: str, **data: Any) -> None:
    _redis().rpush(record_key(kind, PREFIX), json.dumps(data, default=repr))


def _deferral_header(request: Any) -> Any:
    """The ``limitpal`` header of a delivery (Celery exposes custom headers as request attributes)."""
    return getattr(request, "limitpal", None) or (getattr(request, "headers", None) or {}).get("limitpal")


def _record_run(task: Any, **data: Any) -> None:
    request = task.request
    _record(
        "runs",
        task=task.name,
        id=request.id,
        t=time.time(),
        retries=request.retries,
        header=_deferral_header(request),
        **data,
    )


def _ours(task: Any) -> bool:
    """Whether ``task`` belongs to this app (signals are process-wide)."""
    return getattr(task, "app", None) is app


def _on_prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
    if not _ours(task):
        return
    request = task.request
    _record(
        "events",
        phase="prerun",
        id=task_id,
        task=task.name,
        retries=request.retries,
        header=_deferral_header(request),
        t=time.time(),
    )


def _on_postrun(task_id: str = "", task: Any = None, state: str | None = None, **_: Any) -> None:
    if not _ours(task):
        return
    _record("events", phase="postrun", id=task_id, task=task.name, state=state, t=time.time())


def _on_failure(
    sender: Any = None, task_id: str = "", exception: BaseException | None = None, **_: Any
) -> None:
    if not _ours(sender):
        return
    _record("failures", id=task_id, exc_type=type(exception).__name__, error=str(exception), t=time.time())


def _keep_the_event_loop_awake(sender: Any = None, **_: Any) -> None:
    # Without gossip, mingle and heartbeat no timer is due, so the worker's event loop polls
    # for up to 10 s, and a SIGTERM does not cut that poll short: a warm shutdown on
    # RabbitMQ would take ~10 s. A no-op timer makes the loop look at its flags often.
    timer = getattr(sender, "timer", None)
    if getattr(sender, "app", None) is app and timer is not None:
        timer.call_repeatedly(0.2, _nothing)


def _nothing() -> None:
    """A timer callback that does nothing."""


signals.worker_ready.connect(_keep_the_event_loop_awake, weak=False)
signals.task_prerun.connect(_on_prerun, weak=False)
signals.task_postrun.connect(_on_postrun, weak=False)
signals.task_failure.connect(_on_failure, weak=False)


def _task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``app.task(**options)`` with a type, for mypy (celery ships none)."""
    decorator: Callable[[Callable[..., Any]], Any] = app.task(**options)
    return decorator


# -- tasks ----------------------------------------------------------------------


@resilient_task(
    policy=Policy("tenant_rate", rate=RateLimit(f"{TENANT_RATE:g}/s")),
    key="tenant:{tenant_id}",
    app=app,
    name=TENANT_TASK,
    bind=True,
)
def tenant_call(self: Any, tenant_id: str, n: int) -> int:
    """A per-tenant rate-limited call (a ``Policy`` object and a ``key`` override)."""
    _record_run(self, tenant_id=tenant_id, n=n)
    return n


@resilient_task(policy="upstream", name=UPSTREAM_TASK, bind=True)
def upstream_call(self: Any, service: str, n: int) -> int:
    """A call to an upstream whose health is read from Redis (a shared task, policy by name).

    Health ``"down"`` fails every attempt; ``"flaky"`` fails the first attempt only.
    """
    _record_run(self, service=service, n=n)
    health = _redis().get(health_key(service, PREFIX))
    if health == b"down" or (health == b"flaky" and self.request.retries == 0):
        raise ConnectionError(f"upstream {service} is down")
    return n * 2


@resilient_task(policy="strict", name=STRICT_TASK, bind=True)
def strict_call(self: Any, service: str, n: int) -> int:
    """A call under a policy that allows only two deferrals."""
    _record_run(self, service=service, n=n)
    return n


@_task(base=ResilientTask, policy="partner", name=PARTNER_TASK, bind=True)
def partner_call(self: Any, partner: str, n: int, retry_after: float) -> int:
    """Raises ``Cooldown(retry_after)`` the first time any task calls ``partner``; returns ``n`` after."""
    if _redis().set(f"{PREFIX}:cooldown:{partner}", "1", nx=True):
        _record("cooldowns", partner=partner, id=self.request.id, t=time.time(), retry_after=retry_after)
        raise Cooldown(retry_after=retry_after)
    _record_run(self, partner=partner, n=n)
    return n


@resilient_task(policy="pipeline", app=app, name=STEP_TASK, bind=True)
def step(self: Any, acc: int, tenant_id: str, digit: int) -> int:
    """One rate-limited link of a chain: appends ``digit`` to ``acc``."""
    _record_run(self, tenant_id=tenant_id, acc=acc, digit=digit)
    return acc * 10 + digit


@_task(base=ResilientTask, policy="pipeline", name=SQUARE_TASK, bind=True)
def square(self: Any, x: int, tenant_id: str) -> int:
    """A rate-limited chord header task (``base=ResilientTask``)."""
    _record_run(self, tenant_id=tenant_id, x=x)
    return x * x


@_task(name=COLLECT_TASK, bind=True)
def collect(self: Any, results: list[int]) -> list[int]:
    """A chord callback without a policy."""
    _record_run(self, results=results)
    return sorted(results)


@_task(name=PLAIN_TASK, bind=True)
def plain_sync(self: Any, tenant_id: str, n: int) -> int:
    """An undecorated task: only ``limitpal_task_policies`` protects it."""
    _record_run(self, tenant_id=tenant_id, n=n)
    return n


@resilient_task(policy="pipeline", key="late:{tenant_id}", app=app, name=LATE_TASK, bind=True, acks_late=True)
def late_call(self: Any, tenant_id: str, n: int) -> int:
    """A rate-limited task acknowledged only after it ran (``acks_late=True``)."""
    _record_run(self, tenant_id=tenant_id, n=n)
    return n
