"""The Dramatiq broker and actors the chaos tests run in real workers.

Spawned with ``dramatiq tests.chaos.chaos_dramatiq:broker --queues ...`` (cwd: the
repository root); configured by the ``LPC_*`` environment variables of
:mod:`chaos_common`. One actor per policy, ``chaos_<kind>(job, tenant)``, without retries
of its own (a failure is final and visible). Importing this module connects to nothing.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage, Middleware, Retries

from limitpal_tasks.dramatiq import LimitpalMiddleware, install
from limitpal_tasks.stores.redis import RedisStore

from .chaos_common import (
    BROKER_URL,
    HEARTBEAT_MS,
    KINDS,
    POLICIES,
    PREFIX,
    QUEUE,
    STORE_TIMEOUT,
    STORE_URL,
    RecordingHooks,
    body,
    dramatiq_actor_name,
    record,
)


class Failures(Middleware):
    """Records every message that failed for good (placed before Retries: its hooks run last)."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is not None and message.failed:
            job = str(message.args[0]) if message.args else "?"
            record(
                "failures",
                fw="dramatiq",
                job=job,
                exc_type=type(exception).__name__,
                error=str(exception)[:500],
            )


def _make_broker() -> dramatiq.Broker:
    if BROKER_URL.startswith("amqp"):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=BROKER_URL)
    from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker

    # Maintenance (requeueing a dead worker's messages) on every command, and a short
    # heartbeat timeout: a killed worker's messages come back within seconds.
    return RedisBroker(  # type: ignore[no-untyped-call]  # unannotated __init__
        url=BROKER_URL, heartbeat_timeout=HEARTBEAT_MS, maintenance_chance=MAINTENANCE_SCALE
    )


broker = _make_broker()
broker.add_middleware(Failures(), before=Retries)
broker.add_middleware(CurrentMessage())
middleware = install(
    broker,
    LimitpalMiddleware(
        store=RedisStore.from_url(STORE_URL, prefix=PREFIX, store_timeout=STORE_TIMEOUT),
        policies=POLICIES,
        hooks=(RecordingHooks("dramatiq"),),
    ),
)


def _actor(kind: str) -> Any:
    def run(job: str, tenant: str) -> str:
        message = CurrentMessage.get_current_message()
        header = None if message is None else message.options.get("limitpal")
        return body("dramatiq", kind, job, tenant, header)

    run.__name__ = run.__qualname__ = f"chaos_{kind}"
    decorator = dramatiq.actor(
        broker=broker,
        queue_name=QUEUE,
        actor_name=dramatiq_actor_name(kind),
        limitpal_policy=kind,
        max_retries=0,
    )
    return decorator(run)


actors = {kind: _actor(kind) for kind in KINDS}
