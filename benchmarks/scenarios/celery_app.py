"""The Celery app the scenario workers run: ``celery -A scenarios.celery_app worker`` (cwd: benchmarks/).

One task, ``scenario.call(tenant, task_id)``, set up from ``SCENARIO_WORKER_SPEC``:

- ``limitpal``: ``base=ResilientTask`` with the scenario's policy from ``limitpal_policies``,
  state in the ``RedisStore``; decisions and breaker transitions recorded by a hook;
- ``baseline``: what a Celery user writes without limitpal — ``rate_limit`` (per task type
  and per worker instance) and
  ``autoretry_for`` the upstream's errors with ``retry_backoff``/``retry_jitter``.

Signals record the final state of every task (``ok``, ``fail``) and every retry.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, signals

from limitpal_tasks.celery import ResilientTask

from .recorder import CELERY_TASK, Recorder, WorkerSpec
from .tasks import RecordingHooks, TaskBody
from .upstream import UpstreamError

SPEC = WorkerSpec.from_env()
record = Recorder(SPEC.events_dir)
body = TaskBody(SPEC, record)

app = Celery("scenarios", broker=SPEC.broker_url)
app.conf.update(
    task_ignore_result=True,
    task_default_queue=SPEC.queue,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


options: dict[str, Any]
if SPEC.variant == "limitpal":
    assert SPEC.policy is not None
    app.conf.update(
        limitpal_store_url=SPEC.store_url,
        limitpal_key_prefix=SPEC.key_prefix,
        limitpal_policies={"scenario": SPEC.policy},
        limitpal_hooks=[RecordingHooks(record)],
    )
    options = {"base": ResilientTask, "policy": "scenario"}
else:
    options = {}
    if SPEC.rate is not None:
        options["rate_limit"] = f"{SPEC.rate:g}/s"
    if SPEC.upstream_prefix is not None:
        options.update(
            autoretry_for=(UpstreamError,),
            retry_backoff=int(SPEC.backoff),
            retry_backoff_max=int(SPEC.backoff_max),
            retry_jitter=True,
            max_retries=SPEC.max_retries,
        )


@app.task(name=CELERY_TASK, **options)  # type: ignore[untyped-decorator]  # celery ships no types
def call(tenant: str, task_id: str) -> None:
    body(tenant, task_id)


def _ready(**_: Any) -> None:
    record("ready")


def _succeeded(sender: Task | None = None, **_: Any) -> None:
    if sender is not None:
        record("ok", id=sender.request.id)


def _failed(task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
    record("fail", id=task_id, x=type(exception).__name__)


def _retried(request: Any = None, reason: object = None, **_: Any) -> None:
    record("retry", id=getattr(request, "id", None), x=type(reason).__name__)


signals.worker_ready.connect(_ready, weak=False)
signals.task_success.connect(_succeeded, weak=False)
signals.task_failure.connect(_failed, weak=False)
signals.task_retry.connect(_retried, weak=False)
