"""The Dramatiq broker of the scenario workers: ``dramatiq scenarios.dramatiq_app:broker`` (cwd: benchmarks/).

One actor, ``scenario_call(tenant, task_id)``, set up from ``SCENARIO_WORKER_SPEC``:

- ``limitpal``: ``LimitpalMiddleware`` (placed after ``Retries`` by ``install``) with the
  scenario's policy, state in the ``RedisStore``; decisions recorded by a hook;
- ``baseline``: what a Dramatiq user writes without limitpal — a
  ``dramatiq.rate_limits.BucketRateLimiter`` per tenant in the body (Redis backend), whose
  ``RateLimitExceeded`` the ``Retries`` middleware retries with its backoff, like the
  upstream's errors.

``Recorder`` comes first in the middleware list, so its ``after_*`` hooks run last (Dramatiq
runs them in reverse), once ``Retries`` has decided whether the message failed for good.
"""

from __future__ import annotations

from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, default_middleware
from dramatiq.rate_limits import BucketRateLimiter, RateLimitExceeded
from dramatiq.rate_limits.backends import RedisBackend

from limitpal_tasks import Cooldown
from limitpal_tasks.dramatiq import LimitpalMiddleware, install

from .recorder import DRAMATIQ_ACTOR as ACTOR
from .recorder import Recorder, WorkerSpec
from .tasks import RecordingHooks, TaskBody

SPEC = WorkerSpec.from_env()
record = Recorder(SPEC.events_dir)
body = TaskBody(SPEC, record)


class RecordOutcomes(Middleware):
    """Records worker boots and how every delivery ended."""

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        record("ready")

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        task_id = message.message_id
        if exception is None:
            record("ok", id=task_id)
        elif message.failed:
            record("fail", id=task_id, x=type(exception).__name__)
        elif isinstance(exception, Cooldown):
            pass  # a deferral: limitpal's hook recorded it
        elif isinstance(exception, RateLimitExceeded):
            record("limited", id=task_id)
        else:
            record("retry", id=task_id, x=type(exception).__name__)

    def after_skip_message(self, broker: Any, message: Any) -> None:
        if message.failed:  # limitpal dead-lettered it (deferral bounds exhausted)
            record("fail", id=message.message_id, x="skipped")


broker = RedisBroker(  # type: ignore[no-untyped-call]  # dramatiq ships no annotations here
    url=SPEC.broker_url, middleware=[RecordOutcomes(), *(m() for m in default_middleware)]
)
dramatiq.set_broker(broker)

if SPEC.variant == "limitpal":
    assert SPEC.policy is not None
    install(
        broker,
        LimitpalMiddleware(
            store=SPEC.store_url,
            key_prefix=SPEC.key_prefix,
            policies={"scenario": SPEC.policy},
            hooks=(RecordingHooks(record),),
        ),
    )

    @dramatiq.actor(actor_name=ACTOR, queue_name=SPEC.queue, broker=broker, limitpal_policy="scenario")
    def call(tenant: str, task_id: str) -> None:
        body(tenant, task_id)

else:
    backend = RedisBackend(client=redis.Redis.from_url(SPEC.store_url))
    limiters: dict[str, BucketRateLimiter] = {}

    def limiter(tenant: str) -> BucketRateLimiter:
        found = limiters.get(tenant)
        if found is None:
            assert SPEC.rate is not None
            found = limiters[tenant] = BucketRateLimiter(  # type: ignore[no-untyped-call]
                backend, f"{SPEC.key_prefix}:rl:{tenant}", limit=int(SPEC.rate), bucket=1000
            )
        return found

    @dramatiq.actor(
        actor_name=ACTOR,
        queue_name=SPEC.queue,
        broker=broker,
        max_retries=SPEC.max_retries,
        min_backoff=int(SPEC.backoff * 1000),
        max_backoff=int(SPEC.backoff_max * 1000),
    )
    def call(tenant: str, task_id: str) -> None:
        if SPEC.rate is None:
            body(tenant, task_id)
            return
        with limiter(tenant).acquire():  # RateLimitExceeded when the bucket is full: Retries retries it
            body(tenant, task_id)
