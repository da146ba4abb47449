"""Celery: per-tenant quotas on a shared payments API, and webhooks that honour Retry-After.

One command runs it all against the local Redis (broker, state store: db 0)::

    python examples/celery_payments.py            # upstream + 2 workers + producer, then a report
    python examples/celery_payments.py --help

or piece by piece, as ``docker-compose.yml`` does::

    python examples/payments_upstream.py --port 8765
    python examples/celery_payments.py worker     # as many as you like, on any host
    python examples/celery_payments.py produce

What to look for in the report: the flooding tenant ("acme") waits for its own quota while
the others' charges go straight through; during the API's outage the breaker opens for
every worker at once and tasks are deferred, not failed; each receiver's ``Retry-After``
pauses only that receiver; nothing is lost (every charge applied exactly once).

The policies and task bodies are in ``payments_scenario.py``; this file is the Celery part.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import payments_scenario as scenario
from celery import Celery

from limitpal_tasks.celery import resilient_task

SETTINGS = scenario.parse_settings(
    sys.argv[1:] if __name__ == "__main__" else None,
    prog="celery_payments.py",
    framework="Celery",
    default_namespace="limitpal-payments-celery",
)

app = Celery("celery_payments")
app.conf.update(
    broker_url=SETTINGS.broker,
    # Every key of this example in Redis starts with the namespace (redis brokers only).
    broker_transport_options={"global_keyprefix": f"{SETTINGS.namespace}:"},
    broker_connection_retry_on_startup=True,
    task_default_queue=SETTINGS.namespace,
    task_ignore_result=True,
    task_acks_late=True,  # a deferral's re-publish survives a broker hiccup
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    limitpal_store_url=SETTINGS.store,
    limitpal_key_prefix=SETTINGS.namespace,
    limitpal_hooks=[scenario.ExampleHooks(SETTINGS.store, scenario.stats_key(SETTINGS.namespace))],
)


@resilient_task(app=app, policy=scenario.PAYMENTS, name="payments.charge")
def charge(tenant_id: str, charge_id: str, amount: int) -> None:
    """Charge ``amount`` for ``tenant_id``, then tell the tenant's server."""
    scenario.call_charge(SETTINGS.upstream_url, tenant_id, charge_id, amount)
    send_webhook.delay(tenant_id, scenario.event_id(charge_id))


@resilient_task(app=app, policy=scenario.WEBHOOKS, name="payments.send_webhook")
def send_webhook(tenant_id: str, event_id: str) -> None:
    """Deliver one event to ``tenant_id``'s webhook receiver."""
    scenario.deliver_webhook(SETTINGS.upstream_url, tenant_id, event_id)


def send_charge(tenant_id: str, charge_id: str, amount: int) -> None:
    charge.delay(tenant_id, charge_id, amount)


def worker() -> None:
    """One Celery worker (threads pool) on this example's queue, until SIGTERM or Ctrl-C."""
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            "--concurrency=8",
            "--loglevel=WARNING",
            f"--queues={SETTINGS.namespace}",
            f"--hostname={SETTINGS.namespace}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def main() -> int:
    if SETTINGS.command == "worker":
        worker()
        return 0
    title = "celery payments example"
    if SETTINGS.command == "produce":
        return scenario.produce(SETTINGS, send_charge, title)
    return scenario.run_all(SETTINGS, Path(__file__), send_charge, title)


if __name__ == "__main__":
    sys.exit(main())
