"""The Celery app the chaos tests run in real workers.

Spawned with ``celery -A tests.chaos.chaos_celery worker ...`` (cwd: the repository
root); configured by the ``LPC_*`` environment variables of :mod:`chaos_common`. One
task per policy, ``chaos.<kind>(job, tenant)``; the ``probe`` task is ``acks_late``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from limitpal_tasks.celery import install, resilient_task

from .chaos_common import (
    BROKER_URL,
    KINDS,
    POLICIES,
    PREFIX,
    QUEUE,
    STORE_TIMEOUT,
    STORE_URL,
    VISIBILITY_TIMEOUT,
    RecordingHooks,
    body,
    celery_task_name,
    record,
)

app = Celery("limitpal_chaos")
app.conf.update(
    broker_url=BROKER_URL,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a broker restart must never end the worker
    worker_hijack_root_logger=False,
    limitpal_store_url=STORE_URL,
    limitpal_key_prefix=PREFIX,
    limitpal_policies=POLICIES,
    limitpal_store_timeout=STORE_TIMEOUT,
    limitpal_hooks=[RecordingHooks("celery")],
)
if BROKER_URL.startswith("redis"):
    # Unacknowledged messages of a dead worker come back after the visibility timeout;
    # sweep for them every second so a test does not wait for kombu's 100 s default.
    app.conf.broker_transport_options = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
install(app)


def _ours(task: Any) -> bool:
    return getattr(task, "app", None) is app


def _on_failure(
    sender: Any = None, exception: BaseException | None = None, args: Any = None, **_: Any
) -> None:
    if not _ours(sender):
        return
    job = str(args[0]) if args else "?"
    record("failures", fw="celery", job=job, exc_type=type(exception).__name__, error=str(exception)[:500])


def _keep_the_event_loop_awake(sender: Any = None, **_: Any) -> None:
    # Without gossip, mingle and heartbeat no timer is due, so the event loop polls for up
    # to 10 s and a SIGTERM waits for that poll: a no-op timer keeps shutdowns prompt.
    timer = getattr(sender, "timer", None)
    if getattr(sender, "app", None) is app and timer is not None:
        timer.call_repeatedly(0.2, _nothing)


def _nothing() -> None:
    """A timer callback that does nothing."""


signals.task_failure.connect(_on_failure, weak=False)
signals.worker_ready.connect(_keep_the_event_loop_awake, weak=False)


def _task(kind: str) -> Any:
    def run(self: Any, job: str, tenant: str) -> str:
        request = self.request
        header = getattr(request, "limitpal", None) or (getattr(request, "headers", None) or {}).get(
            "limitpal"
        )
        return body("celery", kind, job, tenant, header)

    run.__name__ = run.__qualname__ = f"chaos_{kind}"
    decorator: Callable[[Callable[..., Any]], Any] = resilient_task(
        policy=kind, app=app, name=celery_task_name(kind), bind=True, acks_late=kind == "probe"
    )
    return decorator(run)


tasks = {kind: _task(kind) for kind in KINDS}
