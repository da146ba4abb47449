"""A task that retries itself (``autoretry_for``, ``self.retry``) still feeds its breaker."""

from __future__ import annotations

import time

import pytest

from limitpal_tasks import Breaker, DeferPolicy, Policy

pytestmark = pytest.mark.celery


def test_autoretry_for_failures_count_against_the_breaker() -> None:
    """Failures that Celery's autoretry_for retries are failures for the breaker: two open it."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    from limitpal_tasks.celery import resilient_task, runtime

    app = Celery("self-retry", broker="memory://", backend="cache+memory://")
    app.conf.update(
        limitpal_policies={
            "flaky": Policy(
                "flaky",
                key="service:{name}",
                breaker=Breaker(minimum_calls=2, window=2, failure_rate_threshold=50, open_for=60),
                defer=DeferPolicy(max_deferrals=0),
            )
        },
        broker_transport_options={"polling_interval": 0.02},
    )
    calls: list[float] = []

    @resilient_task(
        app=app,
        policy="flaky",
        name="self_retry.call",
        shared=False,  # stays with this app (app.task shares tasks with every app by default)
        autoretry_for=(ConnectionError,),
        max_retries=3,
        default_retry_delay=0,
    )
    def call(name: str) -> None:
        calls.append(time.monotonic())
        raise ConnectionError("upstream down")

    # One thread: a retry is published before Retry propagates, so a second thread could run it
    # before this delivery records its failure.
    with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, loglevel="WARNING"):
        result = call.delay("stripe")
        result.get(timeout=20, propagate=False)
        status = runtime(app).store.status("service:stripe")

    assert len(calls) == 2, "the third delivery found the breaker open and was not run"
    assert status.breaker == "open"
    assert result.state == "FAILURE"
