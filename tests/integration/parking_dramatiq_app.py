"""The Dramatiq broker and actor ``test_parking.py`` runs in real workers (deferrals parked).

Spawned with ``dramatiq tests.integration.parking_dramatiq_app:broker --queues ...``
(cwd: the repository root), configured by the
:class:`~tests.integration.parking_common.WorkerConfig` in ``LIMITPAL_PARK_CONFIG``.
Records what it does through :class:`~tests.integration.parking_common.Recorder`.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage, Middleware, Retries

from limitpal_tasks.dramatiq import LimitpalMiddleware, install

from .parking_common import DRAMATIQ_ACTOR, IDLE_ACTOR, Recorder, Stall, WorkerConfig

CONFIG = WorkerConfig.from_env()
record = Recorder(CONFIG.store_url, CONFIG.prefix)
stall = Stall(CONFIG, record)


class Outcomes(Middleware):
    """Records how each delivery ended, and each message this process published (placed before Retries)."""

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        record("workers", broker_id=getattr(broker, "broker_id", None))

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        outcome = "done" if exception is None else "failed" if message.failed else "retried"
        record("outcomes", id=message.message_id, outcome=outcome)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        record("outcomes", id=message.message_id, outcome="failed" if message.failed else "deferred")

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        record("releases", id=message.message_id, queue=message.queue_name)
        stall.hit("before", message.message_id)

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        stall.hit("after", message.message_id)


def _make_broker(url: str) -> dramatiq.Broker:
    if url.startswith("amqp"):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url)
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=url)  # type: ignore[no-untyped-call]  # unannotated __init__


broker = _make_broker(CONFIG.broker_url)
broker.add_middleware(Outcomes(), before=Retries)
broker.add_middleware(CurrentMessage())
middleware = install(
    broker,
    LimitpalMiddleware.from_settings(
        {
            "limitpal_store_url": CONFIG.store_url,
            "limitpal_key_prefix": CONFIG.prefix,
            "limitpal_fail_mode": "closed",
            "limitpal_defer_transport": CONFIG.defer_transport,
            "limitpal_park_lease": CONFIG.lease,  # None: the default (30 s)
        }
    ),
)


@dramatiq.actor(
    broker=broker, queue_name=CONFIG.queue, actor_name=DRAMATIQ_ACTOR, limitpal_policy=CONFIG.policy()
)
def call(tenant: str, n: int, hold: float = 0.0) -> None:
    """Records its run, then takes ``hold`` seconds; the ``parked`` policy decides when it may run."""
    message = CurrentMessage.get_current_message()
    record("runs", id=None if message is None else message.message_id, tenant=tenant, n=n)
    time.sleep(hold)  # a slow call, when a test asks for one


@dramatiq.actor(broker=broker, queue_name=f"{CONFIG.queue}-idle", actor_name=IDLE_ACTOR)
def idle() -> None:
    """The only actor of the queue a worker that should consume nothing listens on."""
