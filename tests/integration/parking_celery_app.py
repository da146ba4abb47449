"""The Celery app ``test_parking.py`` runs in real workers (deferrals parked in the store).

Spawned with ``celery -A tests.integration.parking_celery_app worker ...`` (cwd: the
repository root), configured by the :class:`~tests.integration.parking_common.WorkerConfig`
in ``LIMITPAL_PARK_CONFIG``. Records what it does through
:class:`~tests.integration.parking_common.Recorder` (see ``parking_common``).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, signals

from limitpal_tasks.celery import install, resilient_task

from .parking_common import CELERY_TASK, Recorder, Stall, WorkerConfig

CONFIG = WorkerConfig.from_env()
record = Recorder(CONFIG.store_url, CONFIG.prefix)
stall = Stall(CONFIG, record)

app = Celery("limitpal_park")
app.conf.update(
    broker_url=CONFIG.broker_url,
    task_default_queue=CONFIG.queue,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_enable_remote_control=False,  # no pidbox queue left behind in the broker
    limitpal_store_url=CONFIG.store_url,
    limitpal_key_prefix=CONFIG.prefix,
    limitpal_fail_mode="closed",
    limitpal_defer_transport=CONFIG.defer_transport,
    limitpal_park_lease=CONFIG.lease,  # None: the default (30 s)
)
install(app)


def _ours(task: Any) -> bool:
    return getattr(task, "app", None) is app


def _on_postrun(task_id: str = "", task: Any = None, state: str | None = None, **_: Any) -> None:
    if _ours(task):
        outcome = {"IGNORED": "deferred", "SUCCESS": "done", "FAILURE": "failed"}.get(state or "", state)
        record("outcomes", id=task_id, outcome=outcome, state=state)


def _on_failure(
    sender: Any = None, task_id: str = "", exception: BaseException | None = None, **_: Any
) -> None:
    if _ours(sender):
        record("failures", id=task_id, exc_type=type(exception).__name__, error=str(exception))


def _before_publish(headers: dict[str, Any] | None = None, routing_key: str = "", **_: Any) -> None:
    task_id = str((headers or {}).get("id"))
    record("releases", id=task_id, routing_key=routing_key)
    stall.hit("before", task_id)


def _after_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    stall.hit("after", str((headers or {}).get("id")))


def _keep_the_event_loop_awake(sender: Any = None, **_: Any) -> None:
    # Without gossip, mingle and heartbeat no timer is due, so a warm shutdown on RabbitMQ
    # waits out a 10 s poll; a no-op timer makes the event loop look at its flags often.
    timer = getattr(sender, "timer", None)
    if getattr(sender, "app", None) is app and timer is not None:
        timer.call_repeatedly(0.2, _nothing)


def _nothing() -> None:
    """A timer callback that does nothing."""


signals.task_postrun.connect(_on_postrun, weak=False)
signals.task_failure.connect(_on_failure, weak=False)
signals.before_task_publish.connect(_before_publish, weak=False)
signals.after_task_publish.connect(_after_publish, weak=False)
signals.worker_ready.connect(_keep_the_event_loop_awake, weak=False)


@resilient_task(policy=CONFIG.policy(), app=app, name=CELERY_TASK, bind=True)
def call(self: Any, tenant: str, n: int, hold: float = 0.0) -> int:
    """Records its run, then takes ``hold`` seconds; the ``parked`` policy decides when it may run."""
    record("runs", id=self.request.id, tenant=tenant, n=n)
    time.sleep(hold)  # a slow call, when a test asks for one
    return n
