"""The Dramatiq broker and actors that the integration tests run in real workers.

Spawned with ``dramatiq tests.integration.dramatiq_actors:broker --queues ...`` (cwd: the
repository root); each test points its workers at its own broker, queue and key prefix
through environment variables, so no state leaks from one test into another:

- ``LIMITPAL_TEST_BROKER``: ``redis://...`` (a ``RedisBroker``) or ``amqp://...`` (a
  ``RabbitmqBroker``);
- ``LIMITPAL_TEST_STORE``: ``limitpal_store_url`` (also where actors record what they saw);
- ``LIMITPAL_TEST_PREFIX``: ``limitpal_key_prefix``, and the prefix of every recording key;
- ``LIMITPAL_TEST_QUEUE``: the queue of every actor.

The middleware is built with :meth:`LimitpalMiddleware.from_settings` (the settings the
Celery side reads) and placed by :func:`install`. Actors record each execution of their
body (``runs``, with the ``retries`` and ``limitpal`` options of the message they run,
read through ``CurrentMessage``); :class:`Recorder`, a middleware ahead of ours, records
every delivery a worker processed (``deliveries``), how each ended (``outcomes``:
``done``, ``retried``, ``failed``, ``deferred``, ``dead``) and every worker process
(``workers``), all as JSON lines in Redis lists under ``{prefix}:rec:``.

Importing this module connects to nothing and leaves Dramatiq's global broker alone (every
actor names :data:`broker`), so the tests import it for its names and policies.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import CurrentMessage, Middleware, Retries

from limitpal_tasks import Policy, RateLimit, RetryPolicy
from limitpal_tasks.dramatiq import Cooldown, LimitpalMiddleware, install

BROKER_URL = os.environ.get("LIMITPAL_TEST_BROKER", "redis://127.0.0.1:6379/4")
STORE_URL = os.environ.get("LIMITPAL_TEST_STORE", "redis://127.0.0.1:6379/6")
PREFIX = os.environ.get("LIMITPAL_TEST_PREFIX", "limitpal-dq")
QUEUE = os.environ.get("LIMITPAL_TEST_QUEUE", "limitpal-dq")

TENANT_ACTOR = "limitpal_it_tenant_call"
UPSTREAM_ACTOR = "limitpal_it_upstream_call"
STRICT_ACTOR = "limitpal_it_strict_call"
PARTNER_ACTOR = "limitpal_it_partner_call"
DOOMED_ACTOR = "limitpal_it_doomed_call"
PLAIN_ACTOR = "limitpal_it_plain_call"

TENANT_RATE = 5.0
"""Executions per second and tenant of :data:`TENANT_ACTOR` (a ``Policy`` object in code)."""
DOOMED_ATTEMPTS = 3
"""``RetryPolicy.max_attempts`` of :data:`DOOMED_ACTOR`, which fails every time."""
SETTINGS_RATE = 2.0
"""Executions per second and tenant of the ``settings_only`` policy (:data:`PLAIN_ACTOR`)."""

POLICIES: dict[str, dict[str, Any]] = {
    "upstream": {
        "key": "service:{service}",
        "breaker": {"minimum_calls": 20, "window": 20, "open_for": 1.0},
        "retry": {"max_attempts": 3, "backoff": 0.2, "backoff_max": 0.2, "jitter": "none"},
        "defer": {"open_spread": 0.2},
    },
    "strict": {
        "key": "service:{service}",
        "breaker": {"open_for": 0.5},
        "defer": {"max_deferrals": 2, "open_spread": 0.1},
    },
    "partner": {"key": "partner:{partner}", "defer": {"jitter": 0.05}},
    "settings_only": {"key": "tenant:{tenant_id}", "rate": f"{SETTINGS_RATE:g}/s"},
}
"""``limitpal_policies``: plain data in ``Policy.from_dict`` format, as settings hold it."""

SETTINGS: dict[str, Any] = {
    "limitpal_store_url": STORE_URL,
    "limitpal_key_prefix": PREFIX,
    "limitpal_policies": POLICIES,
    "limitpal_task_policies": {PLAIN_ACTOR: "settings_only"},  # as Celery's settings attach them
    "limitpal_fail_mode": "closed",  # a broken store must show up as stuck messages, not pass silently
}


def record_key(kind: str, prefix: str) -> str:
    """The Redis list of records of ``kind``: ``runs``, ``deliveries``, ``outcomes``, ``workers``, ..."""
    return f"{prefix}:rec:{kind}"


def health_key(service: str, prefix: str) -> str:
    """The Redis key saying whether ``service`` is ``"up"`` (the default), ``"down"`` or ``"flaky"``."""
    return f"{prefix}:health:{service}"


def make_broker(url: str, middleware: list[Middleware] | None = None) -> dramatiq.Broker:
    """A ``RabbitmqBroker`` for an ``amqp://`` URL, else a ``RedisBroker`` (no connection yet)."""
    if url.startswith("amqp"):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url, middleware=middleware)
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=url, middleware=middleware)  # type: ignore[no-untyped-call]  # unannotated __init__


