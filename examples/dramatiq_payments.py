"""Dramatiq: per-tenant quotas on a shared payments API, and webhooks that honour Retry-After.

One command runs it all against the local Redis (broker, state store: db 0)::

    python examples/dramatiq_payments.py            # upstream + 2 workers + producer, then a report
    python examples/dramatiq_payments.py --help

or piece by piece, as ``docker-compose.yml`` does::

    python examples/payments_upstream.py --port 8765
    python examples/dramatiq_payments.py worker     # as many as you like, on any host
    python examples/dramatiq_payments.py produce

The same scenario, policies and report as ``celery_payments.py`` (see ``payments_scenario.py``);
this file is the Dramatiq part. ``BROKER_URL`` may be ``redis://...`` or ``amqp://...``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import dramatiq
import payments_scenario as scenario
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from limitpal_tasks import Cooldown
from limitpal_tasks.dramatiq import LimitpalMiddleware, install

SETTINGS = scenario.parse_settings(
    sys.argv[1:] if __name__ == "__main__" else None,
    prog="dramatiq_payments.py",
    framework="Dramatiq",
    default_namespace="limitpal-payments-dramatiq",
)

broker: dramatiq.Broker
if SETTINGS.broker.startswith("amqp"):
    broker = RabbitmqBroker(url=SETTINGS.broker)
else:
    broker = RedisBroker(url=SETTINGS.broker, namespace=SETTINGS.namespace)  # type: ignore[no-untyped-call]
install(
    broker,
    LimitpalMiddleware(
        store=SETTINGS.store,
        key_prefix=SETTINGS.namespace,
        policies={"payments": scenario.PAYMENTS, "webhooks": scenario.WEBHOOKS},
        hooks=(scenario.ExampleHooks(SETTINGS.store, scenario.stats_key(SETTINGS.namespace)),),
    ),
)
dramatiq.set_broker(broker)


@dramatiq.actor(limitpal_policy="payments", queue_name=SETTINGS.namespace)
def charge(tenant_id: str, charge_id: str, amount: int) -> None:
    """Charge ``amount`` for ``tenant_id``, then tell the tenant's server."""
    scenario.call_charge(SETTINGS.upstream_url, tenant_id, charge_id, amount)
    send_webhook.send(tenant_id, scenario.event_id(charge_id))


@dramatiq.actor(limitpal_policy="webhooks", queue_name=SETTINGS.namespace)
def send_webhook(tenant_id: str, event_id: str) -> None:
    """Deliver one event to ``tenant_id``'s webhook receiver."""
    scenario.deliver_webhook(SETTINGS.upstream_url, tenant_id, event_id)


def send_charge(tenant_id: str, charge_id: str, amount: int) -> None:
    charge.send(tenant_id, charge_id, amount)


class _ExpectedNoise(logging.Filter):
    """Dramatiq logs every skipped delivery (each deferral) at WARNING and every exception a task
    raises with its traceback. Here a deferral and a ``Cooldown`` are the plan (dropped), and
    a failure the policy retries gets one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().endswith("was skipped."):
            return False
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, Cooldown):
            return False
        if isinstance(error, (scenario.PaymentsUnavailable, scenario.ReceiverError)):
            record.msg = f"{record.getMessage()} {type(error).__name__}: {error} (the policy retries it)"
            record.args = None
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def worker() -> None:
    """One Dramatiq worker (8 threads) in this process, until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dramatiq.worker.WorkerThread").addFilter(_ExpectedNoise())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    running = dramatiq.Worker(broker, worker_threads=8, worker_timeout=100)
    running.start()
    print(f"dramatiq worker {os.getpid()} ready on queue {SETTINGS.namespace}", flush=True)
    stop.wait()
    running.stop()


def main() -> int:
    if SETTINGS.command == "worker":
        worker()
        return 0
    title = "dramatiq payments example"
    if SETTINGS.command == "produce":
        return scenario.produce(SETTINGS, send_charge, title)
    return scenario.run_all(SETTINGS, Path(__file__), send_charge, title)


if __name__ == "__main__":
    sys.exit(main())