# -- recording ------------------------------------------------------------------

_clients: dict[int, redis.Redis] = {}
_clients_lock = threading.Lock()


def _redis() -> redis.Redis:
    """A Redis client for this process (forked worker processes must not share sockets)."""
    pid = os.getpid()
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            client = _clients[pid] = redis.Redis.from_url(STORE_URL)
    return client


def _record(kind: str, **data: Any) -> None:
    _redis().rpush(record_key(kind, PREFIX), json.dumps(data, default=repr))


def _record_run(**data: Any) -> None:
    message = CurrentMessage.get_current_message()
    assert message is not None, "CurrentMessage is not installed"
    _record(
        "runs",
        actor=message.actor_name,
        id=message.message_id,
        t=time.time(),
        retries=message.options.get("retries", 0),
        header=message.options.get("limitpal"),
        **data,
    )


class Recorder(Middleware):
    """Records deliveries and how they ended; placed before ``Retries``, so before ours too.

    Its ``before_process_message`` runs ahead of the limitpal middleware (which may skip
    the message), and its ``after_*`` hooks run last (reverse order), once ``Retries``
    decided whether a failed message is retried or failed.
    """

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        _record("workers", pid=os.getpid(), broker_id=getattr(broker, "broker_id", None), t=time.time())

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        _record(
            "deliveries",
            actor=message.actor_name,
            id=message.message_id,
            retries=message.options.get("retries", 0),
            header=message.options.get("limitpal"),
            pid=os.getpid(),
            t=time.time(),
        )

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        outcome = "done" if exception is None else "failed" if message.failed else "retried"
        _record(
            "outcomes",
            actor=message.actor_name,
            id=message.message_id,
            outcome=outcome,
            exc_type=None if exception is None else type(exception).__name__,
            t=time.time(),
        )

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        _record(
            "outcomes",
            actor=message.actor_name,
            id=message.message_id,
            outcome="dead" if message.failed else "deferred",
            exc_type=None,
            t=time.time(),
        )


broker = make_broker(BROKER_URL)
broker.add_middleware(Recorder(), before=Retries)
broker.add_middleware(CurrentMessage())
middleware = install(broker, LimitpalMiddleware.from_settings(SETTINGS))


# -- actors ---------------------------------------------------------------------


@dramatiq.actor(
    broker=broker,
    queue_name=QUEUE,
    actor_name=TENANT_ACTOR,
    limitpal_policy=Policy("tenant_rate", rate=RateLimit(f"{TENANT_RATE:g}/s")),
    limitpal_key="tenant:{tenant_id}",
)
def tenant_call(tenant_id: str, n: int) -> None:
    """A per-tenant rate-limited call (a ``Policy`` object and a ``limitpal_key`` override)."""
    _record_run(tenant_id=tenant_id, n=n)


@dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name=UPSTREAM_ACTOR, limitpal_policy="upstream")
def upstream_call(service: str, n: int) -> None:
    """A call to an upstream whose health is read from Redis (a policy from the settings, by name).

    Health ``"down"`` fails every attempt; ``"flaky"`` fails the first attempt only.
    """
    _record_run(service=service, n=n)
    health = _redis().get(health_key(service, PREFIX))
    message = CurrentMessage.get_current_message()
    retries = 0 if message is None else int(message.options.get("retries", 0))
    if health == b"down" or (health == b"flaky" and retries == 0):
        raise ConnectionError(f"upstream {service} is down")


@dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name=STRICT_ACTOR, limitpal_policy="strict")
def strict_call(service: str, n: int) -> None:
    """A call under a policy that allows only two deferrals."""
    _record_run(service=service, n=n)


@dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name=PARTNER_ACTOR, limitpal_policy="partner")
def partner_call(partner: str, n: int, retry_after: float) -> None:
    """Raises ``Cooldown(retry_after)`` the first time any message calls ``partner``; runs after."""
    if _redis().set(f"{PREFIX}:cooldown:{partner}", "1", nx=True):
        message = CurrentMessage.get_current_message()
        _record(
            "cooldowns",
            partner=partner,
            id=None if message is None else message.message_id,
            t=time.time(),
            retry_after=retry_after,
        )
        raise Cooldown(retry_after=retry_after)
    _record_run(partner=partner, n=n)


@dramatiq.actor(
    broker=broker,
    queue_name=QUEUE,
    actor_name=DOOMED_ACTOR,
    limitpal_policy=Policy(
        "doomed",
        key="job:{job}",
        retry=RetryPolicy(max_attempts=DOOMED_ATTEMPTS, backoff=0.1, backoff_max=0.1, jitter="none"),
    ),
)
def doomed_call(job: str) -> None:
    """Fails every time: ``Retries`` follows the policy's attempts and backoff, then gives up."""
    _record_run(job=job)
    raise RuntimeError(f"job {job} always fails")


@dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name=PLAIN_ACTOR)
def plain_call(tenant_id: str, n: int) -> None:
    """An actor declared without limitpal options: only ``limitpal_task_policies`` protects it."""
    _record_run(tenant_id=tenant_id, n=n)
